"""The forgetting benchmark's tests and statistics (``benchmarks.forgetting_benchmark``): the fixed test sets, every
per-model test (accuracy, probe, relearn, membership attacks, LiRA, distance to the references) and the summary
over seeds against the retrain-vs-retrain noise floor."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.harness import forget_split, picker, probe_controls, subset_or_all
from nvflare_unlearn.evaluation import compare_class_accuracy, relearn_steps, u_r_accuracy
from nvflare_unlearn.evaluation.artifacts import per_example_arrays, save_arrays
from nvflare_unlearn.evaluation.membership import (
    feature_membership_attack,
    lira_offline,
    logit_confidence,
    loss_attack_power,
    membership_auc,
)
from nvflare_unlearn.evaluation.probe import linear_probe_features
from nvflare_unlearn.evaluation.stats import noise_floor, paired_difference, t_interval

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
    """The fixed sets of a run, drawn from one seed: every model is tested on the same images."""
    pick = picker(np.random.default_rng(12345))
    (u_tr, r_tr), (u_te, r_te) = forget_split(y, forget), forget_split(yt, forget)
    n_r = min(args.r_sample_n, r_tr.size, r_te.size)
    r_train, r_test, probe = pick(r_tr, n_r), pick(r_te, n_r), subset_or_all(y, args.probe_train_n, seed=7)
    relearn = [pick(idx, n) for idx, n in ((u_tr, args.relearn_forget_n), (r_tr, args.relearn_retain_n))]
    return Sets(u_tr, u_te, r_train, r_test, probe, *relearn, relearn_eval=pick(u_te, args.relearn_eval_n))


class Evaluator:
    """Runs the per-model tests; keeps what the cross-model tests (LiRA, KL to references) need."""

    def __init__(self, data: dict[str, Any], forget: list[int], sets: Sets, args: argparse.Namespace, arrays_dir):
        self.d, self.forget, self.sets, self.args = data, forget, sets, args
        self.k = data["num_classes"]
        self.arrays_dir = arrays_dir
        self.phi: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # model -> LiRA statistic on (U-train, U-test)
        self.controls = probe_controls(self.k, forget)
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
