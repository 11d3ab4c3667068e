"""Helpers for sites that run their OWN NVFlare Client API script (``flare.receive()`` / ``flare.send()``) instead of
``UnlearningExecutor``. Pass ``train_script=`` to a recipe; the script then handles three tasks::

    import nvflare.client as flare
    from nvflare_unlearn.fl import client_api as ua

    flare.init()
    while flare.is_running():
        received = flare.receive()
        model = ua.model_from_flmodel(received, "small_cnn", num_classes=10)   # plan replayed, weights loaded
        task = flare.get_task_name()
        if task == ua.TASK_ACTIVATIONS:
            flare.send(ua.activation_result(model, DataLoader(train_set, batch_size=64), 10))
        elif task == ua.TASK_TRAIN:
            data = ua.retained(train_set, received)          # forget classes dropped here, not by your code
            n = my_train(model, data) if len(data) else 0     # your training loop (mask mode: see enforce_masks)
            flare.send(ua.weights_result(model, n))           # n = 0 -> left out of the average
        elif task == ua.TASK_VALIDATE:
            flare.send(ua.validation_result(model, DataLoader(val_set, batch_size=256), 10))

Everything crosses the wire as numpy (the recipe sets NVFlare's NUMPY exchange format): the PyTorch exchange would
reshape received weights to the shapes of the previous round, which breaks after pruning.
"""

from __future__ import annotations

from typing import Iterable, Optional

from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from torch import nn

from nvflare_unlearn.fl.defs import (
    META_DP_SIGMA,
    META_FORGET,
    META_HOOK_POINT,
    META_METHOD,
    META_PLAN,
    META_PRUNE_MODE,
    META_VERIFY,
    METRIC_CORRECT,
    METRIC_TOTAL,
    TASK_ACTIVATIONS,
    TASK_TRAIN,
    TASK_VALIDATE,
    TASK_VERIFY,
)
from nvflare_unlearn.fl.model_state import (
    load_numpy_state,
    model_key,
    rebuild_model,
    split_teacher,
    state_to_numpy,
)
from nvflare_unlearn.method.activations import WIRE_SUMS_DTYPE

__all__ = [
    "TASK_ACTIVATIONS",
    "TASK_TRAIN",
    "TASK_VALIDATE",
    "TASK_VERIFY",
    "model_from_flmodel",
    "training_objective",
    "verification_result",
    "forget_classes_of",
    "prune_mode_of",
    "retained",
    "activation_result",
    "weights_result",
    "validation_result",
]


def model_from_flmodel(
    fl_model: FLModel, model_name: str, num_classes: int, in_channels: Optional[int] = None
) -> nn.Module:
    """The global model of this round: registry architecture + the plan from the meta, weights loaded."""
    if not isinstance(fl_model, FLModel):
        raise ValueError(f"expected the FLModel from flare.receive(), got {type(fl_model).__name__}")
    meta = fl_model.meta or {}
    model = rebuild_model(model_name, num_classes, meta.get(META_PLAN), prune_mode_of(fl_model), in_channels)
    own, _teacher = split_teacher(fl_model.params or {})
    return load_numpy_state(model, own)


def forget_classes_of(fl_model: FLModel) -> list[int]:
    """The classes the server asked the sites to forget (empty for pretraining)."""
    return sorted(int(c) for c in ((fl_model.meta or {}).get(META_FORGET) or []))


def prune_mode_of(fl_model: FLModel) -> str:
    """ "remove" or "mask"; in mask mode call ``nvflare_unlearn.enforce_masks(model)`` after optimizer steps."""
    return str((fl_model.meta or {}).get(META_PRUNE_MODE, "remove"))


def retained(dataset, fl_model: FLModel):
    """``dataset`` (a ``LabelledDataset``) without the forget classes of this task."""
    from nvflare_unlearn.data import filter_classes

    forget = forget_classes_of(fl_model)
    return filter_classes(dataset, drop=forget) if forget else dataset


def activation_result(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    fl_model: Optional[FLModel] = None,
    hook_point: str = "conv",
    max_batches: Optional[int] = None,
    privacy: Optional[dict] = None,
    ledger_path: Optional[str] = None,
) -> FLModel:
    """Answer the activation task: per-class sums and counts on local training data (statistics only).

    ``privacy``: ``PrivacyOptions`` as a dict, applied exactly as the plugin's executor does (per-image clipping,
    min-count, Gaussian noise of ``dp_unit``'s sensitivity); with DP, ``ledger_path`` (this site's privacy ledger
    file, kept across jobs) is required, so a release beyond the site's budget is refused.
    """
    import numpy as np

    from nvflare_unlearn.method.activations import collect_class_activations
    from nvflare_unlearn.options import PrivacyOptions
    from nvflare_unlearn.protect.privacy import privatize_report, site_ledger

    opts = PrivacyOptions.from_dict(privacy)
    if opts.dp and not ledger_path:
        raise ValueError("DP needs ledger_path: the site's privacy ledger that refuses releases beyond its budget")
    meta = (fl_model.meta or {}) if fl_model is not None else {}
    hook_point = meta.get(META_HOOK_POINT, hook_point)
    report = collect_class_activations(
        model, loader, num_classes, hook_point=hook_point, max_batches=max_batches, clip=opts.clip_bound
    )
    ledger = site_ledger(opts, ledger_path) if opts.dp else None
    report, sigma = privatize_report(
        report,
        opts,
        max(1, len(meta.get(META_FORGET) or [])),
        np.random.default_rng(),
        ledger=ledger,
        model=model_key(fl_model.params if fl_model is not None else {}, meta.get(META_PLAN)) if ledger else "",
    )
    return FLModel(
        params_type=ParamsType.FULL,
        params=report.to_dict(sums_dtype=WIRE_SUMS_DTYPE),
        meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: int(report.counts.sum()), META_DP_SIGMA: float(sigma)},
    )


def weights_result(model: nn.Module, num_samples: int) -> FLModel:
    """Answer the train task: the full state dict as numpy, weighted by the number of training samples."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be an integer >= 0 (0 = nothing trained), got {num_samples!r}")
    return FLModel(
        params_type=ParamsType.FULL,
        params=state_to_numpy(model),
        meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: num_samples},
    )


def validation_result(model: nn.Module, loader: Iterable, num_classes: int) -> FLModel:
    """Answer the validate task: per-class correct/total counts on local validation data."""
    from nvflare_unlearn.evaluation import class_correct_total

    correct, total = class_correct_total(model, loader, num_classes)
    return FLModel(
        metrics={METRIC_CORRECT: [int(c) for c in correct], METRIC_TOTAL: [int(t) for t in total]},
        meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: int(total.sum())},
    )


def training_objective(
    fl_model: FLModel,
    model_name: str,
    num_classes: int,
    forget_loader: Optional[Iterable] = None,
    in_channels: Optional[int] = None,
    seed: int = 0,
):
    """The loss this round's method asks for (``method.objectives``), or None for plain cross-entropy.

    Use it as ``loss = objective.batch_loss(model, x, y)`` in your training loop on retained data. Methods that use
    the forget classes (neggrad, random_label, scrub) need ``forget_loader`` over this site's forget-class images;
    a distilling method gets the original model (the teacher) from the task itself.
    """
    from nvflare_unlearn.method.objectives import UnlearningObjective
    from nvflare_unlearn.options import MethodOptions

    options = MethodOptions.from_dict((fl_model.meta or {}).get(META_METHOD))
    forget = forget_classes_of(fl_model)
    if not forget or not (options.needs_teacher or options.needs_forget_data):
        return None
    teacher = None
    if options.needs_teacher:
        _own, weights = split_teacher(fl_model.params or {})
        teacher = load_numpy_state(rebuild_model(model_name, num_classes, in_channels=in_channels), weights)
    if options.needs_forget_data and forget_loader is None:
        options = MethodOptions.from_dict({**options.to_dict(), "method": "finetune"})  # no forget data here
    return UnlearningObjective(options, forget, num_classes, teacher=teacher, forget_loader=forget_loader, seed=seed)


def verification_result(
    model: nn.Module, train_loader: Iterable, test_loader: Iterable, fl_model: FLModel, num_classes: int
) -> FLModel:
    """Answer the verify task (the forgetting check): aggregates of this site's data only, see
    ``nvflare_unlearn.evaluation.verification`` for exactly what leaves the site."""
    from nvflare_unlearn.evaluation.verification import site_probe_histograms, site_stats

    request = (fl_model.meta or {}).get(META_VERIFY) or {}
    forget = forget_classes_of(fl_model)
    if request.get("round") == "scores":
        data = site_probe_histograms(model, test_loader, request, forget)
    elif request.get("round") == "stats":
        data = site_stats(model, train_loader, test_loader, forget, num_classes)
    else:
        raise ValueError(f"verify round must be 'stats' or 'scores', got {request.get('round')!r}")
    return FLModel(params_type=ParamsType.FULL, params=data, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 1})
