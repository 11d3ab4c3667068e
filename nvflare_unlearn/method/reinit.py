"""Re-initialising what the forget classes used, instead of removing it: channels chosen by a plan, classifier rows.

``prune_mode="reinit"`` keeps the model's shapes: the channels the TF-IDF step chose get fresh filters (BatchNorm
reset, consumers' input slices silenced) and fine-tuning can grow new features there, while what the old filters
encoded is gone. ``reset_rows`` re-draws the forget classes' classifier rows (the output-level part of forgetting).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.method.prune import MASK_ATTR, apply_pruning_plan
from nvflare_unlearn.models import example_input

__all__ = ["reinitialise_channels", "reset_classifier_rows"]


def _classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


def reset_classifier_rows(model: nn.Module, forget_classes: int | Iterable[int], seed: int = 0) -> nn.Module:
    """Re-draw the forget classes' output rows and biases from nn.Linear's default init (in place).

    The output-level foil: the class's logit loses its trained weights, the features stay exactly as they were.
    """
    _, fc = _classifier(model)
    if isinstance(forget_classes, (int, np.integer)):
        forget_classes = [forget_classes]
    forget = [int(c) for c in forget_classes]
    if not forget:
        raise ValueError("forget_classes must name at least one class")
    if max(forget) >= fc.out_features:
        raise ValueError(f"forget class {max(forget)} is not an output of a {fc.out_features}-class classifier")
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / float(np.sqrt(fc.in_features))
    with torch.no_grad():
        for c in forget:
            w = (torch.rand(fc.in_features, generator=gen) * 2 - 1) * bound
            fc.weight[c].copy_(w.to(fc.weight))
            if fc.bias is not None:
                fc.bias[c] = float((torch.rand((), generator=gen) * 2 - 1) * bound)
    return model


def _bn_after_convs(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Conv name -> name of the BatchNorm2d that consumes its output directly (found by tensor identity)."""
    outputs: dict[int, str] = {}
    found: dict[str, str] = {}
    handles = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda _m, _i, o, n=n: outputs.__setitem__(id(o), n)))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(
                m.register_forward_pre_hook(
                    lambda _m, i, n=n: found.__setitem__(outputs[id(i[0])], n) if id(i[0]) in outputs else None
                )
            )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


def reinitialise_channels(model: nn.Module, plan: PruningPlan, seed: int = 0) -> nn.Module:
    """Instead of removing the plan's channels (unpruned model), give them a fresh start (in place).

    The chosen conv filters are re-drawn (Kaiming normal, fan-in), their BatchNorm affine and running statistics
    reset, and every consumer's input slice for them zeroed (exactly the slices torch-pruning would remove, taken
    from a mask-mode application of the plan). The model keeps its width, so fine-tuning can grow NEW features
    there, while what the old filters encoded about the forget class is gone.
    """
    masked = apply_pruning_plan(copy.deepcopy(model), plan, mode="mask")
    entries = getattr(masked, MASK_ATTR)["entries"]
    pruned = plan.pruned_channels()
    dev = next(model.parameters()).device
    bn_of = _bn_after_convs(model, example_input(model, 2).to(dev))
    modules = dict(model.named_modules())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for mname, pname, dim, idx in entries:  # consumers' input slices (and everything else masked): silence
            if dim == 1:
                getattr(modules[mname], pname).index_fill_(1, torch.tensor(idx, device=dev), 0.0)
        for conv_name, idx in pruned.items():
            if not idx:
                continue
            conv = modules[conv_name]
            fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
            std = float(np.sqrt(2.0 / fan_in))
            t = torch.tensor(idx, device=dev)
            fresh = torch.randn((len(idx), *conv.weight.shape[1:]), generator=gen) * std
            conv.weight.index_copy_(0, t, fresh.to(conv.weight))
            if conv.bias is not None:
                conv.bias.index_fill_(0, t, 0.0)
            bn = modules.get(bn_of.get(conv_name, ""), None)
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.index_fill_(0, t, 1.0)
                bn.bias.index_fill_(0, t, 0.0)
                bn.running_mean.index_fill_(0, t, 0.0)
                bn.running_var.index_fill_(0, t, 1.0)
    return model
