"""The model's structure as torch-pruning sees it: which Conv2d output channels are tied, traced once per call.

Every structural question (coupled groups, what a group removes, conv widths) goes through torch-pruning's
``DependencyGraph``; nothing here knows any particular architecture.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn as nn
import torch_pruning as tp

from nvflare_unlearn.models.registry import INPUT_SHAPE_ATTR, example_input

if TYPE_CHECKING:
    from nvflare_unlearn.method.plan import PruningPlan


def resolve_example_inputs(model: nn.Module, example_inputs: torch.Tensor | None, plan: PruningPlan | None = None):
    """Example batch for tracing, on the model's device: explicit > the model's registry shape > the plan's shape."""
    if example_inputs is not None:
        if not isinstance(example_inputs, torch.Tensor):
            raise ValueError(f"example_inputs must be a tensor batch, got {type(example_inputs).__name__}")
        x = example_inputs
    elif getattr(model, INPUT_SHAPE_ATTR, None) is None and plan is not None and plan.input_shape:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((1, *plan.input_shape), generator=gen)
    else:
        x = example_input(model)
    first = next(model.parameters(), None)
    return x.to(first.device) if first is not None else x


def build_dependency_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` itself (not a copy) in eval mode with autograd on; restores every module's train flag.

    Tracing in train mode would update BatchNorm running statistics, and torch-pruning needs autograd.
    """
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    x = example_inputs.detach().to(device).clone().requires_grad_(True)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    finally:
        for m, training in modes.items():
            m.train(training)


def conv_modules(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def group_members(dg: tp.DependencyGraph, group: Any, names: Mapping[nn.Module, str]) -> tuple[list[str], bool]:
    """Conv2d whose output channels a torch-pruning group removes, and whether it also removes Linear outputs."""
    members, touches_classifier = [], False
    for dep, _ in group:
        target = dep.target.module
        if dg.is_out_channel_pruning_fn(dep.handler):
            if isinstance(target, nn.Conv2d):
                members.append(names[target])
            elif isinstance(target, nn.Linear):
                touches_classifier = True
    return members, touches_classifier


def _coupled_groups_on(model: nn.Module, dg: tp.DependencyGraph) -> list[list[str]]:
    convs = conv_modules(model)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer: there are no channels to prune")
    order = {name: i for i, name in enumerate(convs)}
    names = {m: n for n, m in model.named_modules()}
    groups, seen = [], set()
    for name, conv in convs.items():
        if name in seen:
            continue
        if conv.groups != 1:
            raise ValueError(f"layer {name!r} is a grouped/depthwise conv (groups={conv.groups}); not supported")
        if conv not in dg.module2node:
            seen.add(name)  # not reached by the forward pass: nothing to prune
            continue
        g = dg.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)))
        members, touches_classifier = group_members(dg, g, names)
        members = sorted(set(members) | {name}, key=order.__getitem__)
        seen.update(members)
        if touches_classifier:
            continue  # the classifier keeps every class output: such channels are not prunable
        widths = {convs[m].out_channels for m in members}
        if len(widths) != 1:
            raise ValueError(f"coupled convs {members} have different widths {sorted(widths)}")
        groups.append(members)
    return groups


def coupled_groups(model: nn.Module, example_inputs: torch.Tensor | None = None) -> list[list[str]]:
    """Groups of Conv2d names whose output channels are tied, in model order (traced on a deepcopy)."""
    convs = conv_modules(model)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer: there are no channels to prune")
    x = resolve_example_inputs(model, example_inputs)
    clone = copy.deepcopy(model)
    return _coupled_groups_on(clone, build_dependency_graph(clone, x))


def conv_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d by ``named_modules()`` name: the shapes a valid activation report has."""
    return {name: int(m.out_channels) for name, m in conv_modules(model).items()}
