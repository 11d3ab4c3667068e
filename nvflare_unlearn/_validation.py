"""Small boundary checks shared by the core modules, so every bad input fails early with one clear message."""

from __future__ import annotations

import numbers
from typing import Any, Iterable

import numpy as np


def check_num_classes(num_classes: Any) -> int:
    """Return ``num_classes`` as int; a classifier needs at least two classes to forget one of them."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def check_class_id(cls: Any, num_classes: int, what: str = "forget_class") -> int:
    """Return ``cls`` as int if it is a valid class id in ``[0, num_classes)``."""
    if isinstance(cls, bool) or not isinstance(cls, numbers.Integral):
        raise ValueError(f"{what} must be an integer class id, got {cls!r}")
    if not 0 <= int(cls) < num_classes:
        raise ValueError(f"{what} {cls} is not a class id of this model: valid ids are 0..{num_classes - 1}")
    return int(cls)


def check_ratio(ratio: Any, name: str = "ratio") -> float:
    """Return ``ratio`` as float if it lies strictly inside (0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not np.isfinite(float(ratio)):
        raise ValueError(f"{name} must be a number in (0, 1), got {ratio!r}")
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"{name} must be strictly between 0 and 1 (a fraction of all prunable channels), got {ratio}")
    return float(ratio)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_finite(arr: np.ndarray, what: str) -> None:
    """Raise if ``arr`` holds NaN or infinity (a poisoned or broken statistic)."""
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{what} contains {bad} NaN or infinite value(s)")


def normalize_forget_classes(forget_classes: Any, num_classes: int, *, required: bool = True) -> list[int]:
    """Validate forget class ids: integers in range, no duplicates, at least one class left to keep.

    A single id is accepted for a one-element list; ``required=False`` allows an empty list (pretraining).
    """
    num_classes = check_num_classes(num_classes)
    if forget_classes is None:
        forget_classes = []
    if isinstance(forget_classes, numbers.Integral) and not isinstance(forget_classes, bool):
        forget_classes = [int(forget_classes)]
    if isinstance(forget_classes, (str, bytes)) or not isinstance(forget_classes, Iterable):
        raise ValueError(f"forget_classes must be a class id or a list of class ids, got {forget_classes!r}")
    out = [check_class_id(c, num_classes, "forget class") for c in forget_classes]
    if required and not out:
        raise ValueError("forget_classes is empty: name at least one class to forget")
    if len(set(out)) != len(out):
        raise ValueError(f"forget_classes has duplicates: {out}")
    if len(out) >= num_classes:
        raise ValueError(f"cannot forget all {num_classes} classes: at least one must be retained")
    return out


#: ``normalize`` keywords: the dataset's published channel statistics, or pixels scaled to [0, 1] only
NORMALIZE_KEYWORDS = ("dataset", "none")


def parse_normalize(value: Any) -> str | tuple[tuple[float, ...], tuple[float, ...]]:
    """A ``normalize`` setting as ``"dataset"``, ``"none"`` or ``(mean, std)``: a keyword, or the statistics as a
    mapping or JSON text ``{"mean": [...], "std": [...]}`` (one value, or one per channel; std > 0)."""
    import json
    import math

    if isinstance(value, str):
        text = value.strip()
        if text in NORMALIZE_KEYWORDS:
            return text
        try:
            value = json.loads(text)
        except ValueError:
            value = None
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise ValueError(
            f"normalize must be 'dataset', 'none' or {{\"mean\": [...], \"std\": [...]}}, got {str(value)[:80]!r}"
        )
    stats = []
    for key in ("mean", "std"):
        items = value[key] if isinstance(value[key], (list, tuple)) else [value[key]]
        ok = 0 < len(items) <= 16 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in items
        )
        if not ok or (key == "std" and any(v <= 0 for v in items)):
            raise ValueError(f"normalize {key} must be 1 to 16 finite numbers{' > 0' if key == 'std' else ''}")
        stats.append(tuple(float(v) for v in items))
    if len(stats[0]) != len(stats[1]):
        raise ValueError(f"normalize mean has {len(stats[0])} value(s) but std has {len(stats[1])}")
    return stats[0], stats[1]


def normalize_text(value: Any) -> str:
    """``value`` checked and written the one way a job config stores it (a keyword, or compact JSON)."""
    import json

    parsed = parse_normalize(value)
    if isinstance(parsed, str):
        return parsed
    return json.dumps({"mean": list(parsed[0]), "std": list(parsed[1])}, separators=(",", ":"))
