"""Helpers for sites that run their OWN NVFlare Client API script (``flare.receive()`` / ``flare.send()``) instead of
``UnlearningExecutor``. Pass ``train_script=`` to a recipe; the script then sees four tasks: ``class_activations``,
``train``, ``validate`` and ``verify`` (``fl.defs``).

The few-line way: ``SiteLoop`` (``from nvflare_unlearn.fl.site_loop import SiteLoop``; it builds on the helpers
here) owns the plugin's side of the loop. It answers
``class_activations``, ``validate`` and ``verify`` itself, so the script's own branches see only ``train`` (an
``is_evaluate()`` branch cannot catch the plugin's ``validate``), and hands back the rebuilt model with a fresh
optimizer from the script's factory::

    site = SiteLoop(build_net, 10, train_loader, test_loader, optimizer=lambda net: SGD(net.parameters(), lr=0.01))
    while site.is_running():                      # instead of flare.is_running()
        input_model = flare.receive()             # a train task
        model, optimizer = site.model, site.optimizer
        for images, labels in site.retained(train_loader):  # forget classes dropped
            optimizer.zero_grad()
            cost = site.loss(model(images), labels)         # the method's objective
            cost.backward()
            optimizer.step()                               # the method's before_step hook rides on it
        flare.send(site.result(model))             # weights + the objective's report

docs/examples/hello_pt/ shows it as a patch to a hello-pt-shaped script. The functions below are the same answers
for a script that dispatches every task itself::

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
        elif task == ua.TASK_VERIFY:
            flare.send(ua.verification_result(model, train_loader, test_loader, received, 10))

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

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from torch import nn

from nvflare_unlearn.fl.defs import (
    META_FORGET,
    META_METHOD,
    META_PRUNE_MODE,
    TASK_ACTIVATIONS,
    TASK_TRAIN,
    TASK_VALIDATE,
    TASK_VERIFY,
)
from nvflare_unlearn.fl.model_state import global_model
from nvflare_unlearn.fl.site_answers import (
    activation_answer,
    effective_privacy,
    protected_report,
    validation_answer,
    verification_answer,
    weights_answer,
)
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
    return global_model(fl_model.params, fl_model.meta, model_name, num_classes, in_channels)


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
    privacy: Optional[PrivacyOptions | dict] = None,
    ledger_path: Optional[str] = None,
) -> FLModel:
    """Answer the activation task: per-class sums and counts on local training data (statistics only), with the
    job's privacy (from ``fl_model``'s meta, tightened by ``privacy``, this site's own settings) applied.

    With DP, ``ledger_path`` (this site's privacy ledger file, kept across jobs; or ``dp_ledger`` in ``privacy``)
    is required, so a release beyond the site's budget is refused before anything leaves.
    """
    meta = (fl_model.meta or {}) if fl_model is not None else {}
    report, applied = protected_report(model, loader, num_classes, meta, privacy, hook_point, max_batches,
                                       ledger_path=ledger_path)  # fmt: skip
    params, out = activation_answer(report, applied)
    return FLModel(params_type=ParamsType.FULL, params=params, meta=out)


def weights_result(model: nn.Module, num_samples: int, objective: Optional[UnlearningObjective] = None) -> FLModel:
    """Answer the train task: the full state dict as numpy, weighted by the number of training samples.

    ``objective``: the one ``training_objective`` gave you and your loop minimised; its report (the loss and how
    many batches used it) goes back with the weights, so the job's record shows that this site ran the method. A
    job whose method needs more than plain cross-entropy lists a site that sends no report as "not reported".
    """
    params, meta = weights_answer(model, num_samples, objective.report() if objective is not None else None)
    return FLModel(params_type=ParamsType.FULL, params=params, meta=meta)


def validation_result(model: nn.Module, loader: Iterable, num_classes: int) -> FLModel:
    """Answer the validate task: per-class correct/total counts on local validation data."""
    metrics, meta = validation_answer(model, loader, num_classes)
    return FLModel(metrics=metrics, meta=meta)


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
        return global_model(fl_model.params, fl_model.meta, model_name, num_classes, in_channels, teacher=True)

    meta = fl_model.meta or {}
    return site_objective(meta.get(META_METHOD), forget_classes_of(fl_model), num_classes, teacher, forget_loader, seed)


def verification_result(
    model: nn.Module, train_loader: Iterable, test_loader: Iterable, fl_model: FLModel, num_classes: int
) -> FLModel:
    """Answer the verify task (the forgetting check): aggregates of this site's data only, see
    ``nvflare_unlearn.runtime.verification`` for exactly what leaves the site."""
    data, meta = verification_answer(
        model, fl_model.meta, forget_classes_of(fl_model), num_classes, train_loader, test_loader
    )
    return FLModel(params_type=ParamsType.FULL, params=data, meta=meta)
