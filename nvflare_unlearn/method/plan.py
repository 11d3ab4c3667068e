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

from nvflare_unlearn.models.registry import check_input_shape

_FORMAT = "nvflare_unlearn.pruning_plan"
_VERSION = 1

#: Bounds on what a plan may describe. A plan arrives from files and from the server in every task's meta, so it
#: is untrusted input: these keep parsing, validation and error messages small whatever the text holds.
MAX_PLAN_BYTES = 16 * 1024 * 1024
MAX_CONVS = 4096
MAX_WIDTH = 65536
MAX_STEPS = 1024
MAX_NAME_CHARS = 256
_MAX_REPR = 80


def _short(value: Any, limit: int = _MAX_REPR) -> str:
    """``repr(value)`` cut to ``limit`` characters, so an error message never echoes a huge input back."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ cannot make the message fail
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise ValueError(
            f"{what} must be a non-empty string of at most {MAX_NAME_CHARS} characters, got {_short(value)}"
        )
    return value


def _int_list(values: Any, what: str) -> list[int]:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{what} must be a list of channel indices, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{what} holds a non-integer index {_short(v)}")
        out.append(int(v))
    return out


def _optional_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"plan {what} must be a non-negative integer or null, got {_short(value)}")
    return int(value)


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
        """Structure, bounds and consistency, in one pass linear in the plan's size; every message is short."""
        if not isinstance(self.convs, Mapping) or not self.convs:
            raise ValueError("plan 'convs' must map conv names to their original widths")
        if len(self.convs) > MAX_CONVS:
            raise ValueError(f"plan names {len(self.convs)} convs; at most {MAX_CONVS} are supported")
        for name, width in self.convs.items():
            _name(name, "plan conv name")
            if isinstance(width, bool) or not isinstance(width, numbers.Integral) or not 1 <= width <= MAX_WIDTH:
                raise ValueError(f"plan: conv {_short(name)} has invalid width {_short(width)} (1..{MAX_WIDTH})")
        if not isinstance(self.groups, list) or not all(isinstance(g, list) and g for g in self.groups):
            raise ValueError("plan 'groups' must be a list of non-empty lists of conv names")
        seen: set[str] = set()
        for g in self.groups:
            for name in g:
                if not isinstance(name, str) or name not in self.convs:
                    raise ValueError(f"plan group names conv {_short(name)} missing from the plan's convs")
                if name in seen:
                    raise ValueError(f"plan: conv {_short(name)} appears in two groups")
                seen.add(name)
            if len({self.convs[n] for n in g}) != 1:
                raise ValueError(f"plan group {_short(g)} mixes convs of different widths")
        if self.excluded is not None:
            if (
                not isinstance(self.excluded, Mapping)
                or len(self.excluded) > MAX_CONVS
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.excluded.items())
            ):
                raise ValueError("plan 'excluded' must map conv names to the reason they are not pruned")
            for name, why in self.excluded.items():
                _name(name, "plan excluded conv name")
                if len(why) > 4 * MAX_NAME_CHARS:
                    raise ValueError(f"plan: the reason conv {_short(name)} is excluded is too long")
            both = sorted(set(self.excluded) & set(self.convs))
            if both:
                raise ValueError(f"plan: conv(s) {_short(both[:5])} are both prunable and excluded")
        if not isinstance(self.steps, list):
            raise ValueError("plan 'steps' must be a list")
        if len(self.steps) > MAX_STEPS:
            raise ValueError(f"plan has {len(self.steps)} steps; at most {MAX_STEPS} are supported")
        if self.model_name is not None:
            _name(self.model_name, "plan model_name")  # bounded like a conv name; not resolved here
        if self.input_shape is not None:
            self.input_shape = list(check_input_shape(self.input_shape, "plan input_shape"))  # allocated for tracing
        self.original_params = _optional_int(self.original_params, "original_params")
        self.original_flops = _optional_int(self.original_flops, "original_flops")
        groups_by_key = {g[0]: g for g in self.groups}
        pruned_so_far: dict[str, set[int]] = {k: set() for k in groups_by_key}
        for i, step in enumerate(self.steps):
            if not isinstance(step, Mapping) or not isinstance(step.get("pruned"), Mapping):
                raise ValueError(f"plan step {i} must be a dict with a 'pruned' mapping")
            fc = step.get("forget_class")
            if fc is not None and (isinstance(fc, bool) or not isinstance(fc, numbers.Integral)):
                raise ValueError(f"plan step {i}: forget_class must be an integer or null, got {_short(fc)}")
            if "options" in step and not isinstance(step["options"], Mapping):
                raise ValueError(f"plan step {i}: 'options' must be a dict")
            for key, idxs in step["pruned"].items():
                if not isinstance(key, str) or key not in groups_by_key:
                    raise ValueError(f"plan step {i} prunes unknown group {_short(key)}")
                idxs = _int_list(idxs, f"plan step {i}, group {_short(key)}")
                width = self.convs[key]
                bad = [c for c in idxs if not 0 <= c < width]
                if bad:
                    raise ValueError(
                        f"plan step {i}, group {_short(key)}: {len(bad)} indices outside [0, {width}), "
                        f"e.g. {_short(bad[:5])}"
                    )
                seen_here = pruned_so_far[key]
                unique = set(idxs)
                dup = seen_here.intersection(unique)
                if dup or len(unique) != len(idxs):
                    raise ValueError(
                        f"plan step {i}, group {_short(key)}: channels pruned twice, "
                        f"e.g. {_short(sorted(dup)[:5] or idxs[:5])}"
                    )
                seen_here.update(unique)
                if len(seen_here) >= width:
                    raise ValueError(
                        f"plan would empty layer(s) {_short(groups_by_key[key])}: all {width} channels pruned "
                        f"by step {i}"
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
        pruned = {n: set(v) for n, v in self.pruned_channels(num_steps).items()}
        return {n: [c for c in range(self.convs[n]) if c not in gone] for n, gone in pruned.items()}

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
        """The plan from its decoded JSON; anything malformed is a short ``ValueError`` (never a TypeError)."""
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError("not a pruning plan (missing format 'nvflare_unlearn.pruning_plan')")
        if data.get("version") != _VERSION:
            raise ValueError(
                f"unsupported pruning plan version {_short(data.get('version'))} (this code reads {_VERSION})"
            )
        for key in ("convs", "groups", "steps"):
            if key not in data:
                raise ValueError(f"pruning plan is missing {key!r}")
        if not isinstance(data["steps"], list) or not all(isinstance(s, Mapping) for s in data["steps"]):
            raise ValueError("pruning plan 'steps' must be a list of dicts")
        if not isinstance(data["convs"], Mapping):
            raise ValueError("pruning plan 'convs' must map conv names to widths")
        groups = data["groups"]
        if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
            raise ValueError("pruning plan 'groups' must be a list of lists of conv names")
        shape = data.get("input_shape")
        if shape is not None and not isinstance(shape, list):
            raise ValueError(f"pruning plan 'input_shape' must be [C, H, W], got {_short(shape)}")
        return cls(
            convs=dict(data["convs"]),
            groups=[list(g) for g in groups],
            steps=[dict(s) for s in data["steps"]],
            model_name=data.get("model_name"),
            input_shape=list(shape) if shape else None,
            original_params=data.get("original_params"),
            original_flops=data.get("original_flops"),
            excluded=dict(data["excluded"]) if isinstance(data.get("excluded"), Mapping) else data.get("excluded"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "PruningPlan":
        """Parse plan text (at most ``MAX_PLAN_BYTES``); linear in its size, short ``ValueError`` on any defect."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise ValueError(f"pruning plan must be JSON text, got {type(text).__name__}")
        if len(text) > MAX_PLAN_BYTES:
            raise ValueError(f"pruning plan is {len(text)} bytes; at most {MAX_PLAN_BYTES} are accepted")
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer with too many digits
            raise ValueError(f"pruning plan is not valid JSON: {_short(str(exc), 160)}") from None
        except RecursionError:
            raise ValueError("pruning plan is not valid JSON: nested too deeply") from None
        return cls.from_dict(data)


def parse_plan(text: str | None) -> PruningPlan | None:
    """The plan in JSON text where it enters (a task's meta, a stored record); None or "" is no plan (an unpruned
    model). Called once at that boundary: everything inside takes the ``PruningPlan``, never the text."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise ValueError(f"pruning plan must be JSON text, got {type(text).__name__}")
    try:
        return PruningPlan.from_json(text)
    except ValueError:
        raise
    except Exception as exc:  # from_json raises only ValueError; say what it is, not where it failed, if not
        raise ValueError(f"invalid pruning plan JSON: {_short(str(exc), 160)}") from exc
