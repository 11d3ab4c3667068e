"""Per-class accuracy: the numbers every unlearning claim rests on (U-set, R-set, class-wise accuracy).

Sites report per-class correct/total counts rather than accuracies, so the server can sum them exactly across
sites before dividing (the paper's Table 5 numbers against a retrained model are ``evaluation.accuracy``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from nvflare_unlearn._validation import check_num_classes
from nvflare_unlearn.runtime.device import model_device

__all__ = ["class_correct_total", "evaluate_accuracy", "u_r_accuracy"]


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
