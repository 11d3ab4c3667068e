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
            objective = ua.training_objective(received, "small_cnn", 10, forget_loader)  # None: pretraining
            n = my_train(model, data, objective) if len(data) else 0  # loss = objective.batch_loss(model, x, y)
            flare.send(ua.weights_result(model, n, objective))  # n = 0: left out; objective: what ran, recorded
        elif task == ua.TASK_VALIDATE:
            flare.send(ua.validation_result(model, DataLoader(val_set, batch_size=256), 10))

Everything crosses the wire as numpy (the recipe sets NVFlare's NUMPY exchange format): the PyTorch exchange would
reshape received weights to the shapes of the previous round, which breaks after pruning.

Privacy: ``activation_result`` applies the job's min-count, per-image clipping and Gaussian noise (sent in the
task's meta) with ``protected_report``, the very function ``UnlearningExecutor`` uses, and tells the server what it
applied; the audit record lists that per site (a script that answers without these helpers is recorded as having
applied nothing it can vouch for). Likewise ``weights_result(model, n, objective)`` reports the loss the site
minimised, and the record lists a site that does not as "not reported" (``unlearning.objective.objective_check``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from torch import nn

from nvflare_unlearn.fl.defs import (
    META_DP_SIGMA,
    META_FORGET,
    META_HOOK_POINT,
    META_METHOD,
    META_OBJECTIVE_APPLIED,
    META_PLAN,
    META_PRIVACY,
    META_PRIVACY_APPLIED,
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
    plan_from_meta,
    rebuild_model,
    split_teacher,
    state_to_numpy,
    teacher_from,
)
from nvflare_unlearn.method.activations import WIRE_SUMS_DTYPE, ClassActivationReport
from nvflare_unlearn.options import PrivacyOptions

if TYPE_CHECKING:
    from nvflare_unlearn.unlearning import UnlearningObjective

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
    "effective_privacy",
    "protected_report",
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
    model = rebuild_model(model_name, num_classes, plan_from_meta(meta), prune_mode_of(fl_model), in_channels)
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


def effective_privacy(own: Optional[PrivacyOptions | dict] = None, requested: Optional[dict] = None) -> PrivacyOptions:
    """The stricter of this site's own settings and the job's request: the larger min-count, the smaller clipping
    bound, the smaller DP epsilon, delta and budget, the wider DP unit (``add_remove_image`` over
    ``swap_within_class``). A site can tighten what the server asks for, never loosen it. The ledger file is only ever
    the site's own."""
    a, b = PrivacyOptions.from_dict(own), PrivacyOptions.from_dict(requested)

    def smaller(x, y):
        return y if x is None else x if y is None else min(x, y)

    wide = "add_remove_image"
    return PrivacyOptions(
        min_count=max(a.min_count, b.min_count),
        clip_bound=smaller(a.clip_bound, b.clip_bound),
        dp_epsilon=smaller(a.dp_epsilon, b.dp_epsilon),
        dp_delta=smaller(a.dp_delta, b.dp_delta),
        dp_unit=wide if wide in (a.dp_unit, b.dp_unit) else a.dp_unit,
        dp_budget_epsilon=smaller(a.dp_budget_epsilon, b.dp_budget_epsilon),
        dp_budget_delta=smaller(a.dp_budget_delta, b.dp_budget_delta),
        dp_ledger=a.dp_ledger,  # never the request's: a server naming a fresh file would reset the budget
    )


def protected_report(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    meta: Optional[dict] = None,
    own_privacy: Optional[PrivacyOptions | dict] = None,
    hook_point: str = "conv",
    max_batches: Optional[int] = None,
    device=None,
    ledger_path: Optional[str] = None,
) -> tuple[ClassActivationReport, dict]:
    """A site's activation report with its privacy applied, and what was applied (the one code path of the
    executor and of your own script).

    Order (``protect.privacy.privatize_report``): per-image clipping to ``[0, clip_bound]`` while collecting, then
    min-count, then one Gaussian release per forget class of the request (an equal share of epsilon and delta, at
    the sensitivity of ``dp_unit``; noise from fresh OS entropy, so the server cannot reproduce and subtract it),
    charged to the site's privacy ledger (``ledger_path``, else ``dp_ledger``) before it leaves.
    """
    import numpy as np

    from nvflare_unlearn.method.activations import collect_class_activations
    from nvflare_unlearn.protect.privacy import privatize_report, site_ledger

    meta = meta or {}
    privacy = effective_privacy(own_privacy, meta.get(META_PRIVACY))
    ledger = None
    if privacy.dp:
        ledger_path = ledger_path or privacy.dp_ledger
        if not ledger_path:
            raise ValueError(
                "DP needs the site's privacy ledger (ledger_path= or privacy dp_ledger): it refuses releases "
                "beyond the site's budget"
            )
        ledger = site_ledger(privacy, ledger_path)
    report = collect_class_activations(
        model,
        loader,
        num_classes,
        hook_point=meta.get(META_HOOK_POINT, hook_point),
        device=device,
        max_batches=max_batches,
        clip=privacy.clip_bound,
    )
    passes = max(1, len(meta.get(META_FORGET) or []))
    # the ledger names the model the release was computed on (weights + plan); hashed only when charged
    model_id = model_key(state_to_numpy(model), meta.get(META_PLAN)) if ledger is not None else ""
    report, sigma = privatize_report(report, privacy, passes, np.random.default_rng(), ledger=ledger, model=model_id)
    applied = {**privacy.to_dict(), "dp_sigma": float(sigma), "passes": passes if privacy.dp else None}
    applied.pop("dp_ledger", None)  # a site-local path: not the server's business
    return report, applied


def activation_result(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    fl_model: Optional[FLModel] = None,
    hook_point: str = "conv",
    max_batches: Optional[int] = None,
    privacy: Optional[PrivacyOptions | dict] = None,
    ledger_path: Optional[str] = None,
) -> FLModel:
    """Answer the activation task: per-class sums and counts on local training data (statistics only), with the
    job's privacy (from ``fl_model``'s meta, tightened by ``privacy``, this site's own settings) applied.

    With DP, ``ledger_path`` (this site's privacy ledger file, kept across jobs; or ``dp_ledger`` in ``privacy``)
    is required, so a release beyond the site's budget is refused before anything leaves.
    """
    meta = (fl_model.meta or {}) if fl_model is not None else {}
    report, applied = protected_report(
        model,
        loader,
        num_classes,
        meta,
        own_privacy=privacy,
        hook_point=hook_point,
        max_batches=max_batches,
        ledger_path=ledger_path,
    )
    return FLModel(
        params_type=ParamsType.FULL,
        params=report.to_dict(sums_dtype=WIRE_SUMS_DTYPE),
        meta={
            FLMetaKey.NUM_STEPS_CURRENT_ROUND: int(report.counts.sum()),
            META_DP_SIGMA: applied["dp_sigma"],
            META_PRIVACY_APPLIED: applied,
        },
    )


def weights_result(model: nn.Module, num_samples: int, objective: Optional[UnlearningObjective] = None) -> FLModel:
    """Answer the train task: the full state dict as numpy, weighted by the number of training samples.

    ``objective``: the one ``training_objective`` gave you and your loop minimised; its report (the loss and how
    many batches used it) goes back with the weights, so the job's record shows that this site ran the method. A
    job whose method needs more than plain cross-entropy lists a site that sends no report as "not reported".
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be an integer >= 0 (0 = nothing trained), got {num_samples!r}")
    meta: dict = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: num_samples}
    if objective is not None:
        meta[META_OBJECTIVE_APPLIED] = objective.report()
    return FLModel(params_type=ParamsType.FULL, params=state_to_numpy(model), meta=meta)


def validation_result(model: nn.Module, loader: Iterable, num_classes: int) -> FLModel:
    """Answer the validate task: per-class correct/total counts on local validation data."""
    from nvflare_unlearn.runtime import class_correct_total

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
    """The loss this round's method asks for (``unlearning``); None for a task without forget classes
    (pretraining: plain cross-entropy).

    Use it as ``loss = objective.batch_loss(model, x, y)`` in your training loop on retained data, call
    ``objective.before_step(model)`` between ``loss.backward()`` and ``optimizer.step()``, and pass it to
    ``weights_result``: it counts the batches it computed, and the job records what each site ran. Methods that
    use the forget classes (``nvflare-unlearn methods`` lists them) need ``forget_loader`` over this site's
    forget-class images (without one the site trains on the retained term alone, and says so); a distilling method
    gets the original model (the teacher) from the task itself.
    """
    from nvflare_unlearn.unlearning import site_objective

    def teacher():
        _own, weights = split_teacher(fl_model.params or {})
        return teacher_from(fl_model.meta or {}, weights, model_name, num_classes, in_channels)

    meta = fl_model.meta or {}
    return site_objective(meta.get(META_METHOD), forget_classes_of(fl_model), num_classes, teacher, forget_loader, seed)


def verification_result(
    model: nn.Module, train_loader: Iterable, test_loader: Iterable, fl_model: FLModel, num_classes: int
) -> FLModel:
    """Answer the verify task (the forgetting check): aggregates of this site's data only, see
    ``nvflare_unlearn.runtime.verification`` for exactly what leaves the site."""
    from nvflare_unlearn.runtime.verification import site_verification

    meta = fl_model.meta or {}
    forget = forget_classes_of(fl_model)
    data = site_verification(model, meta.get(META_VERIFY), forget, num_classes, train_loader, test_loader)
    return FLModel(params_type=ParamsType.FULL, params=data, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 1})
