"""Accuracy against a retrained reference (the paper's Table 5): the largest class-wise accuracy gap and
KL(reference || model); the per-class counts themselves are what a job runs (``runtime.accuracy``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from torch import nn

from nvflare_unlearn.runtime.accuracy import class_correct_total, u_r_accuracy
from nvflare_unlearn.runtime.batches import TensorBatches, as_tensors

__all__ = ["accuracy_report", "class_distribution_kl", "compare_class_accuracy"]


def class_distribution_kl(
    p: Sequence[float | None] | np.ndarray, q: Sequence[float | None] | np.ndarray, eps: float = 1e-12
) -> float:
    """KL(p || q) between two class-wise accuracy vectors, each normalised to a distribution (paper Table 5).

    `eps` smooths zero entries (a forgotten class reads 0) so the result is finite; None entries (classes
    without samples) are not allowed because the two distributions would then cover different classes.
    """
    if any(v is None for v in p) or any(v is None for v in q):
        raise ValueError("class accuracies contain None (a class with no samples); evaluate on every class")
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.ndim != 1 or p.shape != q.shape or p.size == 0:
        raise ValueError(f"p and q must be non-empty 1-D arrays of equal length, got {p.shape}, {q.shape}")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))) or np.any(p < 0) or np.any(q < 0):
        raise ValueError("p and q must be finite and non-negative")
    p = (p + eps) / (p + eps).sum()
    q = (q + eps) / (q + eps).sum()
    return float(np.sum(p * np.log(p / q)))


def compare_class_accuracy(class_acc: Sequence[float], reference_class_acc: Sequence[float]) -> dict[str, float]:
    """Paper Table 5: max |class-wise accuracy difference| and KL(reference || model) over all classes."""
    a, r = np.asarray(class_acc, dtype=float), np.asarray(reference_class_acc, dtype=float)
    if a.shape != r.shape:
        raise ValueError(f"class accuracy vectors differ in length: {a.shape} vs {r.shape}")
    return {
        "max_class_acc_diff": float(np.max(np.abs(a - r))),
        "kl_to_reference": class_distribution_kl(r, a),
    }


def accuracy_report(
    model: nn.Module,
    test_data: Any,
    num_classes: int,
    forget_classes: int | Iterable[int],
    reference_class_acc: Sequence[float] | None = None,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """{u_acc, r_acc, class_acc[, max_class_acc_diff, kl_to_reference]} on `test_data` (fractions in [0, 1])."""
    dev = next(model.parameters()).device
    x, y = as_tensors(test_data, dev)
    # metrics counts on the CPU; labels stay there, images go to the model's device
    batches = ((xb, yb.cpu()) for xb, yb in TensorBatches(x, y, batch_size))
    correct, total = class_correct_total(model, batches, num_classes, device=dev)
    out: dict[str, Any] = u_r_accuracy(correct, total, forget_classes)
    if reference_class_acc is not None:
        out.update(compare_class_accuracy(out["class_acc"], reference_class_acc))
    return out
