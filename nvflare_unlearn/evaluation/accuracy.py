"""U-set / R-set / class-wise accuracy and the distance of the class-wise distribution to a reference model.

Thin wrapper over `nvflare_unlearn.metrics` (the counts every site would report) that adds the paper's
Table 5 numbers against the retrained model: the largest class-wise accuracy gap and KL(reference || model).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from torch import nn

from ..metrics import class_correct_total, class_distribution_kl, u_r_accuracy
from .data import TensorBatches, as_tensors

__all__ = ["accuracy_report", "compare_class_accuracy"]


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

