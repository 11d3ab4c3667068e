"""Relearn time: how many optimizer steps until the forgotten class comes back.

A model that only hides a class (its features still encode it) relearns it in a few steps; a model that
never knew it (retrained from scratch) needs many. Steps, not epochs, under ONE fixed protocol (the same
small forget-class set mixed with retained data, fixed lr and batch, fixed seed) for every model compared.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from nvflare_unlearn.runtime.batches import TensorBatches, as_tensors
from nvflare_unlearn.runtime.training import train_epochs

__all__ = ["relearn_steps"]


class _Reached(Exception):
    """Raised from the step hook to stop training at the first evaluation that meets the target."""


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for s in range(0, x.shape[0], batch_size):
            correct += int((model(x[s : s + batch_size]).argmax(1) == y[s : s + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / max(1, x.shape[0])


def relearn_steps(
    model: nn.Module,
    forget_ds: Any,
    retain_ds: Any,
    target_acc: float = 0.5,
    lr: float = 0.01,
    batch_size: int = 64,
    max_steps: int = 300,
    seed: int = 0,
    *,
    eval_ds: Any = None,
    eval_every: int = 1,
) -> dict[str, Any]:
    """Steps of SGD on `forget_ds` + `retain_ds` (shuffled together) until accuracy on `eval_ds` >= target.

    `eval_ds` should be held-out forget-class images (default: `forget_ds` itself). Accuracy is checked at
    step 0 and every `eval_every` steps (default: after every step, so two methods that differ by one step are
    told apart), and `curve` holds every check as (step, accuracy); if the target is never met,
    `steps == max_steps` and `reached` is False (a censored count). Works on a deepcopy: `model` is untouched.
    """
    if not 0.0 < target_acc <= 1.0:
        raise ValueError(f"target_acc must be in (0, 1], got {target_acc}")
    if max_steps < 1 or eval_every < 1 or batch_size < 1:
        raise ValueError("max_steps, eval_every and batch_size must be >= 1")
    dev = next(model.parameters()).device
    xf, yf = as_tensors(forget_ds, dev)
    xr, yr = as_tensors(retain_ds, dev)
    xe, ye = as_tensors(eval_ds if eval_ds is not None else forget_ds, dev)
    if xf.shape[0] == 0 or xe.shape[0] == 0:
        raise ValueError("forget_ds and eval_ds must not be empty")
    work = copy.deepcopy(model)
    torch.manual_seed(seed)  # dropout etc., if any; batch order has its own generator
    batches = TensorBatches(torch.cat([xf, xr]), torch.cat([yf, yr]), batch_size, shuffle=True, seed=seed)
    curve: list[tuple[int, float]] = [(0, _accuracy(work, xe, ye))]
    state = {"steps": 0}
    if curve[0][1] >= target_acc:
        return {"steps": 0, "reached": True, "target_acc": target_acc, "max_steps": max_steps, "curve": curve}

    def after_step(m: nn.Module) -> None:
        state["steps"] += 1
        if state["steps"] % eval_every == 0 or state["steps"] == max_steps:
            acc = _accuracy(m, xe, ye)
            curve.append((state["steps"], acc))
            if acc >= target_acc:
                raise _Reached

    epochs = -(-max_steps // len(batches))
    reached = False
    try:
        train_epochs(work, batches, epochs=epochs, lr=lr, max_steps=max_steps, after_step=after_step)
    except _Reached:
        reached = True
    return {
        "steps": state["steps"] if reached else max_steps,
        "reached": reached,
        "target_acc": target_acc,
        "max_steps": max_steps,
        "final_acc": curve[-1][1],
        "curve": curve,
    }
