#!/usr/bin/env python
"""Forgetting, measured so that it can decide: every method on a fixed original, against retrained references.

Inputs are the models of ``benchmarks/originals.py`` (one original and several retrained references per forget
set, each a checkpoint + JSON). For each method and seed the original is prepared (``evaluation.baselines``) and
fine-tuned with FedAvg on the retained classes in the in-process federation (``evaluation.fedsim``: the same
sites the original was trained on, the original's schedule at the fine-tune lr), and every model (original,
retrained references, unlearned models) gets the same tests:

- accuracy on the FULL test set after every fine-tune round (rounds to retrain quality read from it);
- linear probe forget-class vs rest on penultimate features, with retained-class controls and a bootstrap CI;
- relearn steps at 1-step resolution (accuracy on held-out forget-class images after every step; curve stored);
- membership: the loss attack's POWER on retained members vs non-members (held-out threshold accuracy, AUC + CI),
  its AUC / TPR@1%FPR on forget-class train vs test images, offline LiRA on the forget class with the retrained
  models as "out" references (leave-one-out for a reference itself), and a feature-space shadow classifier;
- class-wise KL / max gap to the retrained references;

then per metric the retrain-vs-retrain noise floor, t-intervals over seeds and paired differences between
methods. Per-example losses, logits and penultimate features of U-train, U-test, an R-train and an R-test sample are
saved per model (npz) so attacks can be rerun offline. Output: ``<out>/<setting>_f<forget>[_<tag>].json`` (rewritten
after every model), ``.md`` and ``arrays/``.

    python benchmarks/forgetting_benchmark.py --setting digits            # CI size: builds its own digits originals
    python benchmarks/forgetting_benchmark.py --setting c10 --forget 9    # needs benchmarks/results/originals/
    python benchmarks/forgetting_benchmark.py --setting c100m --forget 9
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for p in (REPO_ROOT, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import originals  # noqa: E402  (the settings and data of the originals: one definition)

from nvflare_unlearn import _io, load_checkpoint  # noqa: E402
from nvflare_unlearn.data import stratified_subset_indices  # noqa: E402
from nvflare_unlearn.evaluation import (  # noqa: E402
    class_correct_total,
    compare_class_accuracy,
    relearn_steps,
    u_r_accuracy,
)
from nvflare_unlearn.evaluation.artifacts import per_example_arrays, save_arrays, write_json  # noqa: E402
from nvflare_unlearn.evaluation.baselines import METHODS, PruneOptions, prepare_method, site_objectives  # noqa: E402
from nvflare_unlearn.evaluation.fedsim import CostMeter, FedConfig, Federation, run_fedavg, state_bytes  # noqa: E402
from nvflare_unlearn.evaluation.membership import (  # noqa: E402
    feature_membership_attack,
    lira_offline,
    logit_confidence,
    loss_attack_power,
    membership_auc,
)
from nvflare_unlearn.evaluation.probe import linear_probe_features  # noqa: E402
from nvflare_unlearn.evaluation.stats import noise_floor, paired_difference, t_interval  # noqa: E402
from nvflare_unlearn.options import MethodOptions, PlanOptions  # noqa: E402
from nvflare_unlearn.runtime.batches import TensorBatches  # noqa: E402

T_START = time.perf_counter()
RESULTS = HERE / "results"
DEFAULT_OUT = RESULTS / "forgetting"

# Fine-tune and test sizes per setting; every flag below overrides them.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(
        ft_rounds=6,
        ft_lr=0.02,
        r_sample_n=300,
        probe_train_n=None,
        relearn_forget_n=20,
        relearn_retain_n=200,
        relearn_lr=0.01,
        relearn_batch=32,
        relearn_max_steps=200,
        relearn_eval_n=None,
        fisher_images=None,
    ),
    "c10": dict(
        ft_rounds=6,
        ft_lr=0.01,
        r_sample_n=2000,
        probe_train_n=5000,
        relearn_forget_n=100,
        relearn_retain_n=900,
        relearn_lr=0.01,
        relearn_batch=64,
        relearn_max_steps=300,
        relearn_eval_n=500,
        fisher_images=400,
    ),
    "c100m": dict(
        ft_rounds=5,
        ft_lr=0.01,
        r_sample_n=2000,
        probe_train_n=5000,
        relearn_forget_n=50,
        relearn_retain_n=450,
        relearn_lr=0.01,
        relearn_batch=64,
        relearn_max_steps=300,
        relearn_eval_n=None,
        fisher_images=300,
    ),
}
DEFAULT_METHODS = "finetune,row_reset,fisher,prune"
FISHER_ALPHAS = "1e-8,1e-7,1e-6,1e-5,1e-4,1e-3"

#: metric -> (label, kind): "level" metrics are compared with retraining by |difference|, "distance" metrics are
#: already distances to the retrained references (their floor is the references' distance to each other)
METRICS: dict[str, tuple[str, str]] = {
    "r_acc": ("R acc", "level"),
    "u_acc": ("U acc", "level"),
    "rounds_to_quality": ("rounds to quality", "level"),
    "probe_auc": ("probe AUC", "level"),
    "probe_gap": ("probe AUC minus retained", "level"),
    "relearn_steps": ("relearn steps", "level"),
    "mia_power": ("loss attack power (R)", "level"),
    "mia_forget_auc": ("loss attack AUC (U)", "level"),
    "lira_auc": ("LiRA AUC (U)", "level"),
    "lira_tpr": ("LiRA TPR@1%FPR (U)", "level"),
    "feat_power_auc": ("feature attack AUC (R)", "level"),
    "feat_forget_auc": ("feature attack AUC (U)", "level"),
    "kl_to_retrain": ("KL to retrain", "distance"),
    "max_class_diff": ("max class diff", "distance"),
}


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked method: how the original is prepared, what the sites minimise, the prune ratio.

    Written ``<prepare>[@<ratio>][+kd]``: ``prune@0.2+kd`` prunes 20 % then fine-tunes with distillation;
    ``neggrad+kd`` is NegGrad+ with a distilled retained term; ``scrub`` distils by definition. The job's methods
    (``options.METHODS``) and the benchmark's preparations (``evaluation.baselines.METHODS``) both spell here.
    """

    name: str
    prepare: str
    objective: MethodOptions
    ratio: float | None


def parse_method(spec: str, default_ratio: float) -> MethodSpec:
    base, _, recovery = spec.partition("+")
    base, _, ratio = base.partition("@")
    if recovery not in ("", "kd"):
        raise SystemExit(f"method {spec!r}: only '+kd' may follow a method")
    if base in ("neggrad", "random_label", "scrub"):
        opts = MethodOptions(method=base, recovery="kd" if (recovery or base == "scrub") else "ce")
        return MethodSpec(spec, "finetune", opts, None)
    if base not in METHODS or base == "retrain":
        known = sorted(set(METHODS[1:]) | {"neggrad", "random_label", "scrub"})
        raise SystemExit(f"unknown method {base!r} in {spec!r}; choose from {known} (retraining is the references)")
    job_method = "prune" if base.startswith("prune") else "finetune"
    opts = MethodOptions(method=job_method, recovery=recovery or "ce")
    return MethodSpec(spec, base, opts, float(ratio) if ratio else (default_ratio if job_method == "prune" else None))


def log(msg: str) -> None:
    now = datetime.now().strftime("%H:%M:%S")
    print(f"[{now} +{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def _ints(s: str) -> list[int]:
    return [int(v) for v in str(s).replace("+", ",").split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(PRESETS), default="digits", help="an originals.py setting")
    p.add_argument("--forget", default="9", help="forget classes, e.g. 9 or 0,5,9 (must match retrained references)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of every method (client sampling, batch order, noise)")
    p.add_argument("--original-seed", type=int, default=0)
    p.add_argument("--originals", default=None, help="folder of originals.py outputs (default per setting)")
    p.add_argument("--data-root", default=None, help="folder holding cifar10/ and cifar100/ ($NVFLARE_UNLEARN_DATA)")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated; each <prepare>[@<ratio>][+kd] with <prepare> in {METHODS[1:]} or "
        f"neggrad/random_label/scrub (e.g. prune@0.2+kd, neggrad+kd)",
    )
    p.add_argument("--ft-rounds", type=int, help="fine-tune rounds of EVERY method (the shared budget)")
    p.add_argument("--ft-lr", type=float, help="peak fine-tune lr (cosine to 0)")
    p.add_argument("--prune-ratio", type=float, default=0.05, help="prune: share of coupled channel units removed")
    p.add_argument("--fisher-alphas", default=FISHER_ALPHAS, help="fisher: alpha grid tuned on retained data")
    p.add_argument("--fisher-max-r-drop", type=float, default=0.1, help="fisher: retained-accuracy drop allowed")
    p.add_argument("--fisher-images", type=int, help="fisher: retained images per participating site")
    p.add_argument("--r-sample-n", type=int, help="retained train / test images for the membership tests")
    p.add_argument("--probe-train-n", type=int, help="training images behind the linear probe")
    p.add_argument("--relearn-forget-n", type=int)
    p.add_argument("--relearn-retain-n", type=int)
    p.add_argument("--relearn-lr", type=float)
    p.add_argument("--relearn-batch", type=int)
    p.add_argument("--relearn-max-steps", type=int)
    p.add_argument("--relearn-eval-n", type=int, help="held-out forget-class images scored after every step")
    p.add_argument("--relearn-target", type=float, default=0.5)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples behind every AUC interval")
    p.add_argument("--no-arrays", action="store_true", help="do not save per-example arrays (npz)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--tag", default="")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the method runs of an interrupted run with the same configuration (references are retested); "
        "the method list may change, so one interrupted run can be split over several --tag runs",
    )
    args = p.parse_args(argv)
    for k, v in PRESETS[args.setting].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.originals is None:
        args.originals = str(Path(args.out) / "originals_digits" if args.setting == "digits" else RESULTS / "originals")
    return args


# ---------------------------------------------------------------------------------------------------- inputs
def load_models(args: argparse.Namespace, forget: list[int]) -> dict[str, Any]:
    """The original and every retrained reference for ``forget`` (digits: trained here when missing)."""
    root = Path(args.originals)
    ftag = "+".join(map(str, forget))
    orig_name = originals.job_name(args.setting, "original", (), args.original_seed)
    if args.setting == "digits":  # the CI stand-in: deterministic and seconds to build, so built on demand
        for kind, fg, s in [("original", (), args.original_seed)] + [("retrain", tuple(forget), s) for s in (0, 1, 2)]:
            if not (root / f"{originals.job_name(args.setting, kind, fg, s)}.json").is_file():
                log(f"building {originals.job_name(args.setting, kind, fg, s)} (originals.py, digits setting)")
                originals.run_job(args.setting, kind, fg, s, out=root, data_root=args.data_root)
    if not (root / f"{orig_name}.json").is_file():
        raise SystemExit(
            f"{root / orig_name}.json not found: make it with "
            f"python benchmarks/originals.py --only {args.setting}:original:-:{args.original_seed} --out {root}"
        )
    refs = sorted(root.glob(f"{args.setting}_retrain_f{ftag}_s*.json"))
    if not refs:
        raise SystemExit(
            f"no retrained reference {args.setting}_retrain_f{ftag}_s*.json in {root}: make them with "
            f"python benchmarks/originals.py --only {args.setting}:retrain:{ftag}:0,{args.setting}:retrain:{ftag}:1"
        )
    out = {"original": _load_one(root, orig_name, args.setting)}
    for path in refs:
        rec = _load_one(root, path.stem, args.setting)
        out[f"retrain_s{rec['json']['seed']}"] = rec
    if len(refs) < 2:
        log(f"only {len(refs)} retrained reference: no noise floor, and LiRA has no reference for it")
    return out


def _load_one(root: Path, name: str, setting: str) -> dict[str, Any]:
    meta = json.loads((root / f"{name}.json").read_text())
    cfg = originals.SETTINGS[setting]
    for key in ("dataset", "model", "sites", "partition_seed", "train_images"):
        if meta["config"].get(key) != cfg.get(key):
            raise SystemExit(f"{name}: its {key} {meta['config'].get(key)!r} differs from originals.py's {cfg[key]!r}")
    model, _plan, _meta = load_checkpoint(root / meta["checkpoint"]["file"])
    return {"json": meta, "model": model.eval(), "path": str(root / meta["checkpoint"]["file"])}


@dataclass
class Sets:
    """The fixed index sets every model is tested on (identical for all models of a run)."""

    u_train: np.ndarray
    u_test: np.ndarray
    r_train: np.ndarray
    r_test: np.ndarray
    probe_train: np.ndarray
    relearn_forget: np.ndarray
    relearn_retain: np.ndarray
    relearn_eval: np.ndarray


def build_sets(y: np.ndarray, yt: np.ndarray, forget: list[int], args: argparse.Namespace) -> Sets:
    rng = np.random.default_rng(12345)
    u_tr, r_tr = np.flatnonzero(np.isin(y, forget)), np.flatnonzero(~np.isin(y, forget))
    u_te, r_te = np.flatnonzero(np.isin(yt, forget)), np.flatnonzero(~np.isin(yt, forget))

    def pick(idx: np.ndarray, n: int | None) -> np.ndarray:
        return np.sort(idx if n is None or n >= idx.size else rng.choice(idx, n, replace=False))

    n_r = min(args.r_sample_n, r_tr.size, r_te.size)
    probe = (
        np.arange(y.size)
        if args.probe_train_n is None or args.probe_train_n >= y.size
        else stratified_subset_indices(y, args.probe_train_n, seed=7)
    )
    return Sets(
        u_train=u_tr,
        u_test=u_te,
        r_train=pick(r_tr, n_r),
        r_test=pick(r_te, n_r),
        probe_train=probe,
        relearn_forget=pick(u_tr, args.relearn_forget_n),
        relearn_retain=pick(r_tr, args.relearn_retain_n),
        relearn_eval=pick(u_te, args.relearn_eval_n),
    )


# ----------------------------------------------------------------------------------------------------- tests
class Evaluator:
    """Runs the per-model tests; keeps what the cross-model tests (LiRA, KL to references) need."""

    def __init__(self, data: dict[str, Any], forget: list[int], sets: Sets, args: argparse.Namespace, arrays_dir):
        self.d, self.forget, self.sets, self.args = data, forget, sets, args
        self.k = data["num_classes"]
        self.arrays_dir = arrays_dir
        self.phi: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # model -> LiRA statistic on (U-train, U-test)
        kept = [c for c in range(self.k) if c not in forget]
        self.controls = kept[:: max(1, -(-len(kept) // 9))][:9]
        # one forward pass over the union of the training-image sets, one over the test set
        self.train_union = np.unique(np.concatenate([sets.probe_train, sets.u_train, sets.r_train]))

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.train_union, idx)

    def run(self, name: str, model: torch.nn.Module, seed: int) -> dict[str, Any]:
        t0, c0 = time.perf_counter(), time.process_time()
        d, s, a = self.d, self.sets, self.args
        x, y, xt, yt = d["x"], d["y"], d["xt"], d["yt"]
        tr = per_example_arrays(model, (x[self.train_union], y[self.train_union]))
        te = per_example_arrays(model, (xt, yt))

        def sub(arr: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
            return {k: v[rows] for k, v in arr.items()}

        parts = {
            "u_train": sub(tr, self._rows(s.u_train)),
            "u_test": sub(te, s.u_test),
            "r_train": sub(tr, self._rows(s.r_train)),
            "r_test": sub(te, s.r_test),
        }
        if self.arrays_dir is not None:
            save_arrays(self.arrays_dir / f"{name}.npz", parts)
        self.phi[name] = tuple(logit_confidence(parts[p]["logits"], parts[p]["labels"]) for p in ("u_train", "u_test"))
        probe_rows = self._rows(s.probe_train)
        out: dict[str, Any] = {
            "accuracy": self._accuracy(te),
            "probe": linear_probe_features(
                tr["features"][probe_rows],
                tr["labels"][probe_rows],
                te["features"],
                te["labels"],
                self.forget,
                seed=0,
                control_classes=self.controls,
                n_boot=a.n_boot,
            ),
            "relearn": relearn_steps(
                model,
                (x[s.relearn_forget], y[s.relearn_forget]),
                (x[s.relearn_retain], y[s.relearn_retain]),
                a.relearn_target,
                a.relearn_lr,
                a.relearn_batch,
                a.relearn_max_steps,
                seed,
                eval_ds=(xt[s.relearn_eval], yt[s.relearn_eval]),
                eval_every=1,
            ),
            "loss_attack": {
                "retained_power": loss_attack_power(
                    parts["r_train"]["loss"], parts["r_test"]["loss"], seed=0, n_boot=a.n_boot
                ),
                "forget": membership_auc(parts["u_train"]["loss"], parts["u_test"]["loss"], n_boot=a.n_boot),
            },
            "feature_attack": {
                "retained_power": feature_membership_attack(
                    parts["r_train"]["features"], parts["r_test"]["features"], n_boot=a.n_boot
                ),
                "forget": feature_membership_attack(
                    parts["u_train"]["features"], parts["u_test"]["features"], n_boot=a.n_boot
                ),
            },
            "params": int(sum(p.numel() for p in model.parameters())),
        }
        out["test_seconds"] = time.perf_counter() - t0
        out["test_cpu_seconds"] = time.process_time() - c0  # CPU time: what a loaded machine's wall time hides
        return out

    def _accuracy(self, te: dict[str, np.ndarray]) -> dict[str, Any]:
        """U / R / class-wise accuracy on the full test set, from the logits already computed (no second pass)."""
        hit = te["logits"].argmax(1) == te["labels"]
        correct = np.bincount(te["labels"][hit], minlength=self.k)
        total = np.bincount(te["labels"], minlength=self.k)
        return {**u_r_accuracy(correct, total, self.forget), "acc": float(hit.mean())}

    def lira(self, name: str, refs: list[str]) -> dict[str, Any] | None:
        """Offline LiRA of model ``name`` on U-train vs U-test with the retrained references ``refs`` (not itself)."""
        refs = [r for r in refs if r != name and r in self.phi]
        if not refs:
            return None
        res = lira_offline(
            self.phi[name][0],
            self.phi[name][1],
            np.stack([self.phi[r][0] for r in refs]),
            np.stack([self.phi[r][1] for r in refs]),
            n_boot=self.args.n_boot,
        )
        res.pop("scores_in")
        res.pop("scores_out")
        return {**res, "references": refs}


def metrics_of(tests: dict[str, Any]) -> dict[str, float | None]:
    """The flat scalars of one model's tests: what the tables, t-intervals and noise floors are made of."""
    acc, probe, la, fa = tests["accuracy"], tests["probe"], tests["loss_attack"], tests["feature_attack"]
    lira = tests.get("lira") or {}
    return {
        "r_acc": acc["r_acc"],
        "u_acc": acc["u_acc"],
        "rounds_to_quality": tests.get("rounds_to_quality"),
        "probe_auc": probe["auc"],
        "probe_gap": probe.get("auc_minus_control"),
        "relearn_steps": float(tests["relearn"]["steps"]),
        "mia_power": la["retained_power"]["accuracy"],
        "mia_forget_auc": la["forget"]["auc"],
        "lira_auc": lira.get("auc"),
        "lira_tpr": lira.get("tpr_at_fpr"),
        "feat_power_auc": fa["retained_power"]["auc"],
        "feat_forget_auc": fa["forget"]["auc"],
        "kl_to_retrain": tests.get("kl_to_retrain"),
        "max_class_diff": tests.get("max_class_diff"),
    }


def distances_to_refs(class_acc: list[float], ref_accs: dict[str, list[float]], skip: str | None) -> dict[str, Any]:
    """Mean KL(reference || model) and max class-wise gap over the retrained references (leaving out ``skip``)."""
    comps = [compare_class_accuracy(class_acc, r) for n, r in ref_accs.items() if n != skip]
    if not comps:
        return {"kl_to_retrain": None, "max_class_diff": None}
    return {
        "kl_to_retrain": float(np.mean([c["kl_to_reference"] for c in comps])),
        "max_class_diff": float(np.mean([c["max_class_acc_diff"] for c in comps])),
    }


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    forget = sorted(set(_ints(args.forget)))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    specs = {m: parse_method(m, args.prune_ratio) for m in methods}
    seeds = _ints(args.seeds)
    ftag = "+".join(map(str, forget))
    stem = f"{args.setting}_f{ftag}{('_' + args.tag) if args.tag else ''}"
    out_dir = Path(args.out)
    arrays_dir = None if args.no_arrays else out_dir / "arrays" / stem
    scfg = originals.SETTINGS[args.setting]

    log(f"setting {args.setting}: loading data and models (forget {forget})")
    data = originals.setting_data(args.setting, args.data_root)
    if any(not 0 <= c < data["num_classes"] for c in forget):
        raise SystemExit(f"--forget must name classes in 0..{data['num_classes'] - 1}")
    models = load_models(args, forget)
    ref_names = [n for n in models if n.startswith("retrain_")]
    fed = Federation(data["x"], data["y"], data["parts"], data["num_classes"])
    sets = build_sets(data["y"].numpy(), data["yt"].numpy(), forget, args)
    ev = Evaluator(data, forget, sets, args, arrays_dir)

    report: dict[str, Any] = {
        "generated_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([os.path.relpath(__file__, REPO_ROOT)] + (argv or sys.argv[1:])),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "setting": args.setting,
        "forget": forget,
        "class_names": [data["classes"][c] for c in forget],
        "seeds": seeds,
        "methods": methods,
        "config": {k: v for k, v in vars(args).items()},
        "setting_config": scfg,
        "sets": {k: int(v.size) for k, v in vars(sets).items() if isinstance(v, np.ndarray)},
        "models": {},
        "runs": {},
        "complete": False,
    }
    stem_path = out_dir / stem
    earlier = _resumable_runs(stem_path.with_suffix(".json"), report["config"]) if args.resume else {}

    def save(final: bool = False) -> None:
        report["wall_s"] = time.perf_counter() - T_START
        report["complete"] = final
        summarise(report, ref_names)
        write_json(stem_path.with_suffix(".json"), report)
        title = f"# Forgetting benchmark: {args.setting}, forget {forget} ({', '.join(report['class_names'])})"
        rel = _project_path(stem_path.with_suffix(".json"))
        _io.write_text(stem_path.with_suffix(".md"), "\n".join([title, "", *markdown(report, rel)]) + "\n")

    # -- references: the original and every retrained model
    for name, rec in models.items():
        log(f"testing {name} ({rec['json']['test']['acc']:.4f} test accuracy when made)")
        tests = ev.run(name, rec["model"], seed=int(rec["json"]["seed"]))  # relearn batch order varies as for methods
        report["models"][name] = {
            "kind": rec["json"]["kind"],
            "seed": rec["json"]["seed"],
            "checkpoint": rec["json"]["checkpoint"],
            "test_acc": tests["accuracy"]["acc"],
            "train_subset_acc": rec["json"]["train_subset"]["acc"],
            "training_cost": rec["json"]["cost"],
            "tests": tests,
        }
        save()
    ref_accs = {n: report["models"][n]["tests"]["accuracy"]["class_acc"] for n in ref_names}
    for name in models:
        t = report["models"][name]["tests"]
        t["lira"] = ev.lira(name, ref_names)
        t.update(distances_to_refs(t["accuracy"]["class_acc"], ref_accs, name))
    r_target = float(np.mean([report["models"][n]["tests"]["accuracy"]["r_acc"] for n in ref_names])) - 0.01
    report["quality_target"] = {
        "r_acc_at_least": r_target,
        "u_acc_at_most": 0.01,
        "test_images": int(data["yt"].numel()),
    }
    save()

    # -- methods x seeds, every one with the same fine-tune budget
    original = models["original"]["model"]
    xt, yt = data["xt"], data["yt"]

    def full_test_curve(m: torch.nn.Module, _r: int) -> dict[str, Any]:
        c, t = class_correct_total(m, TensorBatches(xt, yt, 1024), data["num_classes"])
        a = u_r_accuracy(c, t, forget)
        return {"u_acc": a["u_acc"], "r_acc": a["r_acc"]}

    for method in methods:
        for seed in seeds:
            name = f"{method}_s{seed}"
            if name in earlier:
                log(f"method {method}, seed {seed}: kept from the interrupted run")
                report["runs"][name] = earlier[name]
                continue
            log(f"method {method}, seed {seed}")
            c0 = time.process_time()
            meter = CostMeter()
            participants = fed.sample_sites(-1, scfg["fed"]["clients_per_round"], seed)
            spec = specs[method]
            prep = prepare_method(
                spec.prepare,
                original,
                fed,
                forget,
                participants,
                meter,
                seed=seed,
                prune_opts=PruneOptions(plan=PlanOptions(prune_ratio=spec.ratio or args.prune_ratio)),
                fisher_images_per_site=args.fisher_images,
                fisher_alphas=[float(v) for v in args.fisher_alphas.split(",")],
                fisher_max_r_drop=args.fisher_max_r_drop,
            )
            model = prep.model
            after = full_test_curve(model, 0)
            ft = FedConfig(**{**scfg["fed"], "rounds": args.ft_rounds, "lr": args.ft_lr, "seed": seed})
            teacher = original if spec.objective.needs_teacher else None
            site_loss = site_objectives(spec.objective, fed, forget, teacher, batch_size=ft.batch_size, seed=seed)
            hist = run_fedavg(
                model,
                fed,
                ft,
                drop_classes=forget,
                meter=meter,
                eval_fn=full_test_curve,
                phase="finetune",
                site_loss=site_loss,
            )
            rq = next(
                (h["round"] for h in hist if h["r_acc"] >= r_target and (h["u_acc"] or 0.0) <= 0.01),
                None,
            )
            cpu_train = time.process_time() - c0  # prepare + fine-tune + the per-round full-test curve
            log(f"  R {hist[-1]['r_acc']:.4f} U {hist[-1]['u_acc']:.4f}, rounds to quality {rq}; testing")
            tests = ev.run(name, model, seed=seed)
            tests["lira"] = ev.lira(name, ref_names)
            tests.update(distances_to_refs(tests["accuracy"]["class_acc"], ref_accs, None))
            tests["rounds_to_quality"] = rq
            info = {k: v for k, v in prep.info.items() if k != "plan"}
            report["runs"][name] = {
                "method": method,
                "prepare_method": spec.prepare,
                "objective": spec.objective.to_dict(),
                "prune_ratio": spec.ratio,
                "seed": seed,
                "participants": participants,
                "prepare": info,
                "after_prepare": after,
                "finetune_config": ft.to_dict(),
                "history": hist,
                "cost": meter.snapshot(),
                "cpu_seconds": {"prepare_finetune_curve": cpu_train, "tests": tests["test_cpu_seconds"]},
                "params": tests["params"],
                "state_bytes": state_bytes(model),
                "tests": tests,
            }
            save()
    save(final=True)
    log(f"done: {stem_path.with_suffix('.json')}")
    return report


def _resumable_runs(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The finished method runs of an earlier report at ``path`` made with the same configuration (else none).

    The method list is not part of the comparison: every method x seed run is seeded on its own and tested against the
    same references, so a run kept from a longer list is the run the shorter list would have made."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    ignore = {"resume", "methods"}
    if {k: v for k, v in old["config"].items() if k not in ignore} != {
        k: v for k, v in config.items() if k not in ignore
    }:
        raise SystemExit(f"--resume: {path} was made with another configuration; move it away or drop --resume")
    log(f"--resume: {path.name} has {len(old['runs'])} finished method run(s); those of the listed methods are kept")
    return old["runs"]


# ------------------------------------------------------------------------------------------------- summary
def summarise(report: dict[str, Any], ref_names: list[str]) -> None:
    """Noise floors, per-method t-intervals, differences to retraining and paired differences to fine-tune-only."""
    refs = [report["models"][n] for n in ref_names if n in report["models"]]
    ref_metrics = [metrics_of(r["tests"]) for r in refs]
    floors: dict[str, Any] = {}
    for key, (_label, kind) in METRICS.items():
        vals = [m[key] for m in ref_metrics]
        if kind == "distance":  # each reference's value is already its distance to the other references
            v = [x for x in vals if x is not None]
            floors[key] = {"kind": kind, "values": v, "max_abs_diff": max(v) if v else None}
        else:
            floors[key] = {"kind": kind, **noise_floor(vals)}
    report["noise_floor"] = floors
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    for r in report["runs"].values():
        by_method.setdefault(r["method"], {})[r["seed"]] = metrics_of(r["tests"])
    summary: dict[str, Any] = {}
    ref_mean = {k: t_interval([m[k] for m in ref_metrics])["mean"] for k in METRICS}
    base = by_method.get("finetune", {})
    for method, per_seed in by_method.items():
        seeds = sorted(per_seed)
        entry: dict[str, Any] = {"seeds": seeds}
        for key in METRICS:
            vals = [per_seed[s][key] for s in seeds]
            e = {"values": vals, **t_interval(vals)}
            if METRICS[key][1] == "level" and ref_mean[key] is not None and e["mean"] is not None:
                e["minus_retrain"] = e["mean"] - ref_mean[key]
                fl = floors[key].get("max_abs_diff")
                e["within_floor"] = None if fl is None else bool(abs(e["minus_retrain"]) <= fl)
            elif METRICS[key][1] == "distance" and e["mean"] is not None:
                fl = floors[key].get("max_abs_diff")
                e["within_floor"] = None if fl is None else bool(e["mean"] <= fl)
            if method != "finetune" and base:
                common = [s for s in seeds if s in base]
                e["minus_finetune"] = paired_difference(
                    [per_seed[s][key] for s in common], [base[s][key] for s in common]
                )
            entry[key] = e
        summary[method] = entry
    report["summary"] = summary
    report["reference_summary"] = {k: t_interval([m[k] for m in ref_metrics]) for k in METRICS}
    orig = report["models"].get("original")
    if orig is not None:
        la = orig["tests"]["loss_attack"]["retained_power"]
        report["attack_power"] = {
            "loss_attack_retained_accuracy": la["accuracy"],
            "loss_attack_retained_auc": [la["auc"], la["low"], la["high"]],
            "feature_attack_retained_auc": orig["tests"]["feature_attack"]["retained_power"]["auc"],
            "reaches_0.60": bool(la["accuracy"] >= 0.60),
            "lira_original": {
                k: (orig["tests"].get("lira") or {}).get(k) for k in ("auc", "low", "high", "tpr_at_fpr", "n_refs")
            },
        }


# ------------------------------------------------------------------------------------------------ markdown
def _f(v: Any, digits: int = 3, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.{max(0, digits - 2)}f}" if pct else f"{v:.{digits}f}"


def _ci(e: dict[str, Any], digits: int = 3, pct: bool = False) -> str:
    """mean [low, high] (t-interval over seeds), or the mean alone with one seed."""
    if e.get("mean") is None:
        return "n/a" + (f" ({e['missing']} not reached)" if e.get("missing") else "")
    s = _f(e["mean"], digits, pct)
    if e.get("low") is not None:
        s += f" [{_f(e['low'], digits, pct)}, {_f(e['high'], digits, pct)}]"
    if e.get("missing"):
        s += f" ({e['missing']} n/a)"
    return s


HEADLINE = (
    ("r_acc", 4, True),
    ("u_acc", 4, True),
    ("rounds_to_quality", 1, False),
    ("probe_auc", 3, False),
    ("probe_gap", 3, False),
    ("relearn_steps", 1, False),
    ("mia_forget_auc", 3, False),
    ("lira_auc", 3, False),
    ("lira_tpr", 3, False),
    ("feat_forget_auc", 3, False),
    ("kl_to_retrain", 4, False),
)


def _project_path(path: Path) -> str:
    """``path`` relative to the project folder holding it (a worktree writing into another checkout names the file as
    that checkout will), else to this one."""
    path = path.resolve()
    root = next((p for p in path.parents if (p / "pyproject.toml").is_file()), REPO_ROOT)
    return os.path.relpath(path, root)


def provenance(report: dict[str, Any], path: str) -> list[str]:
    m = report["machine"]
    return [
        f"- Command: `{report['command']}`",
        f"- Machine: CPU ({m['cpu_count']} cores, shared with other jobs: the CPU seconds in the Budget table are the "
        f"steadier cost), {m['platform']}, {m['threads']} torch thread(s), torch {m['torch']}; generated "
        f"{report['generated_utc']}; {'complete' if report.get('complete') else 'INCOMPLETE'} run, "
        f"{report['wall_s']:.0f} s wall ({report['wall_s'] / 60:.1f} min).",
        f"- Files: `{path}` (+ `.md`, per-example arrays under `arrays/`).",
        "",
    ]


def models_table(report: dict[str, Any]) -> list[str]:
    """The original and the retrained references: what every method is measured against."""
    lines = [
        "| model | test acc (all classes) | R acc | U acc | train-subset acc | training rounds | training wall s "
        "| checkpoint SHA-256 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        a = m["tests"]["accuracy"]
        lines.append(
            f"| {name} | {_f(m['test_acc'], 4, True)} | {_f(a['r_acc'], 4, True)} | {_f(a['u_acc'], 4, True)} "
            f"| {_f(m['train_subset_acc'], 4, True)} | {m['training_cost']['rounds']} "
            f"| {m['training_cost']['wall_s_total']:.0f} | `{m['checkpoint']['sha256'][:12]}…` |"
        )
    return lines + [""]


def headline_table(report: dict[str, Any]) -> list[str]:
    """Every model's metrics with t-intervals over seeds, the retrain-vs-retrain floor as the last row."""
    labels = [METRICS[k][0] for k, _, _ in HEADLINE]
    lines = ["| model | n | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for name, m in report["models"].items():
        mt = metrics_of(m["tests"])
        lines.append(f"| {name} | 1 | " + " | ".join(_f(mt[k], d, p) for k, d, p in HEADLINE) + " |")
    ref = report.get("reference_summary")
    if ref:
        lines.append(
            f"| *retrain (references)* | {ref['r_acc']['n']} | "
            + " | ".join(_ci(ref[k], d, p) for k, d, p in HEADLINE)
            + " |"
        )
    for method, e in report.get("summary", {}).items():
        lines.append(
            f"| **{method}** | {len(e['seeds'])} | " + " | ".join(_ci(e[k], d, p) for k, d, p in HEADLINE) + " |"
        )
    fl = report.get("noise_floor", {})
    lines.append(
        "| *noise floor: max \\|Δ\\| retrain vs retrain* | "
        + str(fl.get("r_acc", {}).get("n", 0))
        + " | "
        + " | ".join(_f(fl.get(k, {}).get("max_abs_diff"), d, p) for k, d, p in HEADLINE)
        + " |"
    )
    return lines + [""]


def versus_table(report: dict[str, Any]) -> list[str]:
    """Per metric: each method minus the retrained references' mean against the noise floor; then each method minus
    fine-tune-only, paired by seed."""
    keys = [k for k, _, _ in HEADLINE if k != "rounds_to_quality"]
    summary = report.get("summary", {})
    methods = list(summary)
    fl = report.get("noise_floor", {})
    lines = [
        "| metric | noise floor (max \\|Δ\\| retrain vs retrain) | "
        + " | ".join(f"{m} − retrain" for m in methods)
        + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for k in keys:
        cells = []
        for m in methods:
            e = summary[m][k]
            d = e.get("minus_retrain") if METRICS[k][1] == "level" else e.get("mean")
            mark = "" if e.get("within_floor") is None else (" ✓" if e["within_floor"] else " ✗")
            cells.append(f"{_f(d, 4)}{mark}")
        lines.append(f"| {METRICS[k][0]} | {_f(fl.get(k, {}).get('max_abs_diff'), 4)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "✓ = within the noise floor (for KL and class gap, which are distances already: the method's mean distance "
        "to the references is no larger than the references' distance to each other), ✗ = outside it.",
        "",
    ]
    others = [m for m in methods if m != "finetune"]
    if "finetune" in summary and others:
        lines += [
            "| metric | " + " | ".join(f"{m} − finetune (paired, mean [95 % t-interval])" for m in others) + " |",
            "|---|" + "---|" * len(others),
        ]
        for k in keys:
            cells = [_ci(summary[m][k].get("minus_finetune") or {}, 4) for m in others]
            lines.append(f"| {METRICS[k][0]} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def attacks_table(report: dict[str, Any]) -> list[str]:
    """Attack power on retained members and each attack on the forget class, with bootstrap intervals."""
    lines = [
        "| model | loss attack power on R (acc) | loss attack AUC on R [95 % CI] | feature attack AUC on R "
        "| loss attack AUC on U | loss TPR@1%FPR on U | LiRA AUC on U [95 % CI] | LiRA TPR@1%FPR on U "
        "| feature attack AUC on U [95 % CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(n, m["tests"]) for n, m in report["models"].items()] + [(n, r["tests"]) for n, r in report["runs"].items()]
    for name, t in rows:
        la, fa, li = t["loss_attack"], t["feature_attack"], t.get("lira") or {}
        rp = la["retained_power"]

        def ci(d: dict[str, Any]) -> str:
            return "n/a" if not d else f"{d['auc']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

        lines.append(
            f"| {name} | {rp['accuracy']:.3f} | {ci(rp)} | {ci(fa['retained_power'])} | {ci(la['forget'])} "
            f"| {la['forget']['tpr_at_fpr']:.3f} | {ci(li)} | {_f(li.get('tpr_at_fpr'))} | {ci(fa['forget'])} |"
        )
    return lines + [""]


def relearn_table(report: dict[str, Any], steps: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 20, 50)) -> list[str]:
    """Forget-class accuracy on held-out images after k relearn steps (from the stored 1-step curves)."""
    lines = [
        "| model | steps to target | " + " | ".join(f"acc after {k}" for k in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    rows = [(n, m["tests"]) for n, m in report["models"].items()] + [(n, r["tests"]) for n, r in report["runs"].items()]
    for name, t in rows:
        rl = t["relearn"]
        curve = dict((int(s), a) for s, a in rl["curve"])
        last = max(curve)
        cells = [
            _f(curve[k], 3) if k in curve else ("(reached)" if rl["reached"] and k > last else "n/a") for k in steps
        ]
        lines.append(f"| {name} | {'' if rl['reached'] else '>'}{rl['steps']} | " + " | ".join(cells) + " |")
    return lines + [""]


def fisher_table(report: dict[str, Any]) -> list[str]:
    """Fisher's alpha sweep on retained data (per seed) and the alpha it chose."""
    lines = ["| run | base R (sites' retained images) | alpha → R after noise | chosen alpha | within budget |"]
    lines.append("|---|---|---|---|---|")
    for name, r in report["runs"].items():
        tune = (r.get("prepare") or {}).get("alpha_tuning")
        if not tune:
            continue
        sweep = ", ".join(f"{e['alpha']:.0e}: {100 * e['r_acc']:.1f}" for e in tune["sweep"])
        lines.append(
            f"| {name} | {100 * tune['base_r_acc']:.1f} | {sweep} | {tune['alpha']:.0e} | {tune['within_budget']} |"
        )
    return lines + [""]


def budget_table(report: dict[str, Any]) -> list[str]:
    """Every method's fine-tune budget (equal by construction) and what it cost."""
    lines = [
        "| run | fine-tune rounds | lr | MB moved | wall s (charged) | after prepare R / U |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        c, ft, ap = r["cost"], r["finetune_config"], r["after_prepare"]
        lines.append(
            f"| {name} | {len(r['history'])} | {ft['lr']} | {c['bytes_total'] / 1e6:.2f} | {c['wall_s_total']:.1f} "
            f"| {_f(ap['r_acc'], 4, True)} / {_f(ap['u_acc'], 4, True)} |"
        )
    return lines + [""]


# Issue 13's goal: U <= 1 %, R >= retrain - 0.5 points, probe / relearn / attack within retraining's noise floor, at
# <= 1/8 of retraining's rounds. One definition, read by the goal table.
GOAL_U_AT_MOST = 0.01
GOAL_R_MINUS_RETRAIN_AT_LEAST = -0.005
GOAL_ROUNDS_FRACTION = 1 / 8
GOAL_FLOOR_METRICS = (
    ("probe_auc", "probe AUC"),
    ("relearn_steps", "relearn steps"),
    ("mia_forget_auc", "loss attack AUC (U)"),
)
# Config keys that make two runs' numbers comparable (the rest say which methods and seeds ran, and where).
_COMPARABLE = (
    "original_seed", "ft_rounds", "ft_lr", "prune_ratio", "r_sample_n", "probe_train_n", "relearn_forget_n",
    "relearn_retain_n", "relearn_lr", "relearn_batch", "relearn_max_steps", "relearn_eval_n", "relearn_target",
)  # fmt: skip


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    shas = {n: m["checkpoint"]["sha256"] for n, m in report["models"].items()}
    return {
        "setting": report["setting"],
        "forget": report["forget"],
        "models": shas,
        **{k: report["config"].get(k) for k in _COMPARABLE},
    }


def goal_table(reports: dict[str, dict[str, Any]]) -> list[str]:
    """Every method of every run on one forget set (``{run name: report}``) against issue 13's goal, best first.

    Runs are pooled only when they share the original, the references (by SHA-256) and the budget; otherwise the
    comparison would be unfair, so ``ValueError``. Each verdict reads the run's own summary against its own floor.
    """
    if not reports:
        raise ValueError("goal_table needs at least one forgetting_benchmark.py report")
    first_name, first = next(iter(reports.items()))
    want = _comparable(first)
    for name, rep in reports.items():
        got = _comparable(rep)
        diff = sorted(k for k in want if got[k] != want[k])
        if diff:
            raise ValueError(f"runs {first_name!r} and {name!r} are not comparable: they differ in {diff}")
    ref = first["reference_summary"]
    fl = {k: first["noise_floor"].get(k, {}).get("max_abs_diff") for k, _ in GOAL_FLOOR_METRICS}
    orig = metrics_of(first["models"]["original"]["tests"])
    refs = [n for n, m in first["models"].items() if m["kind"] == "retrain"]
    budget = first["models"][refs[0]]["training_cost"]["rounds"] * GOAL_ROUNDS_FRACTION
    rows = []
    for run, rep in reports.items():
        for method, e in rep["summary"].items():
            marks: list[bool | None] = []

            def cell(ok: bool | None, text: str, marks: list[bool | None] = marks) -> str:
                marks.append(ok)
                return text + {True: " ✓", False: " ✗", None: " (no floor)"}[ok]

            u = e["u_acc"]["mean"]
            dr = e["r_acc"].get("minus_retrain")
            cells = [
                cell(u is not None and u <= GOAL_U_AT_MOST, _f(u, 4, True)),
                cell(
                    dr is not None and dr >= GOAL_R_MINUS_RETRAIN_AT_LEAST, "n/a" if dr is None else f"{100 * dr:+.2f}"
                ),
            ]
            closed = []
            for key, _ in GOAL_FLOOR_METRICS:
                d = e[key].get("minus_retrain")
                digits = 1 if key == "relearn_steps" else 3
                cells.append(cell(e[key].get("within_floor"), f"{_f(e[key]['mean'], digits)} ({d:+.{digits}f})"))
                gap = ref[key]["mean"] - orig[key]
                closed.append((e[key]["mean"] - orig[key]) / gap if abs(gap) > (fl[key] or 0.0) else None)  # else none
            rq = e["rounds_to_quality"]
            reached = [v for v in rq["values"] if v is not None]
            if len(reached) == len(rq["values"]):
                cells.append(cell(max(reached) <= budget, _f(rq["mean"], 1)))
            else:
                cells.append(cell(False, f"not reached in {len(rq['values']) - len(reached)} of {len(rq['values'])}"))
            met = sum(m is True for m in marks)
            shares = [c for c in closed if c is not None]
            mean_closed = float(np.mean(shares)) if shares else float("-inf")
            rows.append(
                (
                    -met,
                    -mean_closed,
                    len(rows),
                    f"| **{method}** | {run} | {len(e['seeds'])} | "
                    + " | ".join(cells)
                    + " | "
                    + " / ".join("n/a" if c is None else f"{100 * c:.0f} %" for c in closed)
                    + f" | {met} of {len(marks)} |",
                )
            )
    fmt = {k: 1 if k == "relearn_steps" else 3 for k in fl}
    lines = [
        f"Original: {', '.join(f'{label} {_f(orig[k], fmt[k])}' for k, label in GOAL_FLOOR_METRICS)}. "
        f"Retraining ({len(refs)} reference{'s' if len(refs) != 1 else ''}): R {_f(ref['r_acc']['mean'], 4, True)} %, "
        + ", ".join(f"{label} {_f(ref[k]['mean'], fmt[k])}" for k, label in GOAL_FLOOR_METRICS)
        + ". Noise floor (max |Δ| retrain vs retrain): "
        + ", ".join(f"{label} {_f(fl[k], fmt[k])}" for k, label in GOAL_FLOOR_METRICS)
        + f". Goal (✓ met, ✗ not): U ≤ {100 * GOAL_U_AT_MOST:.0f} %, R ≥ retrain − "
        f"{-100 * GOAL_R_MINUS_RETRAIN_AT_LEAST:.1f} points, each test within the floor of retraining (cell: the "
        f"method's mean, then minus retrain), and R ≥ retrain − 1 point with U ≤ 1 % within {budget:g} rounds (1/8 of "
        "retraining's). *Gap closed*: how far each test moved from the original toward retraining (100 % = there, "
        "above = past it, below 0 = away; n/a where the original is within the floor of retraining, so that test "
        "has nothing to close). Every run here shares the original, the references and the fine-tune budget.",
        "",
        "| method | run | seeds | U acc % | R − retrain (points) | "
        + " | ".join(label for _, label in GOAL_FLOOR_METRICS)
        + " | rounds to quality | gap closed (probe / relearn / attack) | goals met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return lines + [r for *_, r in sorted(rows)] + [""]


def default_rule(sets: dict[str, dict[str, dict[str, Any]]]) -> tuple[list[str], str | None]:
    """The rule behind the job's default method (``options.measured_defaults``), read from the runs.

    ``sets``: ``{forget-set label: {run name: report}}``. A method is eligible when it reaches U <= 1 % on every
    set (a model that still answers the class has not forgotten it); the winner is the eligible method with the
    least R lost against retraining, averaged over the sets. Returns (markdown table, winner or None).
    """
    labels = list(sets)
    cells: dict[str, dict[str, tuple[float, float | None]]] = {}
    for label, reports in sets.items():
        for rep in reports.values():
            for method, e in rep["summary"].items():
                cells.setdefault(method, {})[label] = (e["u_acc"]["mean"], e["r_acc"].get("minus_retrain"))
    rows = []
    for method, by_set in cells.items():
        complete = len(by_set) == len(labels) and all(d is not None for _u, d in by_set.values())
        ok = complete and all(u <= GOAL_U_AT_MOST for u, _d in by_set.values())
        mean_dr = float(np.mean([by_set[lb][1] for lb in labels])) if complete else None
        u_cells = " / ".join(
            "not run" if lb not in by_set else
            f"{'✓' if by_set[lb][0] <= GOAL_U_AT_MOST else '✗'} {_f(by_set[lb][0], 4, True)}" for lb in labels
        )  # fmt: skip
        r_cells = " / ".join(
            "not run" if lb not in by_set or by_set[lb][1] is None else f"{100 * by_set[lb][1]:+.2f}" for lb in labels
        )
        mean = "n/a" if mean_dr is None else f"{100 * mean_dr:+.2f}"
        rows.append((not ok, -(mean_dr if mean_dr is not None else -1e9), method, ok, u_cells, r_cells, mean))
    rows.sort()
    winner = rows[0][2] if rows and rows[0][3] else None
    lines = [
        f"Sets: {', '.join(labels)} (goal tables above; each cell a mean over seeds). Eligible: U ≤ "
        f"{100 * GOAL_U_AT_MOST:.0f} % on every set; the default is the eligible method with the least mean R lost "
        f"against retraining: **{winner or 'none'}**.",
        "",
        f"| method | U acc % ({' / '.join(labels)}) | R − retrain, points ({' / '.join(labels)}) | mean R − retrain "
        "| eligible |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| **{m}** | {u} | {r} | {mean} | {'yes' if ok else 'no'} |" for _a, _b, m, ok, u, r, mean in rows]
    return lines + [""], winner


def markdown(report: dict[str, Any], path: str | None = None, level: int = 2) -> list[str]:
    """The report's tables under headings of ``level`` (the docs page nests them deeper), without a title."""
    path = path or f"benchmarks/results/forgetting/{report['setting']}_f{'+'.join(map(str, report['forget']))}.json"
    h = "#" * level
    return [
        *provenance(report, path),
        f"{h} Original and retrained references",
        "",
        *models_table(report),
        f"{h} Headline (mean [95 % t-interval] over seeds; one row per reference model)",
        "",
        *headline_table(report),
        f"{h} Distance to retraining (against the noise floor) and to fine-tune-only (paired)",
        "",
        *versus_table(report),
        f"{h} Membership attacks: power on retained members, signal on the forget class",
        "",
        *attacks_table(report),
        f"{h} Relearn curves (forget-class test accuracy after every step)",
        "",
        *relearn_table(report),
        f"{h} Fisher's alpha (tuned on retained data only)",
        "",
        *fisher_table(report),
        f"{h} Budget (every method: the same fine-tune rounds and lr)",
        "",
        *budget_table(report),
    ]


if __name__ == "__main__":
    main()
