"""Per-class accuracy: the numbers every unlearning claim rests on (U-set, R-set, class-wise accuracy).

Sites report per-class correct/total counts rather than accuracies, so the server can sum them exactly across
sites before dividing; ``accuracy_report`` adds the paper's Table 5 numbers against the retrained model (the
largest class-wise accuracy gap and KL(reference || model)).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from nvflare_unlearn._validation import check_num_classes
from nvflare_unlearn.runtime.batches import TensorBatches, as_tensors
from nvflare_unlearn.runtime.device import model_device

__all__ = [
    "accuracy_report",
    "class_correct_total",
    "class_distribution_kl",
    "compare_class_accuracy",
    "evaluate_accuracy",
    "u_r_accuracy",
]


@torch.no_grad()
def class_correct_total(
    model: nn.Module, loader: Iterable, num_classes: int, device: torch.device | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(correct[K], total[K]) int64 over `loader`'s (x, y) batches, in eval mode; the model's mode is restored.

    `device` defaults to where the model already is, so evaluation never moves a model behind the caller's back.
    """
    k = check_num_classes(num_classes)
    device = torch.device(device) if device is not None else model_device(model)
    correct = torch.zeros(k, dtype=torch.int64)
    total = torch.zeros(k, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        for x, y in loader:
            y = torch.as_tensor(y, dtype=torch.int64).cpu()  # counts live on the CPU whatever the device
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
                raise ValueError(f"labels must lie in 0..{k - 1}, got min {int(y.min())}, max {int(y.max())}")
            logits = model(x.to(device))
            if logits.ndim != 2 or logits.shape[1] < k:
                raise ValueError(f"model output shape {tuple(logits.shape)} does not cover {k} classes")
            pred = logits.argmax(dim=1).cpu()
            total += torch.bincount(y, minlength=k)
            correct += torch.bincount(y[pred == y], minlength=k)
    finally:
        model.train(was_training)
    return correct.numpy(), total.numpy()


def _ratio(c: int, t: int) -> float | None:
    return None if t == 0 else float(c) / float(t)


def u_r_accuracy(
    correct: Sequence[int] | np.ndarray, total: Sequence[int] | np.ndarray, forget_classes: int | Iterable[int]
) -> dict:
    """{u_acc, r_acc, class_acc}: accuracy on the forget classes (U), on the rest (R), and per class.

    Fractions in [0, 1]; a set with no samples gives None (never NaN), so reports stay valid JSON.
    """
    correct = np.asarray(correct, dtype=np.int64)
    total = np.asarray(total, dtype=np.int64)
    if correct.ndim != 1 or correct.shape != total.shape:
        raise ValueError(f"correct and total must be 1-D arrays of equal length, got {correct.shape}, {total.shape}")
    if np.any(total < 0) or np.any(correct < 0) or np.any(correct > total):
        raise ValueError("counts must satisfy 0 <= correct <= total for every class")
    k = correct.size
    ids = [forget_classes] if isinstance(forget_classes, (int, np.integer)) else list(forget_classes)
    for c in ids:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) < k:
            raise ValueError(f"unknown forget class id {c!r}: valid ids are 0..{k - 1}")
    u = np.zeros(k, dtype=bool)
    u[[int(c) for c in ids]] = True
    return {
        "u_acc": _ratio(int(correct[u].sum()), int(total[u].sum())),
        "r_acc": _ratio(int(correct[~u].sum()), int(total[~u].sum())),
        "class_acc": [_ratio(int(c), int(t)) for c, t in zip(correct, total)],
    }


def evaluate_accuracy(
    model: nn.Module, loader: DataLoader | Iterable, device: torch.device | str | None = None
) -> float | None:
    """Top-1 accuracy over `loader` (fraction), None when it holds no samples."""
    device = torch.device(device) if device is not None else model_device(model)
    correct = total = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in loader:
                y = torch.as_tensor(y, dtype=torch.int64)
                pred = model(x.to(device)).argmax(dim=1).cpu()
                correct += int((pred == y).sum())
                total += int(y.numel())
    finally:
        model.train(was_training)
    return _ratio(correct, total)


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
