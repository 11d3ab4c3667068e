"""Shared test setup: torch's CPU threads (set here only), seeds, and the real CIFAR data root (skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV_VAR = "NVFLARE_UNLEARN_DATA"
DEFAULT_THREADS = 2  # the machines this suite runs on have 2 cores


def real_data_root() -> Path:
    """`$NVFLARE_UNLEARN_DATA`, default `../shared/data` relative to the repository."""
    return Path(os.environ.get(DATA_ENV_VAR) or (REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def cifar_root() -> Path:
    """Folder holding `cifar10/` and `cifar100/` (.npz archives); skips the test when it is missing."""
    root = real_data_root()
    if not (root / "cifar10").is_dir():
        pytest.skip(f"real CIFAR data not found at {root}: set {DATA_ENV_VAR} to the folder holding cifar10/")
    return root


@pytest.fixture(scope="session", autouse=True)
def record_key_dir(tmp_path_factory) -> Path:
    """Jobs sign their audit records with this user's key (protect.signing.default_key_dir): the suite uses a key of
    its own in a temporary folder, never the real one in the home directory (inherited by simulator processes)."""
    from nvflare_unlearn.protect.signing import KEY_DIR_ENV

    path = tmp_path_factory.mktemp("record_keys")
    before = os.environ.get(KEY_DIR_ENV)
    os.environ[KEY_DIR_ENV] = str(path)
    yield path
    if before is None:
        os.environ.pop(KEY_DIR_ENV, None)
    else:
        os.environ[KEY_DIR_ENV] = before


@pytest.fixture(scope="session", autouse=True)
def _default_threads():
    """The one place the suite's default thread count is set."""
    torch.set_num_threads(DEFAULT_THREADS)
    yield


@pytest.fixture(autouse=True)
def _seed_and_restore_threads(_default_threads):
    """Every test starts from the same torch RNG state and leaves the thread count as it found it, so results do not
    depend on test order."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread(_default_threads):
    """Tiny 8x8 models gain nothing from intra-op threads, and lose a lot when the cores are shared (the sites of a
    simulator run use one thread too, so central and federated evaluation round the same way)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
