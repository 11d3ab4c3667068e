"""Apply a PruningPlan: physical removal through torch-pruning groups, or masks that keep shapes.

"remove" changes the given model IN PLACE (modules are edited; the same object is returned): rebuild any optimizer
afterwards, its parameters are new tensors. Replaying the same plan on a fresh model from the same factory yields
the same architecture, so pruned weights load into it and give identical outputs.

"mask" keeps every shape and state_dict key (for pipelines such as FedAvg weight exchange that cannot change
shapes): every parameter slice torch-pruning's group would cut (conv out weights/bias, BatchNorm weight/bias, the
consumers' input slices) is zeroed, gradient hooks zero those gradient slices so optimizers (SGD with momentum and
weight decay, Adam) leave them at zero, and a forward pre-hook re-zeroes them if anything wrote into them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.utils.weak import WeakIdKeyDictionary

from nvflare_unlearn.method.graph import (
    analyse_structure,
    build_dependency_graph,
    conv_modules,
    group_members,
    group_problem,
    is_depthwise,
    output_shapes,
    resolve_example_inputs,
)
from nvflare_unlearn.method.plan import PruningPlan

APPLY_MODES = ("remove", "mask")  # how a plan is applied; the job's prune_mode adds "reinit" (method.reinit)
MASK_ATTR = "_nvflare_unlearn_masks"  # on the root model: the plan (a PruningPlan copy) and every masked slice
SLICES_ATTR = "_nvflare_unlearn_mask_slices"  # on each masked module: what its forward pre-hook re-zeroes


def _check_plan(plan: PruningPlan) -> PruningPlan:
    """Plans are parsed once, where their text enters (``PruningPlan.from_json``, ``plan.parse_plan``); text
    reaching here is a caller that skipped that step, so it is refused rather than parsed again."""
    if not isinstance(plan, PruningPlan):
        raise ValueError(
            f"plan must be a PruningPlan, got {type(plan).__name__} (parse JSON text once where it enters, with "
            "PruningPlan.from_json)"
        )
    return plan


def _applied_steps(model: nn.Module, plan: PruningPlan) -> int:
    """How many of the plan's steps the model already went through, judged by its conv widths."""
    convs = conv_modules(model)
    missing = [n for n in plan.convs if n not in convs]
    if missing:
        raise ValueError(f"the plan names layer(s) {missing} that are not Conv2d layers of this model")
    actual = {n: convs[n].out_channels for n in plan.convs}
    for s in range(len(plan.steps), -1, -1):
        if plan.widths(s) == actual:
            return s
    diff = {n: (actual[n], plan.convs[n]) for n in plan.convs if actual[n] != plan.convs[n]}
    raise ValueError(
        "the model's conv widths match neither the plan's original architecture nor any of its steps "
        f"(layer: (actual, original) for some layers: {dict(list(diff.items())[:5])}); was the plan made for "
        f"{plan.model_name or 'another model'}?"
    )


def _groups_to_prune(model: nn.Module, plan: PruningPlan, done: int) -> dict[str, list[int]]:
    """Group key -> CURRENT channel indices still to remove, given the model went through ``done`` steps."""
    todo_total = plan.pruned_units()
    done_units = plan.pruned_units(done)
    out = {}
    for key in plan.group_keys:
        remaining = sorted(set(todo_total[key]) - set(done_units[key]))
        if not remaining:
            continue
        kept = [c for c in range(plan.convs[key]) if c not in set(done_units[key])]
        position = {orig: cur for cur, orig in enumerate(kept)}
        out[key] = [position[c] for c in remaining]
    return out


def _checked_group(
    dg: Any, plan: PruningPlan, key: str, idxs: list[int], convs: dict[str, nn.Conv2d], names: dict[nn.Module, str]
) -> Any:
    """The torch-pruning group removing ``idxs`` of group ``key``, after checking it is the plan's coupling and safe."""
    group = dg.get_pruning_group(convs[key], _prune_out_fn(), idxs)
    members = group_members(dg, group, names)
    expected = next(g for g in plan.groups if g[0] == key)
    if sorted(set(members)) != sorted(expected):
        raise ValueError(
            f"the model couples layer {key!r} with {sorted(set(members))}, the plan expects {sorted(expected)}: "
            "the plan was made for a different architecture"
        )
    problem = group_problem(dg, group, names)
    if problem is not None:
        raise ValueError(f"the plan removes channels of {expected} that cannot be removed safely: {problem}")
    if not dg.check_pruning_group(group):
        raise ValueError(f"applying the plan would empty layer(s) {expected}")
    return group


def _restore(model: nn.Module, backup: nn.Module) -> None:
    """Put every module of ``model`` back into the state of its copy ``backup`` (same module objects kept)."""
    live = dict(model.named_modules())
    for name, saved in backup.named_modules():
        target = live[name]
        state = {k: v for k, v in vars(saved).items() if k != "_modules"}
        for k in [k for k in vars(target) if k != "_modules" and k not in state]:
            del target.__dict__[k]
        target.__dict__.update(state)


def _prune_out_fn():
    return tp.prune_conv_out_channels


def apply_pruning_plan(
    model: nn.Module,
    plan: PruningPlan,
    mode: str = "remove",
    *,
    example_inputs: torch.Tensor | None = None,
) -> nn.Module:
    """Apply ``plan`` to ``model`` (in place) and return it.

    The model may be unpruned or already pruned by a prefix of the plan's steps (detected from its widths); only
    the missing steps are applied, so applying a composed multi-class plan after its first steps is safe.
    ``mode="mask"`` needs an unpruned model. Raises ValueError for a plan naming a missing layer, widths that do
    not match, a coupling that differs from the plan, or a plan that would empty a layer.
    """
    plan = _check_plan(plan)
    if mode not in APPLY_MODES:
        raise ValueError(
            f"mode must be one of {list(APPLY_MODES)}, got {mode!r} (prune_mode='reinit' re-initialises the chosen "
            "channels with method.reinit.reinitialise_channels instead of applying the plan)"
        )
    done = _applied_steps(model, plan)
    if mode == "mask":
        if done != 0:
            raise ValueError("mask mode needs the unpruned model (this one already had channels removed)")
        return _apply_masks(model, plan, example_inputs)
    previous = masked_plan(model)
    if previous is not None:  # masked -> removed: the masks must be part of what is removed
        now = plan.pruned_channels()
        if any(not set(v).issubset(now.get(k, [])) for k, v in previous.pruned_channels().items()):
            raise ValueError("the model is masked with channels this plan keeps; remove with the masking plan")
    todo = _groups_to_prune(model, plan, done)
    if not todo:
        if previous is not None:
            _clear_masks(model)
        return model
    x = resolve_example_inputs(model, example_inputs, plan)
    backup = copy.deepcopy(model)  # any failure below puts the model back as it was
    try:
        if previous is not None:
            _clear_masks(model)
        before = output_shapes(model, x)
        dg = build_dependency_graph(model, x)
        convs, names = conv_modules(model), {m: n for n, m in model.named_modules()}
        for key, idxs in todo.items():  # one group at a time: a concat's offsets move with every group removed
            _checked_group(dg, plan, key, idxs, convs, names).prune()
        try:
            after = output_shapes(model, x)
        except Exception as exc:  # noqa: BLE001 - a broken forward pass is reported as a bad plan
            raise ValueError(f"the plan breaks the model's forward pass ({type(exc).__name__}: {exc})") from None
        if after != before:
            raise ValueError(f"the plan changes the model's output shapes ({before} -> {after})")
    except BaseException:
        _restore(model, backup)
        raise
    return model


# -------------------------------------------------------------------------------------------------------- masks
def _slices_of(dg: Any, group: Any, names: dict[nn.Module, str]) -> list[tuple[str, str, int, list[int]]]:
    """(module name, parameter name, dim, indices) for every parameter slice the group would remove."""
    out = []
    for dep, idxs in group:
        module = dep.target.module
        if not isinstance(module, nn.Module) or not any(True for _ in module.parameters(recurse=False)):
            continue  # functional nodes (add, relu, flatten) hold no parameters
        is_out = dg.is_out_channel_pruning_fn(dep.handler)
        is_in = dg.is_in_channel_pruning_fn(dep.handler)
        idx = sorted(int(i) for i in idxs)
        name = names[module]
        if isinstance(module, nn.BatchNorm2d):
            out += [(name, p, 0, idx) for p in ("weight", "bias") if getattr(module, p, None) is not None]
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            if isinstance(module, nn.Conv2d) and module.groups != 1 and not is_depthwise(module):
                raise ValueError(f"mask mode does not support grouped conv {name!r} (groups={module.groups})")
            if is_out or is_depthwise(module):  # a depthwise conv's input channel c is its output channel c
                out.append((name, "weight", 0, idx))
                if module.bias is not None:
                    out.append((name, "bias", 0, idx))
            elif is_in:
                out.append((name, "weight", 1, idx))
        else:
            raise ValueError(f"mask mode cannot mask layer {name!r} of type {type(module).__name__}")
    return out


# Gradient hooks live on Parameter objects, which deepcopy does not carry over; the forward pre-hook (which deepcopy
# does carry) therefore (re)registers them on whatever Parameter object the module holds, once per object.
_GRAD_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


class _Slice:
    """One masked slice: parameter name, dim, indices (cached per device so hooks do no host work per step)."""

    def __init__(self, pname: str, dim: int, idx: list[int]) -> None:
        self.pname, self.dim, self.key = pname, dim, (dim, tuple(idx))
        self.active = True  # cleared by _clear_masks: hooks that cannot be removed turn into no-ops
        self._idx = {torch.device("cpu"): torch.tensor(idx, dtype=torch.long)}

    def idx(self, device: torch.device) -> torch.Tensor:
        if device not in self._idx:
            self._idx[device] = self._idx[torch.device("cpu")].to(device)
        return self._idx[device]


def _zero_grad_slice(sl: _Slice):
    def hook(grad: torch.Tensor) -> torch.Tensor | None:
        return grad.index_fill(sl.dim, sl.idx(grad.device), 0.0) if sl.active else None

    return hook


def _ensure_grad_hook(param: torch.Tensor, sl: _Slice) -> None:
    done = _GRAD_HOOKED.get(param)
    if done is None:
        done = set()
        _GRAD_HOOKED[param] = done
    if sl.key not in done and param.requires_grad:
        param.register_hook(_zero_grad_slice(sl))
        done.add(sl.key)


def _mask_pre_hook(module: nn.Module, _args: Any) -> None:
    """Registered once per masked module. Reads the slices from the module itself (not a closure) so a deep copy
    masks its own parameters, and clearing the attribute disables it."""
    slices = getattr(module, SLICES_ATTR, None)
    if not slices:
        return
    with torch.no_grad():
        for sl in slices:
            p = getattr(module, sl.pname)
            i = sl.idx(p.device)
            _ensure_grad_hook(p, sl)
            if p.index_select(sl.dim, i).any():
                p.index_fill_(sl.dim, i, 0.0)


def _clear_masks(model: nn.Module) -> None:
    """Turn mask mode off (before physical removal): hooks stay registered but do nothing."""
    for m in model.modules():
        for sl in getattr(m, SLICES_ATTR, None) or []:
            sl.active = False
        if hasattr(m, SLICES_ATTR):
            setattr(m, SLICES_ATTR, [])
    if hasattr(model, MASK_ATTR):
        delattr(model, MASK_ATTR)


def _merge(entries: list[tuple[str, str, int, list[int]]]) -> dict[tuple[str, str, int], set[int]]:
    merged: dict[tuple[str, str, int], set[int]] = {}
    for mname, pname, dim, idx in entries:
        merged.setdefault((mname, pname, dim), set()).update(int(i) for i in idx)
    return merged


def _apply_masks(model: nn.Module, plan: PruningPlan, example_inputs: torch.Tensor | None) -> nn.Module:
    previous = getattr(model, MASK_ATTR, None)
    old = _merge(previous["entries"]) if previous else {}
    if previous:
        before = previous["plan"].pruned_channels()
        now = plan.pruned_channels()
        if any(not set(v).issubset(now.get(k, [])) for k, v in before.items()):
            raise ValueError(
                "the model is already masked with a plan that removes channels this plan keeps; "
                "mask a fresh model instead (masks only ever grow, e.g. by composing plans)"
            )
    units = {k: v for k, v in plan.pruned_units().items() if v}
    entries: list[tuple[str, str, int, list[int]]] = []
    if units:
        x = resolve_example_inputs(model, example_inputs, plan)
        dg = build_dependency_graph(model, x)
        names = {m: n for n, m in model.named_modules()}
        convs = conv_modules(model)
        for key, idxs in units.items():
            entries += _slices_of(dg, _checked_group(dg, plan, key, idxs, convs, names), names)
    merged = _merge(entries)
    setattr(
        model,
        MASK_ATTR,
        {"plan": copy.deepcopy(plan), "entries": [(m, p, d, sorted(i)) for (m, p, d), i in merged.items()]},
    )
    modules = dict(model.named_modules())
    per_module: dict[str, list[_Slice]] = {}
    for (mname, pname, dim), idx in merged.items():
        new = sorted(idx - old.get((mname, pname, dim), set()))
        if new:
            sl = _Slice(pname, dim, new)
            per_module.setdefault(mname, []).append(sl)
            _ensure_grad_hook(getattr(modules[mname], pname), sl)
    for mname, slices in per_module.items():
        module = modules[mname]
        if not hasattr(module, SLICES_ATTR):
            setattr(module, SLICES_ATTR, [])
            module.register_forward_pre_hook(_mask_pre_hook)
        getattr(module, SLICES_ATTR).extend(slices)
    enforce_masks(model)
    return model


def enforce_masks(model: nn.Module) -> nn.Module:
    """Re-zero every masked slice (call after ``load_state_dict``); a model without masks is returned unchanged."""
    record = getattr(model, MASK_ATTR, None)
    if not record:
        return model
    modules = dict(model.named_modules())
    with torch.no_grad():
        for mname, pname, dim, idx in record["entries"]:
            if mname not in modules:
                raise ValueError(f"masked layer {mname!r} no longer exists in the model")
            p = getattr(modules[mname], pname)
            p.index_fill_(dim, torch.tensor(idx, dtype=torch.long, device=p.device), 0.0)
    return model


def masked_plan(model: nn.Module) -> PruningPlan | None:
    """The plan a model was masked with (mask mode), or None."""
    record = getattr(model, MASK_ATTR, None)
    return copy.deepcopy(record["plan"]) if record else None


def plan_summary(plan: PruningPlan, model: nn.Module, example_inputs: torch.Tensor | None = None) -> dict[str, Any]:
    """Channels pruned per layer, the convs left out (name -> why), and params/FLOPs before and after, for
    ``model`` (pruned by ``plan`` or not).

    ``model`` is not modified: the "after" figures come from a copy with the plan's remaining steps applied.
    """
    plan = _check_plan(plan)
    x = resolve_example_inputs(model, example_inputs, plan)
    after_model = apply_pruning_plan(copy.deepcopy(model), plan, mode="remove", example_inputs=x)
    flops_after, params_after = tp.utils.count_ops_and_params(after_model, x)
    pruned = plan.pruned_channels()
    return {
        "model_name": plan.model_name,
        "forget_classes": plan.forget_classes,
        "layers": {
            n: {"original": plan.convs[n], "pruned": len(pruned[n]), "kept": plan.convs[n] - len(pruned[n])}
            for n in pruned
        },
        "excluded": dict(plan.excluded) if plan.excluded is not None else analyse_structure(model, x).excluded,
        "units_total": sum(plan.convs[k] for k in plan.group_keys),
        "units_pruned": sum(len(v) for v in plan.pruned_units().values()),
        "params_before": plan.original_params,
        "params_after": int(params_after),
        "flops_before": plan.original_flops,
        "flops_after": int(flops_after),
    }
