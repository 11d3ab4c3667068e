"""Centralized (non-federated) unlearning: the reference the federated workflow, demo and benchmarks compare to."""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ._validation import check_class_id, check_num_classes, check_ratio
from .activations import collect_class_activations
from .plan import PruningPlan, build_pruning_plan
from .prune import apply_pruning_plan
from .tfidf import tfidf_scores


def normalize_forget_classes(forget_classes: int | Sequence[int], num_classes: int) -> list[int]:
    """Validate forget class ids: integers in range, no duplicates, at least one class left to keep."""
    num_classes = check_num_classes(num_classes)
    if isinstance(forget_classes, numbers.Integral) and not isinstance(forget_classes, bool):
        forget_classes = [int(forget_classes)]
    if isinstance(forget_classes, (str, bytes)) or not isinstance(forget_classes, Iterable):
        raise ValueError(f"forget_classes must be a class id or a list of class ids, got {forget_classes!r}")
    out = [check_class_id(c, num_classes, "forget class") for c in forget_classes]
    if not out:
        raise ValueError("forget_classes is empty: name at least one class to forget")
    if len(set(out)) != len(out):
        raise ValueError(f"forget_classes has duplicates: {out}")
    if len(out) >= num_classes:
        raise ValueError(f"cannot forget all {num_classes} classes: at least one must be retained")
    return out


def score_channels(
    class_means: Mapping[str, np.ndarray],
    forget_class: int,
    plan: PruningPlan | None = None,
    mode: str = "remove",
    *,
    idf: str = "paper",
    tf_norm: str = "share",
    coe: float | None = None,
) -> dict[str, np.ndarray]:
    """TF-IDF scores of the model as it is now, comparable between "remove" and "mask" mode.

    A model masked by ``plan`` still has its masked channels (always 0); left in, they would shift the IDF
    thresholds (row means over channels) and the widths used by ``tf_norm``. So in mask mode the scores are
    computed over the kept channels only and placed back at full width (masked entries 0, never selected:
    ``build_pruning_plan`` skips them). This makes both modes choose the same channels.
    """
    if mode not in ("remove", "mask"):
        raise ValueError(f"mode must be 'remove' or 'mask', got {mode!r}")
    if plan is None or mode == "remove" or not plan.steps:
        return tfidf_scores(class_means, forget_class, idf=idf, tf_norm=tf_norm, coe=coe)
    kept = plan.kept_channels()
    restricted = {n: (np.asarray(a)[:, kept[n]] if n in kept else np.asarray(a)) for n, a in class_means.items()}
    scores = tfidf_scores(restricted, forget_class, idf=idf, tf_norm=tf_norm, coe=coe)
    out = {}
    for n, s in scores.items():
        if n in kept:
            full = np.zeros(plan.convs[n])
            full[kept[n]] = s
            out[n] = full
        else:
            out[n] = s
    return out


def unlearn_centralized(
    model: nn.Module,
    model_name: str | None,
    loader: Iterable[Any],
    num_classes: int,
    forget_classes: int | Sequence[int],
    ratio: float,
    *,
    idf: str = "paper",
    tf_norm: str = "share",
    coe: float | None = None,
    hook_point: str = "conv",
    scope: str = "global",
    direction: str = "highest",
    min_channels: int = 1,
    mode: str = "remove",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    example_inputs: torch.Tensor | None = None,
) -> tuple[nn.Module, PruningPlan]:
    """Forget ``forget_classes`` one at a time: statistics on the current model -> TF-IDF -> plan step -> apply.

    The model is modified IN PLACE and returned (deepcopy first to keep the original). ``ratio`` is the share of
    the original model's channels removed per class. Returns the pruned model and the composed, replayable plan.
    No fine-tuning here: callers fine-tune on retained classes afterwards.
    """
    classes = normalize_forget_classes(forget_classes, num_classes)
    ratio = check_ratio(ratio)
    if model_name is not None and not isinstance(model_name, str):
        raise ValueError(f"model_name must be a string or None, got {model_name!r}")
    plan: PruningPlan | None = None
    for cls in classes:
        report = collect_class_activations(model, loader, num_classes, hook_point=hook_point, device=device,
                                           max_batches=max_batches)
        if report.counts[cls] == 0:
            raise ValueError(
                f"the data holds no sample of forget class {cls}: its channels cannot be scored "
                f"(class counts seen: {report.counts.tolist()})"
            )
        scores = score_channels(report.means(), cls, plan, mode, idf=idf, tf_norm=tf_norm, coe=coe)
        plan = build_pruning_plan(model, scores, ratio, scope=scope, direction=direction, min_channels=min_channels,
                                  forget_class=cls, base_plan=plan, model_name=model_name,
                                  example_inputs=example_inputs)
        plan.steps[-1]["scoring"] = {
            "idf": idf, "tf_norm": tf_norm, "coe": coe, "hook_point": hook_point,
            "class_counts": np.asarray(report.counts).astype(int).tolist(),
        }
        apply_pruning_plan(model, plan, mode=mode, example_inputs=example_inputs)
    assert plan is not None
    return model, plan
