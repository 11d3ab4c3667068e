"""Pruning plans: which coupled conv channels to remove, by ORIGINAL channel index, as replayable JSON.

A pruning unit is (coupled group, channel). A coupled group is the set of Conv2d whose output channels are tied
(through residual additions, found by torch-pruning's DependencyGraph, see ``graph``); removing channel c of one
member removes channel c of all. The plan type knows nothing of models: ``selection`` builds plans, ``prune``
applies them.
"""

from __future__ import annotations

import copy
import json
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

_FORMAT = "nvflare_unlearn.pruning_plan"
_VERSION = 1


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
    ``pruned`` = group key -> original channel indices, and the options that chose them. ``excluded``: conv name ->
    why its output channels are never pruned (None in plans written before it was recorded).
    """

    convs: dict[str, int]
    groups: list[list[str]]
    steps: list[dict[str, Any]] = field(default_factory=list)
    model_name: str | None = None
    input_shape: list[int] | None = None
    original_params: int | None = None
    original_flops: int | None = None
    excluded: dict[str, str] | None = None

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
        if self.excluded is not None:
            if not isinstance(self.excluded, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.excluded.items()
            ):
                raise ValueError("plan 'excluded' must map conv names to the reason they are not pruned")
            both = sorted(set(self.excluded) & set(self.convs))
            if both:
                raise ValueError(f"plan: conv(s) {both[:5]} are both prunable and excluded")
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
            excluded=self.excluded if self.excluded is not None else other.excluded,
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
            "excluded": dict(self.excluded) if self.excluded is not None else None,
            "steps": [
                {
                    **{k: v for k, v in s.items() if k != "pruned"},
                    "pruned": {k: sorted(int(i) for i in v) for k, v in s["pruned"].items()},
                }
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
            steps=[dict(s) for s in data["steps"]]
            if all(isinstance(s, Mapping) for s in data["steps"])
            else data["steps"],
            model_name=data.get("model_name"),
            input_shape=list(data["input_shape"]) if data.get("input_shape") else None,
            original_params=data.get("original_params"),
            original_flops=data.get("original_flops"),
            excluded=dict(data["excluded"]) if isinstance(data.get("excluded"), Mapping) else data.get("excluded"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "PruningPlan":
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"pruning plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)
