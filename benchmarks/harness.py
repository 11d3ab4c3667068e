"""The harness every benchmark shares: command line pieces, presets, data helpers, timing and result JSON.

Written once so that the benchmarks differ only in what they measure: how a run logs, which command it records,
which machine it ran on, how a preset fills the flags left unset, how an evaluation subset is drawn and how a
FedAvg schedule is built from the flags all mean the same in every result file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nvflare_unlearn.data import stratified_subset_indices
from nvflare_unlearn.evaluation.artifacts import write_json as _write_json
from nvflare_unlearn.evaluation.fedsim import FedConfig
from nvflare_unlearn.runtime.accuracy import class_correct_total, u_r_accuracy
from nvflare_unlearn.runtime.batches import TensorBatches

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
DATA_ENV_VAR = "NVFLARE_UNLEARN_DATA"
T_START = time.perf_counter()


# ------------------------------------------------------------------------------------------------ logging, timing
def elapsed() -> float:
    """Seconds since the benchmark package was imported (a run's wall time)."""
    return time.perf_counter() - T_START


def log(msg: str) -> None:
    """Timestamped progress line (wall clock and seconds since start), flushed for log tails."""
    print(f"[{datetime.now().strftime('%H:%M:%S')} +{elapsed():7.1f}s] {msg}", flush=True)


def utc_now() -> str:
    """The date a result file records."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ------------------------------------------------------------------------------------------------ command line
def floats(s: str) -> list[float]:
    """Comma-separated numbers of a flag."""
    return [float(v) for v in str(s).split(",") if v.strip()]


def strs(s: str) -> list[str]:
    """Comma-separated words of a flag."""
    return [v.strip() for v in str(s).split(",") if v.strip()]


def ints(s: str) -> list[int]:
    """Comma- or plus-separated class ids or seeds (``0,5,9`` and ``0+5+9`` alike)."""
    return [int(v) for v in str(s).replace("+", ",").split(",") if v.strip()]


def parser(doc: str | None, *, full_help: bool = True) -> argparse.ArgumentParser:
    """The benchmark's parser: its module docstring as help (whole, or its first line)."""
    if not full_help:
        return argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_args(
    p: argparse.ArgumentParser, out: Path | str, *, threads: int | None = 1, with_threads: bool = True, tag: bool = True
) -> None:
    """``--out`` (results folder or file), ``--threads`` (torch CPU threads) and ``--tag`` (file name suffix)."""
    p.add_argument("--out", default=str(out), help="where the results go")
    if with_threads:
        p.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    if tag:
        p.add_argument("--tag", default="", help="suffix for output file names")


def add_data_root_arg(p: argparse.ArgumentParser) -> None:
    """``--data-root``: the folder holding cifar10/ and cifar100/."""
    p.add_argument("--data-root", default=None, help=f"folder holding cifar10/ and cifar100/ (${DATA_ENV_VAR})")


def apply_preset(args: argparse.Namespace, preset: dict[str, Any]) -> argparse.Namespace:
    """Fill every flag the command line left unset (None) from ``preset``: a flag always wins over its preset."""
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """The command a result file records: how to run this benchmark again from the repository root."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([f"python -m benchmarks.{name}", *(shlex.quote(a) for a in args)])


_SCRIPT_FORM = re.compile(r"(\S*python3?) benchmarks/(\w+)\.py\b")


def command_now(command: str) -> str:
    """A recorded command in today's form: runs made when the benchmarks were scripts recorded
    ``python benchmarks/X.py``, which is ``python -m benchmarks.X`` now (the package is run from the root)."""
    return _SCRIPT_FORM.sub(r"\1 -m benchmarks.\2", command)


# ------------------------------------------------------------------------------------------------ machine, results
def device(name: str) -> torch.device:
    """``auto`` (CUDA when torch sees it), ``cpu``, ``cuda`` or ``cuda:N``; asking for an absent GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return dev


def machine(dev: torch.device | None = None) -> dict[str, Any]:
    """Where a run ran: what its timings mean."""
    dev = dev or torch.device("cpu")
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
    }


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """A result file, written atomically (a run killed mid-write leaves the previous file), folders created."""
    return _write_json(path, obj)


# ------------------------------------------------------------------------------------------------ federations, data
def fed_config(source: argparse.Namespace | dict[str, Any], **over: Any) -> FedConfig:
    """A FedAvg schedule from the fields of ``source`` (flags or a settings dict) that ``FedConfig`` has, then
    ``over``: every schedule of a run is built the same way from the same flags."""
    src = vars(source) if isinstance(source, argparse.Namespace) else source
    names = {f.name for f in dataclasses.fields(FedConfig)}
    return FedConfig(**({k: v for k, v in src.items() if k in names} | over))


def u_r_curve(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, forget: list[int]
) -> Callable[[torch.nn.Module, int], dict[str, Any]]:
    """Per-round U / R accuracy on (x, y): the curve every fine-tune records (evaluation is not charged)."""

    def fn(model: torch.nn.Module, _round: int) -> dict[str, Any]:
        c, t = class_correct_total(model, ((xb, yb.cpu()) for xb, yb in TensorBatches(x, y, 1024)), num_classes)
        acc = u_r_accuracy(c, t, forget)
        return {"u_acc": acc["u_acc"], "r_acc": acc["r_acc"]}

    return fn


def forget_split(y: np.ndarray, forget: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the forget classes' images and of the retained ones."""
    mask = np.isin(y, forget)
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def picker(rng: np.random.Generator) -> Callable[[np.ndarray, int | None], np.ndarray]:
    """``pick(idx, n)``: ``n`` of ``idx`` drawn from ``rng`` (all of them when ``n`` is None or too large), sorted."""

    def pick(idx: np.ndarray, n: int | None) -> np.ndarray:
        return np.sort(idx if n is None or n >= idx.size else rng.choice(idx, n, replace=False))

    return pick


def subset_or_all(y: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A class-balanced subset of ``n`` images, or every index when ``n`` is unset or covers them all."""
    return np.arange(y.size) if not n or n >= y.size else stratified_subset_indices(y, n, seed=seed)


def probe_controls(num_classes: int, forget: list[int], most: int = 9) -> list[int]:
    """Up to `most` retained classes, evenly spaced, probed the same way as the forget class (the control)."""
    kept = [c for c in range(num_classes) if c not in forget]
    return kept[:: max(1, -(-len(kept) // most))][:most]
