"""The unlearning benchmark's data, cached training and forgetting tests (``benchmarks.unlearning_benchmark``).

Every model of a run (original, retrained, each method's result) is tested on the same fixed sets, drawn once per
seed here; pretraining and retraining are cached by configuration so that a second run of other methods starts
from the same models.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import forget_split, log, picker, probe_controls, subset_or_all, u_r_curve
from nvflare_unlearn import _io
from nvflare_unlearn.data import load_dataset, stratified_subset_indices
from nvflare_unlearn.evaluation import (
    accuracy_report,
    as_tensors,
    linear_probe,
    membership_inference,
    relearn_steps,
)
from nvflare_unlearn.evaluation.fedsim import CostMeter, FedConfig, Federation, run_fedavg


@dataclass
class Data:
    """Train/test tensors on the compute device plus the fixed evaluation subsets every model is tested on."""

    x: torch.Tensor
    y: torch.Tensor
    xt: torch.Tensor
    yt: torch.Tensor
    classes: list[str]
    eval_idx: np.ndarray  # per-round curve subset of the test set
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_data(args: argparse.Namespace, dev: torch.device) -> Data:
    kw = {} if args.dataset == "digits" else {"root": args.data_root}
    train = load_dataset(args.dataset, split="train", **kw)
    if args.train_images is not None and args.train_images < len(train):
        # same images as load_dataset(..., subset=n, seed=0); a larger n (e.g. the CIFAR-100 subset) keeps all
        train = train.subset(stratified_subset_indices(train.targets, args.train_images, seed=0))
    elif args.train_images is not None:
        log(f"--train-images {args.train_images} >= the {len(train)} training images available: using all")
    test = load_dataset(args.dataset, split="test", **kw)
    x, y = as_tensors(train, dev)
    xt, yt = as_tensors(test, dev)
    eval_idx = subset_or_all(yt.cpu().numpy(), args.eval_n, seed=1)
    return Data(x, y, xt, yt, list(train.classes), eval_idx)


def build_eval_sets(data: Data, forget: list[int], args: argparse.Namespace, seed: int) -> None:
    """Fixed sets for the forgetting tests; identical for every model of a run (same seed)."""
    pick = picker(np.random.default_rng(seed + 12345))
    y, yt = data.y.cpu().numpy(), data.yt.cpu().numpy()
    (u_tr, r_tr), (u_te, r_te) = forget_split(y, forget), forget_split(yt, forget)

    def tr(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(idx, device=data.x.device)
        return data.x[t], data.y[t]

    def te(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(idx, device=data.xt.device)
        return data.xt[t], data.yt[t]

    data.sets = {
        "probe_train": tr(subset_or_all(y, args.probe_train_n, seed=seed + 7)),
        "u_train": tr(u_tr),
        "u_test": te(u_te),
        "mia_members": tr(pick(r_tr, args.mia_n)),
        "mia_nonmembers": te(pick(r_te, args.mia_n)),
        "relearn_forget": tr(pick(u_tr, args.relearn_forget_n)),
        "relearn_retain": tr(pick(r_tr, args.relearn_retain_n)),
    }


def _key(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainCache:
    """Training from scratch for one partition and seed (pretraining, retraining), cached by configuration: a second
    run with other methods starts from the very same models."""

    folder: Path
    key_fields: dict[str, Any]
    make_model: Callable[[], torch.nn.Module]
    fed: Federation
    eval_fn: Callable[[torch.nn.Module, int], dict[str, Any]]
    use: bool

    def train(
        self, cfg: FedConfig, drop: list[int], label: str, **key: Any
    ) -> tuple[torch.nn.Module, list[dict[str, Any]], dict[str, Any], bool]:
        """Train with FedAvg, or load the cached result for the same config: (model, history, cost, cached)."""
        fed = self.fed
        path = (
            self.folder
            / f"{label}_{_key({**self.key_fields, **key, 'cfg': cfg.to_dict(), 'drop': drop, 'label': label})}.pt"
        )
        model = self.make_model()
        if self.use and path.is_file():
            blob = torch.load(path, map_location=fed.device, weights_only=True)
            model.load_state_dict(blob["state_dict"])
            meta = json.loads(blob["meta"])
            log(f"{label}: loaded from cache {path.name} (trained in {meta['cost']['wall_s_total']:.1f}s)")
            return model, meta["history"], meta["cost"], True
        meter = CostMeter()
        log(f"{label}: {cfg.rounds} rounds, {cfg.clients_per_round}/{fed.num_sites} sites per round")

        def on_round(r: int, rec: dict[str, Any]) -> None:
            if r % max(1, cfg.rounds // 6) == 0 or r == cfg.rounds:
                log(
                    f"  {label} round {r}/{cfg.rounds}: R {rec.get('r_acc', float('nan')):.4f} "
                    f"U {rec.get('u_acc', float('nan')):.4f} ({meter.total_s:.0f}s)"
                )

        hist = run_fedavg(model, fed, cfg, drop_classes=drop, meter=meter, eval_fn=self.eval_fn, on_round=on_round)
        cost = meter.snapshot()
        self.folder.mkdir(parents=True, exist_ok=True)
        _io.torch_save(path, {"state_dict": model.state_dict(), "meta": json.dumps({"history": hist, "cost": cost})})
        return model, hist, cost, False


def curve_eval(data: Data, forget: list[int]):
    """Per-round U/R accuracy on the fixed curve subset of the test set (cheap; not charged to methods)."""
    idx = torch.as_tensor(data.eval_idx, device=data.xt.device)
    return u_r_curve(data.xt[idx], data.yt[idx], data.num_classes, forget)


def forgetting_tests(
    model: torch.nn.Module,
    data: Data,
    forget: list[int],
    args: argparse.Namespace,
    seed: int,
    reference_class_acc: list[float] | None,
) -> dict[str, Any]:
    """Every test of issue 4 on one final model; each returns plain numbers for the JSON."""
    t0 = time.perf_counter()
    s = data.sets
    out: dict[str, Any] = {
        "accuracy": accuracy_report(model, (data.xt, data.yt), data.num_classes, forget, reference_class_acc)
    }
    out["probe"] = linear_probe(
        model,
        s["probe_train"],
        (data.xt, data.yt),
        forget,
        seed=seed,
        control_classes=probe_controls(data.num_classes, forget),
    )
    out["relearn"] = relearn_steps(
        model,
        s["relearn_forget"],
        s["relearn_retain"],
        args.relearn_target,
        args.relearn_lr,
        args.relearn_batch,
        args.relearn_max_steps,
        seed,
        eval_ds=s["u_test"],
        eval_every=args.relearn_eval_every,
    )
    out["mia"] = membership_inference(
        model, s["mia_members"], s["mia_nonmembers"], s["u_train"], s["u_test"], seed=seed
    )
    out["params"] = int(sum(p.numel() for p in model.parameters()))
    out["test_seconds"] = time.perf_counter() - t0
    return out


def rounds_to_reach(history: list[dict[str, Any]], r_target: float, u_max: float) -> int | None:
    """First round whose curve accuracy has R >= r_target and U <= u_max (None if never)."""
    for rec in history:
        if rec["r_acc"] is not None and rec["r_acc"] >= r_target and (rec["u_acc"] or 0.0) <= u_max:
            return int(rec["round"])
    return None


def quality(result: dict[str, Any], retrain: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Which retrain-quality conditions a method's final model meets (issue 4, Cost)."""
    a, ra = result["tests"]["accuracy"], retrain["tests"]["accuracy"]
    rl, rrl = result["tests"]["relearn"], retrain["tests"]["relearn"]
    pr, rpr = result["tests"]["probe"], retrain["tests"]["probe"]
    return {
        "r_acc_within_1pt": bool(a["r_acc"] >= ra["r_acc"] - 0.01),
        "u_acc_le_1pct": bool(a["u_acc"] <= 0.01),
        "relearn_no_faster": bool(rl["steps"] >= rrl["steps"]),
        "probe_no_more_separable": bool(pr["auc"] <= rpr["auc"] + args.probe_tol),
    }


def finish_costs(run: dict[str, Any], args: argparse.Namespace) -> None:
    """Rounds/wall/bytes to retrain quality and the conditions met, for every method finished so far."""
    re_ = run["results"].get("retrain")
    if re_ is None:
        return
    re_rounds = rounds_to_reach(re_["history"], re_["history"][-1]["r_acc"] - 0.01, 0.01)
    r_target = re_.get("final_curve_now", re_["history"][-1])["r_acc"] - 0.01
    re_["rounds_to_quality"] = re_rounds
    re_["r_target_curve"] = r_target
    re_["cost_to_quality"] = re_["history"][re_rounds - 1] if re_rounds else None
    for name, r in run["results"].items():
        if name in ("original", "retrain"):
            continue
        rq = rounds_to_reach(r["history"], r_target, 0.01)
        r["rounds_to_quality"] = rq
        r["cost_to_quality"] = (
            {
                k: r["history"][rq - 1][k]
                for k in ("rounds", "bytes_down", "bytes_up", "bytes_total", "wall_s", "wall_s_total")
            }
            if rq
            else None
        )
        r["speedup"] = round(re_rounds / rq, 2) if rq and re_rounds else None
        r["quality"] = quality(r, re_, args)
