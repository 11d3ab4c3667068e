"""Choosing the channels of one plan step from per-channel scores (global threshold or per layer, either end).

A coupled group is scored by the mean of its members' scores for a channel, so a group is pruned on purpose, never
as a side effect. docs/method.md states the selection rules.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from nvflare_unlearn._validation import check_choice, check_ratio
from nvflare_unlearn.method.graph import analyse_structure, conv_modules, resolve_example_inputs
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.models.registry import model_name_of
from nvflare_unlearn.options import DIRECTIONS, SCOPES


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
            raise ValueError(
                f"scores for layer {name!r} must have shape ({width},) (its current width), got {arr.shape}"
            )
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
    Convs whose channels cannot be removed safely (``graph.analyse_structure``) are never chosen; the plan lists
    them with the reason (``plan.excluded``).
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
        structure = analyse_structure(model, x)
        groups = structure.groups
        if not groups:
            reasons = sorted(set(structure.excluded.values()))
            raise ValueError(f"the model has no conv channel that can be pruned safely: {'; '.join(reasons[:3])}")
        original = {n: convs[n].out_channels for g in groups for n in g}
        base = PruningPlan(
            convs=original,
            groups=groups,
            model_name=model_name or model_name_of(model),
            input_shape=list(x.shape[1:]),
            excluded=structure.excluded,
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
                f"ratio={ratio} asks for {n_prune} of {total_units} channels but only "
                f"{sum(max(c, 0) for c in capacity)} "
                f"can go while keeping min_channels={min_channels} per layer; lower the ratio"
            )
        unit_group = np.concatenate([np.full(len(s), i) for i, s in enumerate(group_scores)])
        unit_channel = np.concatenate([np.arange(len(s)) for s in group_scores])  # position among kept channels
        unit_score = np.concatenate(group_scores)
        order = np.lexsort((unit_channel, unit_group, sign * unit_score))  # by score, ties by group, channel
        room = list(capacity)
        taken = 0
        for unit in order:
            group = int(unit_group[unit])
            if room[group] > 0:
                key = groups[group][0]
                chosen[key].append(kept[key][int(unit_channel[unit])])
                room[group] -= 1
                taken += 1
                if taken == n_prune:
                    break
    else:
        for i, members in enumerate(groups):
            key = members[0]
            n_group = min(int(round(ratio * base.convs[key])), max(capacity[i], 0))
            order = np.lexsort((np.arange(len(group_scores[i])), sign * group_scores[i]))
            chosen[key] = [kept[key][int(c)] for c in order[:n_group]]
        n_prune = sum(len(v) for v in chosen.values())
        if n_prune == 0:
            raise ValueError(f"ratio={ratio} removes no channel from any layer with scope='per_layer'; raise the ratio")

    step = {
        "forget_class": None if forget_class is None else int(forget_class),
        "options": {
            "ratio": ratio,
            "scope": scope,
            "direction": direction,
            "min_channels": int(min_channels),
            "units": int(n_prune),
        },
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
        excluded=base.excluded,
    )
