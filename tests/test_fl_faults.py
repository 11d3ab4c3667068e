"""Fault injection in real NVFlare simulator runs (SimEnv, 4 sites, small CNN, digits): one site crashes, one
returns a garbage activation report, one sleeps past ``task_timeout``, during the activation phase AND during the
first fine-tuning round (``fault_executors.FaultyExecutor``). DP noise is on, so the screening of noisy reports is
exercised too. The job must complete with the honest sites, say why each bad site was left out (metrics and audit
record), and leave the original checkpoint byte-identical.

One job serves every assertion (~1 min on 2 cores): the faults are per site, so they do not interfere.
"""

from __future__ import annotations

import json
import os

import fault_executors
import pytest
from nvflare.recipe.sim_env import SimEnv

from nvflare_unlearn.fl import UnlearningRecipe, authorize_site_config, quiet_log_config, read_job_result
from nvflare_unlearn.fl import recipes as recipes_module
from nvflare_unlearn.fl.defs import RECORD_PUBLIC_KEY_FILE
from nvflare_unlearn.method.checkpoint import save_checkpoint
from nvflare_unlearn.protect.record import sha256_file
from nvflare_unlearn.protect.verify import verify_record

pytestmark = pytest.mark.sim  # real NVFlare simulator jobs

N_SITES = 4
TASK_TIMEOUT = 8  # < fault_executors.SLEEP_S: site-4 is cut off by the task timeout; well above a
# healthy site's few seconds even on a loaded 2-core machine
WAIT_AFTER_MIN = 10  # > TASK_TIMEOUT, so the timeout (not the straggler wait) is what leaves site-4 out
DP = dict(dp_epsilon=8.0, dp_delta=1e-5, clip_bound=2.0)


def trained_checkpoint(path) -> str:
    """A small_cnn trained centrally on digits (seconds), saved as the job's original checkpoint."""
    from core_helpers import trained_digits_cnn

    save_checkpoint(str(path), trained_digits_cnn(), None, "small_cnn", 10)
    return str(path)


def run_faulty_job(root, ckpt: str, monkeypatch) -> tuple:
    """Build the recipe with FaultyExecutor on every site and run it; returns (result, sha256 before)."""
    assert fault_executors.SLEEP_S > TASK_TIMEOUT
    tests_dir = os.path.dirname(os.path.abspath(fault_executors.__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(recipes_module, "UnlearningExecutor", fault_executors.FaultyExecutor)
    name = "unlearn_faults"
    allow = authorize_site_config(os.path.join(str(root), name, "local"))  # the simulator's site allow list
    with open(allow) as f:
        resources = json.load(f)
    resources["class_allow_list"].append("fault_executors")
    with open(allow, "w") as f:
        json.dump(resources, f)
    recipe = UnlearningRecipe(
        name=name,
        model="small_cnn",
        num_classes=10,
        initial_ckpt=ckpt,
        forget_classes=[3],
        prune_ratio=0.2,
        num_rounds=2,
        local_epochs=1,
        lr=0.01,
        num_clients=N_SITES,
        min_clients=1,
        task_timeout=TASK_TIMEOUT,
        wait_time_after_min_received=WAIT_AFTER_MIN,
        tensorboard=False,
        **DP,
    )
    before = sha256_file(ckpt)
    env = SimEnv(
        num_clients=N_SITES, num_threads=N_SITES, workspace_root=str(root), log_config=quiet_log_config(str(root))
    )
    return read_job_result(recipe.execute(env).get_result()), before


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvflare_faults")
    ckpt = trained_checkpoint(root / "original.pt")
    with pytest.MonkeyPatch.context() as mp:
        result, before = run_faulty_job(root, ckpt, mp)
    with open(result.record_path) as f:
        record = json.load(f)
    return result, record, ckpt, before


def test_activation_phase_goes_on_without_crashed_garbage_and_late_sites(faulty):
    result, record, _ckpt, _before = faulty
    m = result.metrics
    assert m["status"] == "completed" and m["options"]["federation"]["min_clients"] == 1
    (act,) = m["activation_rounds"]
    assert act["sites"] == ["site-1"]
    assert act["no_result"] == ["site-2", "site-4"]  # crashed (EXECUTION_EXCEPTION) and timed out
    assert list(act["rejected"]) == ["site-3"]
    assert "NaN" in act["rejected"]["site-3"], act["rejected"]  # the first problem found is named
    assert m["params_after"] < m["params_before"]
    # The audit record names every left-out site with its reason, and only site-1's counts.
    assert list(record["sites"]["participating"]) == ["site-1"]
    assert sum(record["sites"]["participating"]["site-1"]) == sum(act["counts"]) > 0
    rejected = record["sites"]["rejected"]
    assert sorted(rejected) == ["site-2", "site-3", "site-4"]
    assert "no result" in rejected["site-2"] and "no result" in rejected["site-4"]
    assert "no result" not in rejected["site-3"]


def test_finetune_round_goes_on_without_crashed_and_late_sites(faulty):
    result, _record, _ckpt, _before = faulty
    first, second = result.metrics["per_round"]
    assert first["no_result"] == ["site-2", "site-4"]
    assert first["trained_sites"] == ["site-1", "site-3"] and first["n_trained"] == 2
    assert second["no_result"] == [] and second["trained_sites"] == ["site-1", "site-2", "site-3", "site-4"]
    assert result.rounds == 2


def test_original_checkpoint_byte_identical_and_record_verifies(faulty):
    result, record, ckpt, before = faulty
    assert sha256_file(ckpt) == before == record["models"]["original"]["sha256"]
    key = os.path.join(result.run_dir, RECORD_PUBLIC_KEY_FILE)
    outcome = verify_record(result.record_path, result.model_path, original_model_path=ckpt, public_key=key)
    assert outcome.ok, str(outcome)
    assert "metrics = job's metrics file" in outcome.checks and not outcome.skipped


def test_record_states_the_dp_parameters(faulty):
    result, record, _ckpt, _before = faulty
    params = record["request"]["parameters"]
    privacy = params["privacy"]
    assert privacy["dp_epsilon"] == DP["dp_epsilon"] and privacy["dp_delta"] == DP["dp_delta"]
    assert privacy["clip_bound"] == DP["clip_bound"]
    assert params["dp_per_pass"] == {"epsilon": 8.0, "delta": 1e-5, "passes": 1}
    (sigma,) = params["dp_sigma"]
    assert sigma > 0
    # The site applied exactly the sigma the server states (same formula, same channel count).
    assert result.metrics["activation_rounds"][0]["dp_sigma"] == {"site-1": pytest.approx(sigma)}
