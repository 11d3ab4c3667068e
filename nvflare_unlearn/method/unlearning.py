"""The one per-class unlearning step, and the centralized loop built on it.

``unlearning_step`` is the paper's server procedure for one forget class (Sec. 3.2-3.3): TF-IDF scores of the model
as it is now -> the channels of one plan step -> ``base_plan`` + that step. The centralized reference
(``unlearn_centralized``), the NVFlare controller and the benchmark's in-process federation all call it, each with
its own statistics (one process, sites through NVFlare, simulated sites), so they cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from nvflare_unlearn._validation import check_class_id, check_num_classes, normalize_forget_classes
from nvflare_unlearn.method.activations import collect_class_activations
from nvflare_unlearn.method.graph import conv_modules
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.method.prune import apply_pruning_plan
from nvflare_unlearn.method.selection import build_pruning_plan
from nvflare_unlearn.method.tfidf import tfidf_scores
from nvflare_unlearn.options import PlanOptions, ScoringOptions

__all__ = ["deep_layers", "normalize_forget_classes", "score_channels", "unlearn_centralized", "unlearning_step"]


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


def deep_layers(model: nn.Module, fraction: float) -> list[str]:
    """The last ``fraction`` of Conv2d layers in module order (at least one): the "deep" part of the network."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"deep_fraction must be in (0, 1], got {fraction}")
    convs = list(conv_modules(model))
    k = max(1, int(round(fraction * len(convs))))
    return convs[-k:]


def _restrict_to(scores: dict[str, np.ndarray], keep: set[str], direction: str) -> dict[str, np.ndarray]:
    """Push the scores of layers outside ``keep`` to the far end so the selection never picks them."""
    finite = np.concatenate(list(scores.values()))
    far = (float(finite.min()) - 1e6) if direction == "highest" else (float(finite.max()) + 1e6)
    return {n: (v if n in keep else np.full_like(v, far)) for n, v in scores.items()}


def unlearning_step(
    model: nn.Module,
    class_means: Mapping[str, Any],
    forget_class: int,
    scoring: ScoringOptions | Mapping[str, Any] | None = None,
    plan: PlanOptions | Mapping[str, Any] | None = None,
    base_plan: PruningPlan | None = None,
    *,
    class_counts: Sequence[int] | None = None,
    model_name: str | None = None,
    example_inputs: torch.Tensor | None = None,
    record: Mapping[str, Any] | None = None,
) -> PruningPlan:
    """``base_plan`` + one step that removes the channels most specific to ``forget_class``; ``model`` unchanged.

    ``model`` is the model as it is now (unpruned, removed by ``base_plan``, or masked by it) and ``class_means``
    its class-mean activations (``[K, C]`` per conv, measured on that model). ``class_counts`` (images per class
    behind the means) and ``record`` (caller facts, e.g. the contributing sites) are stored in the step.
    """
    scoring = ScoringOptions.from_dict(scoring)
    plan = PlanOptions.from_dict(plan)
    if not isinstance(class_means, Mapping) or not class_means:
        raise ValueError("class_means must be a non-empty dict of conv name -> [num_classes, channels] array")
    k = int(np.shape(next(iter(class_means.values())))[0])
    forget_class = check_class_id(forget_class, check_num_classes(k))
    if class_counts is not None and int(class_counts[forget_class]) == 0:
        raise ValueError(
            f"the statistics hold no sample of forget class {forget_class}: its channels cannot be scored "
            f"(class counts: {[int(c) for c in class_counts]})"
        )
    mode = "remove" if plan.prune_mode == "remove" else "mask"  # reinit selects on a masked model, as mask mode
    scores = score_channels(
        class_means, forget_class, base_plan, mode, idf=scoring.idf, tf_norm=scoring.tf_norm, coe=scoring.coe
    )
    if plan.deep_fraction is not None:
        scores = _restrict_to(scores, set(deep_layers(model, plan.deep_fraction)), plan.direction)
    new = build_pruning_plan(
        model,
        scores,
        plan.prune_ratio,
        scope=plan.scope,
        direction=plan.direction,
        min_channels=plan.min_channels,
        forget_class=forget_class,
        base_plan=base_plan,
        model_name=model_name,
        example_inputs=example_inputs,
    )
    step = new.steps[-1]
    step["options"]["deep_fraction"] = plan.deep_fraction
    step["scoring"] = {
        "idf": scoring.idf,
        "tf_norm": scoring.tf_norm,
        "coe": scoring.coe,
        "hook_point": scoring.hook_point,
    }
    if class_counts is not None:
        step["scoring"]["class_counts"] = [int(c) for c in class_counts]
    step["scoring"].update(dict(record or {}))
    return new


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
    """Forget ``forget_classes`` one at a time: statistics on the current model -> ``unlearning_step`` -> apply.

    The model is modified IN PLACE and returned (deepcopy first to keep the original). ``ratio`` is the share of
    the original model's channels removed per class. Returns the pruned model and the composed, replayable plan.
    No fine-tuning here: callers fine-tune on retained classes afterwards.
    """
    classes = normalize_forget_classes(forget_classes, num_classes)
    scoring = ScoringOptions(
        idf=idf, tf_norm=tf_norm, coe=coe, hook_point=hook_point, max_activation_batches=max_batches
    )
    plan_opts = PlanOptions(
        prune_ratio=ratio, scope=scope, direction=direction, min_channels=min_channels, prune_mode=mode
    )
    if model_name is not None and not isinstance(model_name, str):
        raise ValueError(f"model_name must be a string or None, got {model_name!r}")
    plan: PruningPlan | None = None
    for cls in classes:
        report = collect_class_activations(
            model, loader, num_classes, hook_point=hook_point, device=device, max_batches=max_batches
        )
        plan = unlearning_step(
            model,
            report.means(),
            cls,
            scoring,
            plan_opts,
            plan,
            class_counts=report.counts,
            model_name=model_name,
            example_inputs=example_inputs,
        )
        apply_pruning_plan(model, plan, mode=mode, example_inputs=example_inputs)
    assert plan is not None
    return model, plan
