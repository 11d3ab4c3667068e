"""Originals worth forgetting from, and the retrained references every unlearning is compared with.

One command makes every model the evaluation needs, each trained with FedAvg in the in-process federation
(``nvflare_unlearn.evaluation.fedsim``) from a fixed seed, and writes for each a checkpoint (``save_checkpoint`` format,
loadable by ``nvflare-unlearn evaluate``) plus a JSON with its accuracy, per-round curve, cost and SHA-256:

- setting ``c10``: ResNet20 on all 50,000 CIFAR-10 training images, 10 IID sites, 5 sampled per round,
  random crop + flip. The ``original`` must reach >= 80 % test accuracy; ``retrain`` models use the same schedule
  without the forget classes (forget 9, 3 and 0+5+9), with several seeds for the retrain-vs-retrain noise floor.
- setting ``c100m``: ResNet20 on the CIFAR-100 subset (15,000 images), no augmentation, every site every round:
  an original that memorises its training set, so that membership attacks have power (the second setting).
- setting ``digits``: the small CNN on sklearn's digits, 4 sites: the seconds-sized stand-in the quick (CI) run of
  ``benchmarks.forgetting_benchmark`` builds for itself (not in the default job list).

Jobs are independent and skipped when their JSON exists; a job killed part-way resumes from its last finished round
(``NAME.partial.pt``, removed when the job ends), with the result an uninterrupted run gives. Two workers can
split the list (``--worker 0/2`` and ``--worker 1/2``, one CPU thread each).

    python -m benchmarks.originals                      # every job, in priority order
    python -m benchmarks.originals --only c10:original:-:0
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import (
    RESULTS,
    add_data_root_arg,
    add_output_args,
    fed_config,
    log,
    machine,
    parser,
    utc_now,
    write_json,
)
from nvflare_unlearn._io import torch_save
from nvflare_unlearn.data import load_dataset, partition_iid, stratified_subset_indices
from nvflare_unlearn.evaluation import as_tensors, class_correct_total, u_r_accuracy
from nvflare_unlearn.evaluation.fedsim import CostMeter, FedConfig, Federation, run_fedavg
from nvflare_unlearn.method.checkpoint import save_checkpoint
from nvflare_unlearn.models import build_model
from nvflare_unlearn.runtime.batches import TensorBatches


def _setting(dataset: str, model: str, sites: int, **fed: Any) -> dict[str, Any]:
    """A setting: the data, the model, ``sites`` IID sites (partition seed 0) and the FedAvg schedule of its models."""
    return {"dataset": dataset, "model": model, "train_images": None, "sites": sites, "partition_seed": 0, "fed": fed}


# fmt: off
SETTINGS: dict[str, dict[str, Any]] = {
    "c10": _setting("cifar10", "resnet20", 10, rounds=50, clients_per_round=5, local_epochs=1, batch_size=64,
                    lr=0.05, augment="crop_flip", precision="bf16"),
    "c100m": _setting("cifar100", "resnet20", 10, rounds=40, clients_per_round=10, local_epochs=1, batch_size=64,
                      lr=0.05, augment="none", precision="bf16"),
    "digits": _setting("digits", "small_cnn", 4, rounds=20, clients_per_round=4, local_epochs=1, batch_size=32,
                       lr=0.05, augment="none"),
}
# fmt: on

# (setting, kind, forget classes, seed), in priority order: what the headline needs first.
JOBS: list[tuple[str, str, tuple[int, ...], int]] = [
    ("c10", "original", (), 0),
    ("c10", "retrain", (9,), 0),
    ("c10", "retrain", (3,), 0),
    ("c10", "retrain", (0, 5, 9), 0),
    ("c100m", "original", (), 0),
    ("c100m", "retrain", (9,), 0),
    ("c10", "retrain", (9,), 1),
    ("c10", "retrain", (9,), 2),
    ("c100m", "retrain", (9,), 1),
    ("c100m", "retrain", (9,), 2),
    ("c10", "retrain", (3,), 1),
    ("c10", "retrain", (0, 5, 9), 1),
]


def job_name(setting: str, kind: str, forget: tuple[int, ...], seed: int) -> str:
    f = "+".join(str(c) for c in forget) if forget else "-"
    return f"{setting}_{kind}_f{f}_s{seed}"


def parse_job(spec: str) -> tuple[str, str, tuple[int, ...], int]:
    setting, kind, forget, seed = spec.split(":")
    return setting, kind, tuple(int(c) for c in forget.split("+")) if forget not in ("", "-") else (), int(seed)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, forget: list[int]) -> dict[str, Any]:
    c, t = class_correct_total(model, ((xb, yb.cpu()) for xb, yb in TensorBatches(x, y, 1024)), k)
    out = dict(u_r_accuracy(c, t, forget)) if forget else {}
    out.update(acc=float(c.sum() / max(t.sum(), 1)), class_acc=(c / np.maximum(t, 1)).tolist())
    return out


def setting_data(setting: str, data_root: str | None) -> dict[str, Any]:
    """The training and test tensors, class count and site partition of a setting: what every model of it saw.

    ``benchmarks/forgetting_benchmark.py`` rebuilds the same federation from here to fine-tune the originals.
    """
    cfg = SETTINGS[setting]
    kw = {} if cfg["dataset"] == "digits" else {"root": data_root}
    train = load_dataset(cfg["dataset"], split="train", **kw)
    if cfg["train_images"]:
        train = train.subset(stratified_subset_indices(train.targets, cfg["train_images"], seed=0))
    test = load_dataset(cfg["dataset"], split="test", **kw)
    x, y = as_tensors(train)
    xt, yt = as_tensors(test)
    parts = partition_iid(y.numpy(), cfg["sites"], seed=cfg["partition_seed"])
    return {
        "x": x,
        "y": y,
        "xt": xt,
        "yt": yt,
        "num_classes": len(train.classes),
        "classes": train.classes,
        "parts": parts,
    }


def run_job(
    setting: str, kind: str, forget: tuple[int, ...], seed: int, out: Path, data_root: str | None
) -> dict[str, Any]:
    name = job_name(setting, kind, forget, seed)
    cfg = SETTINGS[setting]
    t_start = time.perf_counter()
    d = setting_data(setting, data_root)
    x, y, xt, yt, k = d["x"], d["y"], d["xt"], d["yt"], d["num_classes"]
    fed = Federation(x, y, d["parts"], k)
    curve_idx = torch.as_tensor(stratified_subset_indices(yt.numpy(), min(2000, yt.numel()), seed=1))
    xc, yc = xt[curve_idx], yt[curve_idx]
    fc = fed_config(cfg["fed"], seed=seed)
    torch.manual_seed(seed)
    model = build_model(cfg["model"], k)
    drop = list(forget) if kind == "retrain" else []
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{name}.partial.pt"
    meter, history = CostMeter(), []
    resumed = load_partial(partial, model, fc)
    if resumed is not None:
        meter, history = resumed
        log(f"{name}: resuming after round {meter.rounds} from {partial.name}")

    def eval_fn(m: torch.nn.Module, _r: int) -> dict[str, Any]:
        e = evaluate(m, xc, yc, k, drop)
        return {key: e.get(key) for key in ("acc", "u_acc", "r_acc")}

    def on_round(r: int, rec: dict[str, Any]) -> None:
        history.append(rec)
        torch_save(
            partial,
            {"fed": fc.to_dict(), "state_dict": model.state_dict(), "meter": meter.snapshot(), "history": history},
        )
        log(f"{name} round {r}/{fc.rounds}: acc {rec['acc']:.4f} ({meter.total_s:.0f}s)")

    log(f"{name}: {fc}")
    start_round = meter.rounds
    run_fedavg(
        model,
        fed,
        fc,
        drop_classes=drop,
        meter=meter,
        eval_fn=eval_fn,
        on_round=on_round,
        start_round=start_round,
    )
    train_idx = torch.as_tensor(stratified_subset_indices(y.numpy(), min(5000, y.numel()), seed=2))
    model = model.to(memory_format=torch.contiguous_format)
    ckpt = out / f"{name}.pt"
    if ckpt.exists():
        ckpt.unlink()  # a leftover of a killed run (its JSON, written last, does not exist)
    save_checkpoint(
        ckpt,
        model,
        None,
        cfg["model"],
        k,
        extra={"stage": kind, "setting": setting, "forget_classes": list(forget), "seed": seed},
    )
    result = {
        "name": name,
        "setting": setting,
        "kind": kind,
        "forget": list(forget),
        "seed": seed,
        "config": {**{kk: v for kk, v in cfg.items() if kk != "fed"}, "fed": fc.to_dict()},
        "test": evaluate(model, xt, yt, k, list(forget)),
        "train_subset": evaluate(model, x[train_idx], y[train_idx], k, list(forget)),
        "history": history,
        "cost": meter.snapshot(),
        "checkpoint": {"file": ckpt.name, "sha256": sha256(ckpt), "bytes": ckpt.stat().st_size},
        "wall_s": time.perf_counter() - t_start,
        "resumed_after_round": start_round or None,
        "command": f"python -m benchmarks.originals --only {setting}:{kind}:{'+'.join(map(str, forget)) or '-'}:{seed}",
        "machine": machine(),
        "finished_utc": utc_now(),
    }
    write_json(out / f"{name}.json", result)
    partial.unlink(missing_ok=True)
    log(
        f"{name}: test acc {result['test']['acc']:.4f}, train-subset acc {result['train_subset']['acc']:.4f}, "
        f"{result['wall_s']:.0f}s"
    )
    return result


def load_partial(path: Path, model: torch.nn.Module, fc: FedConfig) -> tuple[CostMeter, list[dict]] | None:
    """Load a killed job's last finished round into ``model``; returns its (meter, history), or None to start over.

    Every round is saved (atomically) after it ends, so a kill costs at most one round. A state written under
    another configuration is refused rather than silently continued.
    """
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fed") != fc.to_dict():
        raise ValueError(f"{path} was written with {state.get('fed')}, not {fc.to_dict()}: remove it to start over")
    model.load_state_dict(state["state_dict"])
    return CostMeter.from_snapshot(state["meter"]), list(state["history"])


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--only", default=None, help="comma-separated jobs setting:kind:forget:seed (forget '-' or 0+5+9)")
    p.add_argument("--worker", default="0/1", help="i/n: run every n-th job starting at i")
    add_data_root_arg(p)
    add_output_args(p, RESULTS / "originals", threads=1, tag=False)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    jobs = [parse_job(s) for s in args.only.split(",")] if args.only else JOBS
    i, n = (int(v) for v in args.worker.split("/"))
    out = Path(args.out)
    for j, job in enumerate(jobs):
        if j % n != i:
            continue
        if (out / f"{job_name(*job)}.json").exists():
            log(f"{job_name(*job)}: done already")
            continue
        run_job(*job, out=out, data_root=args.data_root)


if __name__ == "__main__":
    main()
