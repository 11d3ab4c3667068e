"""What the robustness and privacy experiments share (``benchmarks.robustness_privacy``): plans from class means,
their overlap, U / R accuracy, and per-image activations turned into the reports a site would send."""

from __future__ import annotations

import numpy as np
import torch

from nvflare_unlearn.evaluation import class_correct_total, train_epochs, u_r_accuracy
from nvflare_unlearn.method.activations import ClassActivationReport, collect_class_activations
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.method.selection import build_pruning_plan
from nvflare_unlearn.method.tfidf import tfidf_scores
from nvflare_unlearn.options import AGGREGATIONS
from nvflare_unlearn.protect.privacy import (
    clip_activations,
)
from nvflare_unlearn.runtime.batches import TensorBatches

K = 10


METHODS = AGGREGATIONS


def jaccard(a: set, b: set) -> float:
    """|A n B| / |A u B| of two pruned-channel sets (1.0 when both are empty)."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def pruned_set(plan: PruningPlan) -> set[tuple[str, int]]:
    return {(key, int(i)) for key, idxs in plan.pruned_units().items() for i in idxs}


def make_plan(model: torch.nn.Module, means: dict[str, np.ndarray], forget: int, ratio: float) -> PruningPlan:
    return build_pruning_plan(model, tfidf_scores(means, forget), ratio, forget_class=forget)


def u_r(model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor], forget: int) -> tuple[float, float]:
    correct, total = class_correct_total(model, TensorBatches(*test, 512), K)
    acc = u_r_accuracy(correct, total, forget)
    return float(acc["u_acc"]), float(acc["r_acc"])


def per_image_activations(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Layer -> [N, C]: each image's pooled activations, from the core collector itself.

    Each image is given its own "class" (labels 0..n-1 of an n-class report), so a class row of the report is one
    image's activation vector: one batched pass instead of one call per image (the model is in eval mode, so the
    batch does not change any image's activations).
    """
    rows: dict[str, list[np.ndarray]] = {}
    for start in range(0, x.shape[0], 256):
        xb = x[start : start + 256]
        rep = collect_class_activations(model, [(xb, torch.arange(xb.shape[0]))], max(2, xb.shape[0]))
        for name in rep.layer_order:
            rows.setdefault(name, []).append(np.asarray(rep.sums[name][: xb.shape[0]], dtype=np.float64))
    return {name: np.concatenate(v) for name, v in rows.items()}


def report_from_images(acts: dict[str, np.ndarray], y: np.ndarray, clip: float | None) -> ClassActivationReport:
    """Per-class sums of (optionally clipped) per-image activations: what a clipping collector would send."""
    counts = np.bincount(y, minlength=K).astype(np.int64)
    sums = {}
    for name, a in acts.items():
        a = clip_activations(a, clip) if clip is not None else a
        s = np.zeros((K, a.shape[1]))
        np.add.at(s, y, a)
        sums[name] = s
    return ClassActivationReport(sums, counts, "conv", list(acts))


def finetune_eval(pruned, train, test, forget, epochs, lr, seed) -> tuple[float, float]:
    """U/R accuracy after ``epochs`` of SGD on the retained classes (modifies ``pruned``)."""
    keep = train[1] != forget
    torch.manual_seed(seed)
    train_epochs(pruned, TensorBatches(train[0][keep], train[1][keep], 64, shuffle=True, seed=seed), epochs, lr)
    return u_r(pruned, test, forget)


def per_layer(plans: list[PruningPlan]) -> dict[str, float]:
    """Mean number of channels each coupled group loses over ``plans`` (where a plan puts its cuts)."""
    keys = plans[0].group_keys
    return {k: float(np.mean([len(p.pruned_units()[k]) for p in plans])) for k in keys}


def summarize(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "std": float(a.std())}
