"""Pruning plans: which coupled conv channels to remove, by ORIGINAL channel index, as replayable JSON.

A pruning unit is (coupled group, channel). A coupled group is the set of Conv2d whose output channels are tied
(through residual additions, found by torch-pruning's DependencyGraph); removing channel c of one member removes
channel c of all. Its score is the mean of the members' TF-IDF scores for c, so a group is pruned on purpose,
never as a side effect. See docs/method.md for the selection rules.
"""

from __future__ import annotations

import copy
import json
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from ._validation import check_choice, check_ratio
from .models.registry import INPUT_SHAPE_ATTR, example_input, model_name_of

SCOPES = ("global", "per_layer")
DIRECTIONS = ("highest", "lowest")
_FORMAT = "nvflare_unlearn.pruning_plan"
_VERSION = 1


# --------------------------------------------------------------------------------------------------- graph helpers
def resolve_example_inputs(model: nn.Module, example_inputs: torch.Tensor | None, plan: "PruningPlan | None" = None):
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


# ------------------------------------------------------------------------------------------------------- the plan
def _int_list(values: Any, what: str) -> list[int]:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{what} must be a list of channel indices")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{what} holds a non-integer index {v!r}")
        out.append(int(v))
    return out


@dataclass
class PruningPlan:
    """Ordered pruning steps on one architecture; every index is an ORIGINAL (unpruned) channel index.

    ``convs``: original out-channels of every prunable conv (the architecture fingerprint);
    ``groups``: coupled conv names, the first is the group's key; ``steps``: one per forget class, each with
    ``pruned`` = group key -> original channel indices, and the options that chose them.
    """

    convs: dict[str, int]
    groups: list[list[str]]
    steps: list[dict[str, Any]] = field(default_factory=list)
    model_name: str | None = None
    input_shape: list[int] | None = None
    original_params: int | None = None
    original_flops: int | None = None

    def __post_init__(self) -> None:
        self._validate()

    # -- structure -----------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        if not isinstance(self.convs, Mapping) or not self.convs:
            raise ValueError("plan 'convs' must map conv names to their original widths")
        for name, width in self.convs.items():
            if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
                raise ValueError(f"plan: conv {name!r} has invalid width {width!r}")
        if not isinstance(self.groups, list) or not all(isinstance(g, list) and g for g in self.groups):
            raise ValueError("plan 'groups' must be a list of non-empty lists of conv names")
        seen: set[str] = set()
        for g in self.groups:
            for name in g:
                if name not in self.convs:
                    raise ValueError(f"plan group {g} names conv {name!r} missing from the plan's convs")
                if name in seen:
                    raise ValueError(f"plan: conv {name!r} appears in two groups")
                seen.add(name)
            if len({self.convs[n] for n in g}) != 1:
                raise ValueError(f"plan group {g} mixes convs of different widths")
        keys = {g[0] for g in self.groups}
        pruned_so_far: dict[str, set[int]] = {k: set() for k in keys}
        for i, step in enumerate(self.steps):
            if not isinstance(step, Mapping) or not isinstance(step.get("pruned"), Mapping):
                raise ValueError(f"plan step {i} must be a dict with a 'pruned' mapping")
            for key, idxs in step["pruned"].items():
                if key not in keys:
                    raise ValueError(f"plan step {i} prunes unknown group {key!r}")
                idxs = _int_list(idxs, f"plan step {i}, group {key!r}")
                width = self.convs[key]
                bad = [c for c in idxs if not 0 <= c < width]
                if bad:
                    raise ValueError(f"plan step {i}, group {key!r}: indices {bad} outside [0, {width})")
                dup = pruned_so_far[key].intersection(idxs)
                if dup or len(set(idxs)) != len(idxs):
                    raise ValueError(f"plan step {i}, group {key!r}: channels {sorted(dup) or idxs} pruned twice")
                pruned_so_far[key].update(idxs)
                if len(pruned_so_far[key]) >= width:
                    raise ValueError(
                        f"plan would empty layer(s) {self._group_of(key)}: all {width} channels pruned by step {i}"
                    )

    def _group_of(self, key: str) -> list[str]:
        return next(g for g in self.groups if g[0] == key)

    @property
    def group_keys(self) -> list[str]:
        return [g[0] for g in self.groups]

    @property
    def forget_classes(self) -> list[Any]:
        return [s.get("forget_class") for s in self.steps]

    def fingerprint(self) -> dict[str, Any]:
        return {"convs": dict(self.convs), "groups": [list(g) for g in self.groups]}

    def pruned_units(self, num_steps: int | None = None) -> dict[str, list[int]]:
        """Group key -> sorted original channel indices removed by the first ``num_steps`` steps (all by default)."""
        steps = self.steps if num_steps is None else self.steps[:num_steps]
        out: dict[str, set[int]] = {k: set() for k in self.group_keys}
        for s in steps:
            for key, idxs in s["pruned"].items():
                out[key].update(int(i) for i in idxs)
        return {k: sorted(v) for k, v in out.items()}

    def pruned_channels(self, num_steps: int | None = None) -> dict[str, list[int]]:
        """Conv name -> sorted ORIGINAL output-channel indices removed (every member of a group lists the same)."""
        units = self.pruned_units(num_steps)
        return {name: list(units[g[0]]) for g in self.groups for name in g}

    def kept_channels(self, num_steps: int | None = None) -> dict[str, list[int]]:
        """Conv name -> ORIGINAL indices still present; position in this list = current channel index."""
        pruned = self.pruned_channels(num_steps)
        return {n: [c for c in range(self.convs[n]) if c not in set(pruned[n])] for n in pruned}

    def widths(self, num_steps: int | None = None) -> dict[str, int]:
        """Conv name -> width after the first ``num_steps`` steps."""
        pruned = self.pruned_channels(num_steps)
        return {n: self.convs[n] - len(pruned.get(n, [])) for n in self.convs}

    def compose(self, other: "PruningPlan") -> "PruningPlan":
        """This plan's steps followed by ``other``'s (same architecture; no channel removed twice)."""
        if not isinstance(other, PruningPlan):
            raise ValueError(f"can only compose with a PruningPlan, got {type(other).__name__}")
        if other.fingerprint() != self.fingerprint():
            raise ValueError("cannot compose plans made for different architectures (convs/groups differ)")
        return PruningPlan(
            convs=dict(self.convs),
            groups=[list(g) for g in self.groups],
            steps=copy.deepcopy(self.steps) + copy.deepcopy(other.steps),
            model_name=self.model_name or other.model_name,
            input_shape=self.input_shape or other.input_shape,
            original_params=self.original_params,
            original_flops=self.original_flops,
        )

    # -- JSON ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "model_name": self.model_name,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "original_params": self.original_params,
            "original_flops": self.original_flops,
            "convs": dict(self.convs),
            "groups": [list(g) for g in self.groups],
            "steps": [
                {**{k: v for k, v in s.items() if k != "pruned"},
                 "pruned": {k: sorted(int(i) for i in v) for k, v in s["pruned"].items()}}
                for s in self.steps
            ],
        }

    def to_json(self, indent: int | None = None) -> str:
        """JSON text (never pickle): safe to ship in FLModel.meta and to store next to weights."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruningPlan":
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError("not a pruning plan (missing format 'nvflare_unlearn.pruning_plan')")
        if data.get("version") != _VERSION:
            raise ValueError(f"unsupported pruning plan version {data.get('version')!r} (this code reads {_VERSION})")
        for key in ("convs", "groups", "steps"):
            if key not in data:
                raise ValueError(f"pruning plan is missing {key!r}")
        if not isinstance(data["steps"], list):
            raise ValueError("pruning plan 'steps' must be a list")
        if not isinstance(data["convs"], Mapping):
            raise ValueError("pruning plan 'convs' must map conv names to widths")
        return cls(
            convs={str(k): v for k, v in dict(data["convs"]).items()},
            groups=[list(g) for g in data["groups"]] if isinstance(data["groups"], list) else data["groups"],
            steps=[dict(s) for s in data["steps"]] if all(isinstance(s, Mapping) for s in data["steps"]) else data["steps"],
            model_name=data.get("model_name"),
            input_shape=list(data["input_shape"]) if data.get("input_shape") else None,
            original_params=data.get("original_params"),
            original_flops=data.get("original_flops"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "PruningPlan":
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"pruning plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # -- reporting -----------------------------------------------------------------------------------------------
    def summary(self, model: nn.Module, example_inputs: torch.Tensor | None = None) -> dict[str, Any]:
        """Channels pruned per layer, and params/FLOPs before and after, for ``model`` (pruned by this plan or not).

        ``model`` is not modified: the "after" figures come from a copy with the plan's remaining steps applied.
        """
        from .prune import apply_pruning_plan  # local import: prune depends on this module

        x = resolve_example_inputs(model, example_inputs, self)
        after_model = apply_pruning_plan(copy.deepcopy(model), self, mode="remove", example_inputs=x)
        flops_after, params_after = tp.utils.count_ops_and_params(after_model, x)
        pruned = self.pruned_channels()
        return {
            "model_name": self.model_name,
            "forget_classes": self.forget_classes,
            "layers": {
                n: {"original": self.convs[n], "pruned": len(pruned[n]), "kept": self.convs[n] - len(pruned[n])}
                for n in pruned
            },
            "units_total": sum(self.convs[k] for k in self.group_keys),
            "units_pruned": sum(len(v) for v in self.pruned_units().values()),
            "params_before": self.original_params,
            "params_after": int(params_after),
            "flops_before": self.original_flops,
            "flops_after": int(flops_after),
        }


# ------------------------------------------------------------------------------------------------ building a plan
def _check_scores(
    scores: Mapping[str, Any], convs: Mapping[str, nn.Conv2d], groups: list[list[str]]
) -> dict[str, np.ndarray]:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty dict of conv layer name -> per-channel score array")
    unknown = sorted(set(scores) - set(convs))
    if unknown:
        raise ValueError(f"scores name layer(s) the model does not have (or that are not Conv2d): {unknown}")
    needed = [n for g in groups for n in g]
    missing = [n for n in needed if n not in scores]
    if missing:
        raise ValueError(f"scores are missing prunable conv layer(s) {missing}")
    out = {}
    for name in needed:
        try:
            arr = np.asarray(scores[name], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"scores for layer {name!r} are not numeric") from None
        width = convs[name].out_channels
        if arr.shape != (width,):
            raise ValueError(f"scores for layer {name!r} must have shape ({width},) (its current width), got {arr.shape}")
        if np.isnan(arr).any():
            raise ValueError(f"scores for layer {name!r} contain NaN")
        if not np.isfinite(arr).all():
            raise ValueError(f"scores for layer {name!r} contain infinite values")
        out[name] = arr
    return out


def build_pruning_plan(
    model: nn.Module,
    scores: Mapping[str, Any],
    ratio: float,
    scope: str = "global",
    direction: str = "highest",
    min_channels: int = 1,
    forget_class: int | None = None,
    base_plan: PruningPlan | None = None,
    *,
    model_name: str | None = None,
    example_inputs: torch.Tensor | None = None,
) -> PruningPlan:
    """Choose the coupled channels to remove for one forget class; return ``base_plan`` + this step as a new plan.

    ``scores``: conv name -> per-channel score for the model AS GIVEN (when ``base_plan`` is set the model is
    already pruned by it, so scores use current indices; they are mapped back to original indices here; a model
    masked by ``base_plan`` keeps its widths, so its scores cover all original channels and masked ones are skipped).
    ``ratio``: fraction of all units of the ORIGINAL model to remove in this step (``round(ratio x N)``, at least
    1), so every step of a multi-class plan removes the same number of units. ``scope="global"`` ranks all units
    together (paper); ``"per_layer"`` removes ``round(ratio x original width)`` from each group. ``direction``:
    ``"highest"`` scores first (paper) or ``"lowest"`` (released code). Each group keeps >= ``min_channels``.
    """
    ratio = check_ratio(ratio)
    check_choice(scope, "scope", SCOPES)
    check_choice(direction, "direction", DIRECTIONS)
    if isinstance(min_channels, bool) or not isinstance(min_channels, numbers.Integral) or min_channels < 1:
        raise ValueError(f"min_channels must be an integer >= 1 (a layer is never emptied), got {min_channels!r}")
    if forget_class is not None and (isinstance(forget_class, bool) or not isinstance(forget_class, numbers.Integral)):
        raise ValueError(f"forget_class must be an integer class id or None, got {forget_class!r}")
    if base_plan is not None and not isinstance(base_plan, PruningPlan):
        raise ValueError(f"base_plan must be a PruningPlan, got {type(base_plan).__name__}")
    convs = conv_modules(model)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer: there are no channels to prune")

    x = resolve_example_inputs(model, example_inputs, base_plan)
    if base_plan is None:
        groups = coupled_groups(model, x)
        if not groups:
            raise ValueError("the model has no prunable conv channels (every conv is tied to the classifier outputs)")
        original = {n: convs[n].out_channels for g in groups for n in g}
        base = PruningPlan(
            convs=original,
            groups=groups,
            model_name=model_name or model_name_of(model),
            input_shape=list(x.shape[1:]),
        )
        flops, params = tp.utils.count_ops_and_params(model, x)
        base.original_params, base.original_flops = int(params), int(flops)
    else:
        base = base_plan
        missing = [n for n in base.convs if n not in convs]
        if missing:
            raise ValueError(f"base_plan names layer(s) {missing} that the model does not have")
        actual = {n: convs[n].out_channels for n in base.convs}
        masked_model = actual == base.convs  # mask mode: shapes kept, scores cover every original channel
        if not masked_model and actual != base.widths():
            wrong = {n: (actual[n], w) for n, w in base.widths().items() if actual[n] != w}
            raise ValueError(
                "the model is not in the state base_plan describes (layer: (actual, expected) widths): "
                f"{dict(list(wrong.items())[:5])}; apply base_plan to the model first"
            )
        groups = base.groups
    checked = _check_scores(scores, convs, groups)

    pruned_before = base.pruned_units()
    kept = {g[0]: [c for c in range(base.convs[g[0]]) if c not in set(pruned_before[g[0]])] for g in groups}
    group_scores = [np.mean([checked[n] for n in g], axis=0) for g in groups]
    if base_plan is not None and masked_model:
        group_scores = [s[kept[g[0]]] for s, g in zip(group_scores, groups)]  # masked channels are not candidates
    capacity = [len(kept[g[0]]) - min_channels for g in groups]
    sign = -1.0 if direction == "highest" else 1.0

    chosen: dict[str, list[int]] = {g[0]: [] for g in groups}
    if scope == "global":
        total_units = sum(base.convs[g[0]] for g in groups)
        n_prune = max(1, int(round(ratio * total_units)))
        if n_prune > sum(max(c, 0) for c in capacity):
            raise ValueError(
                f"ratio={ratio} asks for {n_prune} of {total_units} channels but only {sum(max(c, 0) for c in capacity)} "
                f"can go while keeping min_channels={min_channels} per layer; lower the ratio"
            )
        gi = np.concatenate([np.full(len(s), i) for i, s in enumerate(group_scores)])
        ci = np.concatenate([np.arange(len(s)) for s in group_scores])
        sv = np.concatenate(group_scores)
        order = np.lexsort((ci, gi, sign * sv))  # by score, ties by group then channel: deterministic
        left = list(capacity)
        taken = 0
        for u in order:
            g = int(gi[u])
            if left[g] > 0:
                chosen[groups[g][0]].append(kept[groups[g][0]][int(ci[u])])
                left[g] -= 1
                taken += 1
                if taken == n_prune:
                    break
    else:
        for i, g in enumerate(groups):
            n_g = min(int(round(ratio * base.convs[g[0]])), max(capacity[i], 0))
            order = np.lexsort((np.arange(len(group_scores[i])), sign * group_scores[i]))
            chosen[g[0]] = [kept[g[0]][int(c)] for c in order[:n_g]]
        n_prune = sum(len(v) for v in chosen.values())
        if n_prune == 0:
            raise ValueError(f"ratio={ratio} removes no channel from any layer with scope='per_layer'; raise the ratio")

    step = {
        "forget_class": None if forget_class is None else int(forget_class),
        "options": {"ratio": ratio, "scope": scope, "direction": direction, "min_channels": int(min_channels),
                    "units": int(n_prune)},
        "pruned": {k: sorted(v) for k, v in chosen.items() if v},
    }
    return PruningPlan(
        convs=dict(base.convs),
        groups=[list(g) for g in base.groups],
        steps=copy.deepcopy(base.steps) + [step],
        model_name=base.model_name or model_name or model_name_of(model),
        input_shape=base.input_shape,
        original_params=base.original_params,
        original_flops=base.original_flops,
    )
