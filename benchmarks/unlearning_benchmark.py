#!/usr/bin/env python
"""Federated class unlearning benchmark: pretrain once, then every method, then the forgetting tests.

Methods (``nvflare_unlearn.evaluation.baselines``): retrain from scratch, fine-tune only, classifier-row reset,
federated
Fisher forgetting, the paper's pruning on federated statistics, and two ideas meant to make pruning earn its place
(re-initialise instead of remove; prune only the deepest layers). All run in the in-process FedAvg simulator
(``nvflare_unlearn.evaluation.fedsim``) with the same sites, client sampling, batch order and cosine lr family.

For each method: R-set / U-set accuracy after every round; rounds, wall time (statistics phase included) and
bytes moved until it reaches retrain quality; and on the final model the forgetting tests (linear probe,
relearn steps, membership inference with its power, class-wise KL to the retrained model). Writes JSON (after
every method, so a timeout still leaves results), a markdown table shaped like the paper's Table 2 plus the
forgetting tests, and PNG curves, under ``--out`` (default ``benchmarks/results/``).

    python benchmarks/unlearning_benchmark.py --mode quick
    python benchmarks/unlearning_benchmark.py --mode full --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from nvflare_unlearn.data import load_dataset, partition_biased, stratified_subset_indices  # noqa: E402
from nvflare_unlearn.evaluation import (  # noqa: E402  # noqa: E402
    accuracy_report,
    as_tensors,
    class_correct_total,
    compare_class_accuracy,
    linear_probe,
    membership_inference,
    relearn_steps,
    u_r_accuracy,
)
from nvflare_unlearn.evaluation.baselines import METHODS, PruneOptions, prepare_method  # noqa: E402
from nvflare_unlearn.evaluation.fedsim import CostMeter, FedConfig, Federation, run_fedavg, state_bytes  # noqa: E402
from nvflare_unlearn.models import build_model  # noqa: E402
from nvflare_unlearn.options import PlanOptions, ScoringOptions  # noqa: E402
from nvflare_unlearn.runtime.batches import TensorBatches  # noqa: E402

T_START = time.perf_counter()

# -------------------------------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds-to-minutes smoke run: sklearn digits, the small CNN, 4 sites.
    "quick": dict(
        dataset="digits",
        model="small_cnn",
        train_images=None,
        sites=4,
        clients_per_round=3,
        q="0.1",
        pretrain_rounds=20,
        retrain_rounds=20,
        ft_rounds=6,
        lr=0.05,
        ft_lr=0.02,
        batch_size=32,
        local_epochs=1,
        augment="none",
        eval_n=None,
        relearn_forget_n=20,
        relearn_retain_n=200,
        relearn_target=0.5,
        relearn_lr=0.01,
        relearn_batch=32,
        relearn_max_steps=200,
        relearn_eval_every=2,
        probe_train_n=None,
        mia_n=None,
        fisher_alpha=1e-6,
        fisher_images=None,
        threads=1,
    ),
    # The full setting: ResNet20, 20,000 real CIFAR-10 training images, 10 sites, bias q = 0.1.
    # Sized for <= 60 min on a 2-core CPU; a few minutes on one GPU.
    "full": dict(
        dataset="cifar10",
        model="resnet20",
        train_images=20000,
        sites=10,
        clients_per_round=5,
        q="0.1",
        pretrain_rounds=24,
        retrain_rounds=24,
        ft_rounds=6,
        lr=0.05,
        ft_lr=0.01,
        batch_size=64,
        local_epochs=1,
        augment="flip",
        eval_n=2000,
        relearn_forget_n=100,
        relearn_retain_n=900,
        relearn_target=0.5,
        relearn_lr=0.01,
        relearn_batch=64,
        relearn_max_steps=300,
        relearn_eval_every=10,
        probe_train_n=5000,
        mia_n=3000,
        fisher_alpha=1e-6,
        fisher_images=400,
        threads=2,
    ),
}

SWEEP_KEYS = ("ratio", "scope", "tf_norm", "idf", "direction", "hook_point", "stats_images", "prune_mode")
SWEEP_DEFAULTS = dict(
    ratio="0.05",
    scope="global",
    tf_norm="share",
    idf="paper",
    direction="highest",
    hook_point="conv",
    stats_images="all",
    prune_mode="remove",
)


def log(msg: str) -> None:
    """Timestamped progress line (wall clock and seconds since start), flushed for log tails."""
    now = datetime.now().strftime("%H:%M:%S")
    print(f"[{now} +{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=sorted(PRESETS), default="quick", help="preset; any flag below overrides it")
    p.add_argument("--dataset", choices=["digits", "cifar10", "cifar100"])
    p.add_argument("--model", help="registry name: small_cnn, resnet20/32/44/56, vgg11/13/16/19")
    p.add_argument("--data-root", default=None, help="folder holding cifar10/ (default $NVFLARE_UNLEARN_DATA)")
    p.add_argument("--train-images", type=int, help="class-balanced subset of the training split (CIFAR)")
    p.add_argument("--forget", default=None, help="comma-separated class ids (default: the last class, as the paper)")
    p.add_argument("--q", default=None, help="comma-separated bias probabilities (Fang et al. partition)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (partition, init, sampling)")
    p.add_argument("--sites", type=int)
    p.add_argument("--clients-per-round", type=int)
    p.add_argument("--pretrain-rounds", type=int)
    p.add_argument("--retrain-rounds", type=int)
    p.add_argument("--ft-rounds", type=int, help="fine-tuning rounds for every non-retrain method")
    p.add_argument(
        "--ft-stop-at-quality",
        action="store_true",
        help="end each fine-tune at the first round that reaches retraining's R accuracy (-1 point) "
        "with U <= 1 %% (--ft-rounds is then the cap), so the forgetting tests compare models at "
        "equal accuracy quality; needs retrain among --methods",
    )
    p.add_argument("--lr", type=float, help="peak lr of pretraining and retraining (cosine to 0)")
    p.add_argument("--ft-lr", type=float, help="peak lr of every fine-tune (cosine to 0)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--augment", choices=["none", "flip", "crop_flip"])
    p.add_argument("--eval-n", type=int, help="test images for per-round curves (final tests use the full test set)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--relearn-target", type=float, help="forget-class test accuracy that ends the relearn test")
    p.add_argument("--relearn-max-steps", type=int)
    p.add_argument("--relearn-eval-every", type=int, help="relearn resolution in optimizer steps")
    p.add_argument("--relearn-lr", type=float)
    p.add_argument("--mia-n", type=int, help="retained members / non-members per membership test")
    p.add_argument("--probe-train-n", type=int, help="training images behind the linear probe")
    p.add_argument("--fisher-alpha", type=float)
    p.add_argument("--fisher-images", type=int, help="retained images per participating site for the Fisher")
    p.add_argument("--deep-fraction", type=float, default=1.0 / 3.0, help="prune_deep: last fraction of conv layers")
    for key in SWEEP_KEYS:
        p.add_argument(
            "--" + key.replace("_", "-"),
            default=None,
            help=f"sweep list for the prune method (default {SWEEP_DEFAULTS[key]})",
        )
    p.add_argument("--probe-tol", type=float, default=0.01, help="AUC slack when comparing probes with retrain")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix for output file names")
    p.add_argument("--no-cache", action="store_true", help="do not reuse cached pretrained/retrained models")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.mode].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k, v in SWEEP_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _floats(s: str) -> list[float]:
    return [float(v) for v in str(s).split(",") if v.strip()]


def _strs(s: str) -> list[str]:
    return [v.strip() for v in str(s).split(",") if v.strip()]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return dev


# ------------------------------------------------------------------------------------------------------ data
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
    yt_np = yt.cpu().numpy()
    eval_idx = (
        np.arange(yt_np.size)
        if not args.eval_n or args.eval_n >= yt_np.size
        else stratified_subset_indices(yt_np, args.eval_n, seed=1)
    )
    return Data(x, y, xt, yt, list(train.classes), eval_idx)


def build_eval_sets(data: Data, forget: list[int], args: argparse.Namespace, seed: int) -> None:
    """Fixed sets for the forgetting tests; identical for every model of a run (same seed)."""
    rng = np.random.default_rng(seed + 12345)
    y, yt = data.y.cpu().numpy(), data.yt.cpu().numpy()
    u_tr, r_tr = np.flatnonzero(np.isin(y, forget)), np.flatnonzero(~np.isin(y, forget))
    u_te, r_te = np.flatnonzero(np.isin(yt, forget)), np.flatnonzero(~np.isin(yt, forget))

    def pick(idx: np.ndarray, n: int | None) -> np.ndarray:
        return np.sort(idx if n is None or n >= idx.size else rng.choice(idx, n, replace=False))

    def tr(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(idx, device=data.x.device)
        return data.x[t], data.y[t]

    def te(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(idx, device=data.xt.device)
        return data.xt[t], data.yt[t]

    probe_idx = (
        np.arange(y.size)
        if args.probe_train_n is None or args.probe_train_n >= y.size
        else stratified_subset_indices(y, args.probe_train_n, seed=seed + 7)
    )
    data.sets = {
        "probe_train": tr(probe_idx),
        "u_train": tr(u_tr),
        "u_test": te(u_te),
        "mia_members": tr(pick(r_tr, args.mia_n)),
        "mia_nonmembers": te(pick(r_te, args.mia_n)),
        "relearn_forget": tr(pick(u_tr, args.relearn_forget_n)),
        "relearn_retain": tr(pick(r_tr, args.relearn_retain_n)),
    }


# -------------------------------------------------------------------------------------------------- caching
def _key(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_train(
    cache_dir: Path,
    key_fields: dict[str, Any],
    make_model,
    fed: Federation,
    cfg: FedConfig,
    drop: list[int],
    eval_fn,
    use_cache: bool,
    label: str,
) -> tuple[torch.nn.Module, list[dict[str, Any]], dict[str, Any], bool]:
    """Train from scratch with FedAvg, or load the cached result for the same config (weights + history + cost)."""
    key = _key({**key_fields, "cfg": cfg.to_dict(), "drop": drop, "label": label})
    path = cache_dir / f"{label}_{key}.pt"
    model = make_model()
    if use_cache and path.is_file():
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

    hist = run_fedavg(model, fed, cfg, drop_classes=drop, meter=meter, eval_fn=eval_fn, on_round=on_round)
    cost = meter.snapshot()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "meta": json.dumps({"history": hist, "cost": cost})}, tmp)
    os.replace(tmp, path)
    return model, hist, cost, False


# ----------------------------------------------------------------------------------------------- evaluation
def curve_eval(data: Data, forget: list[int]):
    """Per-round U/R accuracy on the fixed curve subset of the test set (cheap; not charged to methods)."""
    idx = torch.as_tensor(data.eval_idx, device=data.xt.device)
    xe, ye = data.xt[idx], data.yt[idx]

    def fn(model: torch.nn.Module, _round: int) -> dict[str, Any]:
        c, t = class_correct_total(model, ((xb, yb.cpu()) for xb, yb in TensorBatches(xe, ye, 1024)), data.num_classes)
        acc = u_r_accuracy(c, t, forget)
        return {"u_acc": acc["u_acc"], "r_acc": acc["r_acc"]}

    return fn


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


def probe_controls(num_classes: int, forget: list[int], most: int = 9) -> list[int]:
    """Up to `most` retained classes, evenly spaced, probed the same way as the forget class (the control)."""
    kept = [c for c in range(num_classes) if c not in forget]
    return kept[:: max(1, -(-len(kept) // most))][:most]


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


# -------------------------------------------------------------------------------------------------- methods
def prune_variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Cartesian product of the sweep lists (the default is one variant: the paper's settings)."""
    lists = {
        "ratio": _floats(args.ratio),
        "scope": _strs(args.scope),
        "tf_norm": _strs(args.tf_norm),
        "idf": _strs(args.idf),
        "direction": _strs(args.direction),
        "hook_point": _strs(args.hook_point),
        "stats_images": _strs(args.stats_images),
        "prune_mode": _strs(args.prune_mode),
    }
    return [dict(zip(lists, combo)) for combo in itertools.product(*lists.values())]


def variant_name(method: str, v: dict[str, Any], n_variants: int) -> str:
    if n_variants == 1:
        return method
    diff = [f"{k}={v[k]}" for k in SWEEP_KEYS if str(v[k]) != str(SWEEP_DEFAULTS[k])]
    return f"{method}[{','.join(diff) or 'default'}]"


def prune_options(v: dict[str, Any], n_participants: int) -> PruneOptions:
    stats = None if v["stats_images"] == "all" else max(1, int(v["stats_images"]) // max(1, n_participants))
    return PruneOptions(
        plan=PlanOptions(
            prune_ratio=float(v["ratio"]), scope=v["scope"], direction=v["direction"], prune_mode=v["prune_mode"]
        ),
        scoring=ScoringOptions(
            tf_norm=v["tf_norm"],
            idf=v["idf"],
            hook_point=v["hook_point"],
            coe=1.0 if v["tf_norm"] == "balance" else None,
        ),
        images_per_site=stats,
    )


# ------------------------------------------------------------------------------------------------ reporting
def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None, fmt: str) -> str:
    """n/a for a number this run did not measure (e.g. the probe control, added after the H100 run)."""
    return "n/a" if v is None else format(v, fmt)


EQUAL_QUALITY_NOTE = (
    "; every fine-tune stops at the first round that reaches retrain quality (R, U), so the tests compare models "
    "at equal accuracy"
)


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"# Unlearning benchmark: {cfg['mode']} mode, {cfg['dataset']} / {cfg['model']}, forget {cfg['forget']}",
        "",
        f"Generated {report['generated_utc']} on {report['machine']['device_name']} "
        f"({report['machine']['platform']}, torch {report['machine']['torch']}, {report['machine']['threads']} "
        f"CPU threads). Command: `{report['command']}`. Total wall time {report['wall_s']:.0f}s.",
        "",
        f"Federation: {cfg['sites']} sites, {cfg['clients_per_round']} sampled per round, local epochs "
        f"{cfg['local_epochs']}, batch {cfg['batch_size']}, augment {cfg['augment']}; pretrain/retrain "
        f"{cfg['pretrain_rounds']}/{cfg['retrain_rounds']} rounds at lr {cfg['lr']}, every other method "
        f"{cfg['ft_rounds']} fine-tune rounds at lr {cfg['ft_lr']} (cosine to 0 for all)"
        f"{EQUAL_QUALITY_NOTE if cfg.get('ft_stop_at_quality') else ''}. "
        f"{cfg['train_images_used']} training images; curves on {cfg['eval_images']} test images, final tests on "
        f"the full test set ({cfg['test_images']} images).",
        "",
    ]
    for run in report["runs"]:
        lines += run_markdown(run, cfg)
    if len(report["runs"]) > 1:
        lines += aggregate_markdown(report)
    return "\n".join(lines) + "\n"


def run_markdown(run: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    res = run["results"]
    orig, re_ = res.get("original"), res.get("retrain")
    lines = [f"## q = {run['q']}, seed = {run['seed']}", ""]
    lines += [
        "Table 2 shape (U-set / R-set test accuracy; 'after prepare' = right after pruning / noise / reset, "
        "before any fine-tuning):",
        "",
        "| method | raw U | raw R | after-prepare U | after-prepare R | fine-tuned U | fine-tuned R | re-trained U "
        "| re-trained R | rounds to quality | speedup vs retrain | wall s to quality | MB moved to quality |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        if name == "original":
            continue
        acc = r["tests"]["accuracy"]
        cost = r.get("cost_to_quality") or {}
        rq = r.get("rounds_to_quality")
        wall_q = f"{cost['wall_s_total']:.1f}" if cost else "n/a"
        mb_q = f"{cost['bytes_total'] / 1e6:.2f}" if cost else "n/a"
        lines.append(
            f"| {name} | {_pct(orig['tests']['accuracy']['u_acc']) if orig else 'n/a'} "
            f"| {_pct(orig['tests']['accuracy']['r_acc']) if orig else 'n/a'} "
            f"| {_pct(r.get('after_prepare', {}).get('u_acc'))} | {_pct(r.get('after_prepare', {}).get('r_acc'))} "
            f"| {_pct(acc['u_acc'])} | {_pct(acc['r_acc'])} "
            f"| {_pct(re_['tests']['accuracy']['u_acc']) if re_ else 'n/a'} "
            f"| {_pct(re_['tests']['accuracy']['r_acc']) if re_ else 'n/a'} "
            f"| {rq if rq is not None else 'not reached'} | {r.get('speedup') or 'n/a'} "
            f"| {wall_q} | {mb_q} |"
        )
    lines += [
        "",
        "Forgetting tests on the final models (original = ceiling, retrain = reference). Probe: logistic regression "
        "forget-class vs rest on penultimate features (AUC, balanced acc); the same probe for up to 9 retained classes "
        "is the control (a weaker extractor lowers every class, forgetting only the forget class). "
        "Relearn: SGD steps until forget-class "
        "test accuracy reaches the target (`>` = not reached). MIA: loss-threshold (Yeom et al. 2018) and MLP-on-"
        "softmax attacks; power = held-out retained members vs non-members accuracy; control = the same attack on "
        "forget-class train vs test (0.5 = no membership signal); paper success = share of forget-class train "
        "images judged members.",
        "",
        "| method | probe AUC | probe bal. acc | retained-class probe AUC (mean) | probe AUC minus retained "
        "| relearn steps | MIA power loss / mlp | forget control loss / mlp "
        "| self-calibrated control | paper success (train / test) | KL to retrain | max class diff | conditions met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        t = r["tests"]
        rl = t["relearn"]
        ml, mm = t["mia"].get("loss", {}), t["mia"].get("mlp", {})
        acc = t["accuracy"]
        q = r.get("quality")
        if name in ("retrain", "original"):
            met = "reference" if name == "retrain" else "ceiling"
        elif q is None:
            met = "n/a (no retrain in this run)"
        else:
            met = ", ".join(k for k, v in q.items() if v) or "none"
        lines.append(
            f"| {name} | {t['probe']['auc']:.3f} | {t['probe']['balanced_accuracy']:.3f} "
            f"| {_num(t['probe'].get('control_auc_mean'), '.3f')} "
            f"| {_num(t['probe'].get('auc_minus_control'), '+.3f')} "
            f"| {'' if rl['reached'] else '>'}{rl['steps']} "
            f"| {ml.get('power_accuracy', float('nan')):.3f} / {mm.get('power_accuracy', float('nan')):.3f} "
            f"| {ml.get('forget_accuracy', float('nan')):.3f} / {mm.get('forget_accuracy', float('nan')):.3f} "
            f"| {ml.get('forget_selfcal_accuracy', float('nan')):.3f} "
            f"| {ml.get('forget_train_member_rate', float('nan')):.3f} / "
            f"{ml.get('forget_test_member_rate', float('nan')):.3f} "
            f"| {'(reference)' if name == 'retrain' else _num(acc.get('kl_to_reference'), '.2e')} "
            f"| {'(reference)' if name == 'retrain' else _num(acc.get('max_class_acc_diff'), '.3f')} "
            f"| {met} |"
        )
    if run.get("plots"):
        lines += ["", f"Curves: `{run['plots']}`"]
    lines.append("")
    return lines


def aggregate_markdown(report: dict[str, Any]) -> list[str]:
    """Mean ± sd over runs (seeds / q values) for the numbers where differences are small."""
    by: dict[tuple, dict[str, list[float]]] = {}
    for run in report["runs"]:
        for name, r in run["results"].items():
            t = r["tests"]
            d = by.setdefault((run["q"], name), {})
            for key, val in (
                ("R", t["accuracy"]["r_acc"]),
                ("U", t["accuracy"]["u_acc"]),
                ("probe", t["probe"]["auc"]),
                ("probe_gap", t["probe"].get("auc_minus_control")),
                ("relearn", t["relearn"]["steps"]),
                ("rounds", len(r.get("history") or []) or None),
                ("mia_ctrl", t["mia"].get("loss", {}).get("forget_accuracy")),
            ):
                if val is not None:
                    d.setdefault(key, []).append(float(val))
    lines = [
        "## Mean ± sd over seeds",
        "",
        "| q | method | n | rounds run | R acc | U acc | probe AUC | "
        "probe AUC minus retained | relearn steps | MIA control (loss) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(v: list[float], pct: bool = False, digits: int = 2) -> str:
        f = 100.0 if pct else 1.0
        return f"{f * np.mean(v):.{digits}f} ± {f * np.std(v):.{digits}f}" if v else "n/a"

    for (q, name), d in by.items():
        lines.append(
            f"| {q} | {name} | {len(d.get('R', []))} | {ms(d.get('rounds', []), digits=1)} | "
            f"{ms(d.get('R', []), True)} | {ms(d.get('U', []), True)} | {ms(d.get('probe', []), digits=3)} | "
            f"{ms(d.get('probe_gap', []), digits=3)} | {ms(d.get('relearn', []), digits=1)} | "
            f"{ms(d.get('mia_ctrl', []), digits=3)} |"
        )
    return lines + [""]


def plot_run(run: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in run["results"].items():
        hist = r.get("history") or []
        if not hist:
            continue
        rounds = [0] + [h["round"] for h in hist]
        ap = r.get("after_prepare_curve") or {}
        rr = [ap.get("r_acc")] + [h["r_acc"] for h in hist]
        uu = [ap.get("u_acc")] + [h["u_acc"] for h in hist]
        style = "--" if name == "retrain" else "-"
        axes[0].plot(rounds, [np.nan if v is None else 100 * v for v in rr], style, marker=".", label=name)
        axes[1].plot(rounds, [np.nan if v is None else 100 * v for v in uu], style, marker=".", label=name)
    for ax, what in zip(axes, ("R-set accuracy (%)", "forget-class (U-set) accuracy (%)")):
        ax.set_xlabel("FedAvg round (fine-tune; retrain: from scratch)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], stem: Path, final: bool) -> None:
    """JSON always (atomically); markdown and plots as well. Called after every method."""
    report["wall_s"] = time.perf_counter() - T_START
    report["complete"] = final
    tmp = stem.with_name(stem.name + ".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=float))
    os.replace(tmp, stem.with_name(stem.name + ".json"))
    for run in report["runs"]:
        png = stem.with_name(f"{stem.name}_q{run['q']}_s{run['seed']}.png")
        try:
            plot_run(
                run,
                png,
                f"{report['config']['model']} / {report['config']['dataset']}, forget "
                f"{report['config']['forget']}, q={run['q']}, seed={run['seed']}",
            )
            run["plots"] = png.name
        except Exception as exc:  # a plotting failure must not lose the numbers
            log(f"plot failed: {exc}")
    stem.with_name(stem.name + ".md").write_text(markdown(report))


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = _device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    methods = _strs(args.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {METHODS}")
    if args.ft_stop_at_quality and "retrain" not in methods:
        raise SystemExit("--ft-stop-at-quality needs retrain among --methods (its accuracy is the stopping target)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / "unlearning_cache"

    log(f"mode {args.mode} on {dev}: loading {args.dataset}")
    data = load_data(args, dev)
    K = data.num_classes
    forget = [int(c) for c in _strs(args.forget)] if args.forget else [K - 1]
    if any(not 0 <= c < K for c in forget) or len(set(forget)) >= K:
        raise SystemExit(f"--forget must name distinct class ids in 0..{K - 1}, not all of them")
    log(
        f"{data.x.shape[0]} train / {data.xt.shape[0]} test images, {K} classes, forget {forget} "
        f"({', '.join(data.classes[c] for c in forget)})"
    )

    ftag = "+".join(str(c) for c in forget)
    stem = out / f"unlearning_{args.mode}_{args.dataset}_{args.model}_f{ftag}{('_' + args.tag) if args.tag else ''}"
    report: dict[str, Any] = {
        "generated_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python "
        + " ".join([os.path.relpath(__file__, REPO_ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        },
        "config": {
            **{k: v for k, v in vars(args).items()},
            "forget": forget,
            "methods": methods,
            "train_images_used": int(data.x.shape[0]),
            "test_images": int(data.xt.shape[0]),
            "eval_images": int(data.eval_idx.size),
            "class_names": data.classes,
        },
        "paper_reference": {
            "source": "Wang et al. WWW 2022, Table 2 (CIFAR-10, ResNet20, unlearning the last class; 100 clients, "
            "FedAvg, R=0.05)",
            "raw": {"u": 0.9150, "r": 0.8333},
            "after_pruned": {"u": 0.0, "r": 0.2079},
            "fine_tuned": {"u": 0.0, "r": 0.8640},
            "retrained": {"u": 0.0, "r": 0.8633},
            "speedup": 8.9,
        },
        "runs": [],
    }
    curve = curve_eval(data, forget)
    for q, seed in itertools.product(_floats(args.q), [int(s) for s in _strs(args.seeds)]):
        run = {"q": q, "seed": seed, "results": {}}
        report["runs"].append(run)
        torch.manual_seed(seed)
        parts = partition_biased(data.y.cpu().numpy(), args.sites, q, seed=seed)
        fed = Federation(data.x, data.y, parts, K, dev)
        run["site_class_counts"] = fed.class_counts().tolist()
        build_eval_sets(data, forget, args, seed)
        participants = fed.sample_sites(-1, args.clients_per_round, seed)
        run["stats_participants"] = participants

        def make_model(seed: int = seed) -> torch.nn.Module:
            torch.manual_seed(seed)
            return build_model(args.model, K).to(dev)

        key_fields = {
            "dataset": args.dataset,
            "model": args.model,
            "train_images": args.train_images,
            "sites": args.sites,
            "q": q,
            "seed": seed,
            "version": 1,
        }
        pre_cfg = FedConfig(
            rounds=args.pretrain_rounds,
            clients_per_round=args.clients_per_round,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            augment=args.augment,
            seed=seed,
        )
        original, pre_hist, pre_cost, pre_cached = cached_train(
            cache_dir, key_fields, make_model, fed, pre_cfg, [], curve, not args.no_cache, "pretrain"
        )
        run["pretrain"] = {"cost": pre_cost, "cached": pre_cached, "final_curve": pre_hist[-1] if pre_hist else None}
        log("testing the original model")
        run["results"]["original"] = {"tests": forgetting_tests(original, data, forget, args, seed, None)}
        write_outputs(report, stem, final=False)

        ref_class_acc = None
        for method in (["retrain"] if "retrain" in methods else []) + [m for m in methods if m != "retrain"]:
            variants = (
                prune_variants(args)
                if method == "prune"
                else [
                    {
                        k: (_strs(v)[0] if k != "ratio" else _floats(v)[0])
                        for k, v in ((k, getattr(args, k)) for k in SWEEP_KEYS)
                    }
                ]
            )
            for v in variants:
                name = variant_name(method, v, len(variants))
                log(f"method {name}")
                res: dict[str, Any] = {"method": method}
                if method == "retrain":
                    re_cfg = FedConfig(
                        rounds=args.retrain_rounds,
                        clients_per_round=args.clients_per_round,
                        local_epochs=args.local_epochs,
                        batch_size=args.batch_size,
                        lr=args.lr,
                        augment=args.augment,
                        seed=seed,
                    )
                    model, hist, cost, cached = cached_train(
                        cache_dir,
                        {**key_fields, "forget": forget},
                        make_model,
                        fed,
                        re_cfg,
                        forget,
                        curve,
                        not args.no_cache,
                        "retrain",
                    )
                    # the cached curve may come from another test set: the target for the others is re-measured
                    res.update(history=hist, cost=cost, cached=cached, final_curve_now=curve(model, len(hist)))
                else:
                    meter = CostMeter()
                    opts = None
                    if method.startswith("prune"):
                        opts = prune_options(v, len(participants))
                        if method == "prune_deep":
                            opts.plan = dataclasses.replace(opts.plan, deep_fraction=args.deep_fraction)
                        res["options"] = opts.to_dict()
                    prep = prepare_method(
                        method,
                        original,
                        fed,
                        forget,
                        participants,
                        meter,
                        seed=seed,
                        prune_opts=opts,
                        fisher_alpha=args.fisher_alpha,
                        fisher_images_per_site=args.fisher_images,
                    )
                    model = prep.model
                    res["prepare_info"] = prep.info
                    res["after_prepare_curve"] = curve(model, 0)
                    full_ap = accuracy_report(model, (data.xt, data.yt), K, forget)
                    res["after_prepare"] = {"u_acc": full_ap["u_acc"], "r_acc": full_ap["r_acc"]}
                    res["prepare_cost"] = meter.snapshot()
                    res["params_after_prepare"] = int(sum(p.numel() for p in model.parameters()))
                    res["state_bytes_after_prepare"] = state_bytes(model)
                    log(
                        f"  after prepare: U {full_ap['u_acc']:.4f} R {full_ap['r_acc']:.4f} "
                        f"({meter.total_s:.1f}s, {res['params_after_prepare']} params)"
                    )
                    ft_cfg = FedConfig(
                        rounds=args.ft_rounds,
                        clients_per_round=args.clients_per_round,
                        local_epochs=args.local_epochs,
                        batch_size=args.batch_size,
                        lr=args.ft_lr,
                        augment=args.augment,
                        seed=seed,
                    )
                    after = None
                    if opts is not None and opts.plan.prune_mode == "mask":
                        from nvflare_unlearn.method.prune import enforce_masks

                        after = enforce_masks
                    stop = None
                    if args.ft_stop_at_quality:
                        target = run["results"]["retrain"]["final_curve_now"]["r_acc"] - 0.01

                        def stop(rec: dict[str, Any], target: float = target) -> bool:
                            return rec["r_acc"] >= target and rec["u_acc"] <= 0.01

                    hist = run_fedavg(
                        model,
                        fed,
                        ft_cfg,
                        drop_classes=forget,
                        meter=meter,
                        eval_fn=curve,
                        after_step=after,
                        phase="finetune",
                        stop_fn=stop,
                    )
                    res.update(history=hist, cost=meter.snapshot(), cached=False)
                log(
                    f"  final curve: R {res['history'][-1]['r_acc']:.4f} U {res['history'][-1]['u_acc']:.4f}; "
                    f"running forgetting tests"
                )
                res["tests"] = forgetting_tests(model, data, forget, args, seed, ref_class_acc)
                if method == "retrain":
                    ref_class_acc = res["tests"]["accuracy"]["class_acc"]
                    for acc in (run["results"]["original"]["tests"]["accuracy"], res["tests"]["accuracy"]):
                        acc.update(compare_class_accuracy(acc["class_acc"], ref_class_acc))
                a, t = res["tests"]["accuracy"], res["tests"]
                log(
                    f"  {name}: U {a['u_acc']:.4f} R {a['r_acc']:.4f} probe AUC {t['probe']['auc']:.3f} "
                    f"relearn {t['relearn']['steps']} MIA power {t['mia']['loss']['power_accuracy']:.3f} "
                    f"control {t['mia']['loss']['forget_accuracy']:.3f} ({t['test_seconds']:.0f}s tests)"
                )
                run["results"][name] = res
                finish_costs(run, args)
                write_outputs(report, stem, final=False)
    write_outputs(report, stem, final=True)
    log(f"done: {stem.with_name(stem.name + '.json')} and .md")
    return report


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


if __name__ == "__main__":
    main()
