"""The plugin's side of a Client API script's loop, in one object: a few changed lines turn an ordinary NVFlare
Client API training script (NVIDIA's hello-pt shape) into one that serves pretraining, unlearning and retraining.

``SiteLoop.is_running()`` replaces ``flare.is_running()``: it receives each task, answers the plugin's own tasks
(``class_activations``, ``validate``, ``verify``) with the plugin's code (``client_api`` -> ``site_answers``) and
returns to the user's loop only for ``train`` (or a task the plugin does not know). That is the guard against
NVIDIA's helpers: ``flare.is_evaluate()`` compares the task with the ``ClientAPIExecutor``'s ``evaluate_task_name``,
``"validate"`` by default, which is also the plugin's validate task; since the user's branches never see a plugin
task, an ``is_evaluate()`` branch placed first cannot swallow it (and ``is_train()`` is true exactly for ``train``).

For ``train`` it hands the user this round's model (``model``: the factory with the pruning plan replayed, global
weights loaded) and a FRESH optimizer from the user's factory (``optimizer``): an optimizer built once at the top
of the script would keep stepping last round's parameters, a silent no-op, so ``result`` refuses a round in which
batches were trained but ``optimizer`` never stepped. ``retained(loader)`` drops the forget classes from the
user's batches, ``loss(predictions, labels)`` is the method's objective (``unlearning.site_objective``) on the
batch just yielded, the method's ``before_step`` hook (and, in mask mode, ``enforce_masks``) ride on the
optimizer's step hooks, and ``result(model)`` sends the weights with the objective's report.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from nvflare.app_common.abstract.fl_model import FLModel
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from nvflare_unlearn.fl.client_api import (
    activation_result,
    forget_classes_of,
    model_from_flmodel,
    prune_mode_of,
    validation_result,
    verification_result,
    weights_result,
)
from nvflare_unlearn.fl.defs import META_METHOD, TASK_ACTIVATIONS, TASK_VALIDATE, TASK_VERIFY
from nvflare_unlearn.fl.model_state import global_model
from nvflare_unlearn.options import PrivacyOptions

__all__ = ["PLUGIN_TASKS", "SiteLoop"]

#: the tasks ``SiteLoop.is_running`` answers itself; the user's branches never see them
PLUGIN_TASKS = (TASK_ACTIVATIONS, TASK_VALIDATE, TASK_VERIFY)

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


def _pair(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return torch.as_tensor(batch[0]), torch.as_tensor(batch[1], dtype=torch.int64)
    raise TypeError(f"SiteLoop reads (images, labels) batches, got {type(batch).__name__}")


class SiteLoop:
    """The plugin's half of a Client API script (module docstring); the user keeps the training loop.

    Args:
        model: the model factory (``"module:factory"`` or the factory itself), called as ``factory(num_classes=K)``.
        num_classes: K.
        train_loader / test_loader: this site's data as ``(images, labels)`` batches; the activation statistics
            and the forgetting check read the training data, ``validate`` the test data.
        optimizer: ``factory(model) -> torch.optim.Optimizer``, called once per ``train`` task on the new model.
        device: where the model runs (default: CUDA when visible, else CPU).
        privacy / ledger_path: this site's own privacy settings and ledger (``client_api.activation_result``).
        forget_batch_size: batch size of the forget-class images a method such as NegGrad+ trains away from
            (default: ``train_loader.batch_size``).
        seed: the objective's random draws (per site: the site name is mixed in).
        flare: the Client API module (``nvflare.client``; tests pass a stand-in).
    """

    def __init__(
        self,
        model: str | Callable[..., nn.Module],
        num_classes: int,
        train_loader: Iterable,
        test_loader: Iterable,
        optimizer: OptimizerFactory,
        device: Optional[torch.device | str] = None,
        privacy: Optional[PrivacyOptions | dict] = None,
        ledger_path: Optional[str] = None,
        forget_batch_size: Optional[int] = None,
        seed: int = 0,
        flare: Any = None,
    ):
        if not callable(optimizer) or isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer= takes a factory, e.g. lambda net: SGD(net.parameters(), lr=0.01): the model is rebuilt "
                "every round, so an optimizer built once would step last round's parameters"
            )
        if flare is None:
            import nvflare.client as flare
        from nvflare_unlearn.runtime import pick_device

        self.model_name, self.num_classes = model, int(num_classes)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.optimizer_factory = optimizer
        self.device = torch.device(device) if device is not None else pick_device()
        self.privacy, self.ledger_path = privacy, ledger_path
        self.forget_batch_size = forget_batch_size or getattr(train_loader, "batch_size", None) or 32
        self.seed = int(seed)
        self.flare = flare
        self._forget_cache: dict[tuple[int, ...], Optional[TensorDataset]] = {}
        self._reset()

    # -- the loop ---------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self.received: Optional[FLModel] = None
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.objective = None
        self.forget_classes: list[int] = []
        self._batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._batches = self._steps = self._samples = 0

    def is_running(self) -> bool:
        """``flare.is_running()`` that answers the plugin's tasks itself: True when a task for the user's code
        (``train``) is waiting (``flare.receive()`` then returns it), False when the job is over."""
        while self.flare.is_running():
            self._reset()
            received = self.flare.receive()
            if received is None:
                return False
            task = self.flare.get_task_name()
            self.received = received
            self.model = model_from_flmodel(received, self.model_name, self.num_classes).to(self.device)
            answer = self._answers().get(task)
            if answer is None:  # train (or a task the plugin does not send): the user's branches handle it
                self._prepare_training(received)
                return True
            self.flare.send(answer(self.model, received))
        return False

    def _answers(self) -> dict[str, Callable[[nn.Module, FLModel], FLModel]]:
        k = self.num_classes
        return {
            TASK_ACTIVATIONS: lambda m, r: activation_result(
                m, self.train_loader, k, r, privacy=self.privacy, ledger_path=self.ledger_path
            ),
            TASK_VALIDATE: lambda m, r: validation_result(m, self.test_loader, k),
            TASK_VERIFY: lambda m, r: verification_result(m, self.train_loader, self.test_loader, r, k),
        }

    def _prepare_training(self, received: FLModel) -> None:
        from nvflare_unlearn.unlearning import site_objective

        self.forget_classes = forget_classes_of(received)
        meta = received.meta or {}

        def teacher() -> nn.Module:
            return global_model(received.params, meta, self.model_name, self.num_classes, teacher=True).to(self.device)

        site = str(self.flare.get_site_name())
        seed = zlib.crc32(f"{self.seed}:{site}".encode())
        forget = self.forget_classes
        self.objective = site_objective(meta.get(META_METHOD), forget, self.num_classes, teacher,
                                        lambda: self._forget_loader(forget), seed)  # fmt: skip
        self.optimizer = self._fresh_optimizer(prune_mode_of(received) == "mask")

    def _fresh_optimizer(self, masked: bool) -> torch.optim.Optimizer:
        optimizer = self.optimizer_factory(self.model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        own = {id(p) for p in self.model.parameters()}
        if not any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the optimizer factory must build the optimizer over the model it is given")

        def before_step(*_args: Any) -> None:
            self._steps += 1
            if self.objective is not None:
                self.objective.before_step(self.model)  # the method's hook between backward and step

        def after_step(*_args: Any) -> None:
            if masked:
                from nvflare_unlearn.method.prune import enforce_masks

                enforce_masks(self.model)  # prune_mode="mask": pruned channels stay at zero

        optimizer.register_step_pre_hook(before_step)
        optimizer.register_step_post_hook(after_step)
        return optimizer

    def _forget_loader(self, forget: list[int]) -> Optional[DataLoader]:
        """This site's forget-class images (for methods that train away from them), gathered once per job from
        the training loader; None when the site holds none."""
        key = tuple(forget)
        if key not in self._forget_cache:
            wanted = torch.tensor(forget, dtype=torch.int64)
            xs, ys = [], []
            for batch in self.train_loader:
                x, y = _pair(batch)
                keep = torch.isin(y, wanted)
                xs.append(x[keep])
                ys.append(y[keep])
            n = sum(len(y) for y in ys)
            self._forget_cache[key] = TensorDataset(torch.cat(xs), torch.cat(ys)) if n else None
        data = self._forget_cache[key]
        if data is None:
            return None
        return DataLoader(data, batch_size=self.forget_batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))  # fmt: skip

    # -- what the user's training loop calls ------------------------------------------------------------------
    def retained(self, loader: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The user's ``(images, labels)`` batches without this task's forget classes (empty batches skipped)."""
        self._require_train("retained")
        wanted = torch.tensor(self.forget_classes, dtype=torch.int64)
        rows = 0
        for batch in loader:
            x, y = _pair(batch)
            if len(wanted):
                keep = ~torch.isin(y, wanted)
                x, y = x[keep], y[keep]
            if not len(y):
                continue
            rows += len(y)
            self._batches += 1
            self._batch = (x, y)
            yield x, y
        self._samples = max(self._samples, rows)  # one pass = the site's retained samples (the FedAvg weight)

    def loss(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of the batch ``retained`` just yielded: the method's objective (``objective.batch_loss``),
        or cross-entropy when the task asks for none (pretraining)."""
        self._require_train("loss")
        if self._batch is None:
            raise RuntimeError("site.loss(predictions, labels) is the loss of a batch from site.retained(loader)")
        images, expected = self._batch
        if labels.shape != expected.shape or not torch.equal(labels.detach().cpu(), expected):
            raise RuntimeError("site.loss got labels other than those of the batch site.retained(loader) yielded last")
        if self.objective is None:
            return F.cross_entropy(predictions, labels)
        return self.objective.batch_loss(self.model, images.to(predictions.device), labels, logits=predictions)

    def result(self, model: Optional[nn.Module] = None) -> FLModel:
        """The train task's answer: ``model``'s weights, weighted by the retained samples, with the objective's
        report. Refuses the traps that would otherwise pass silently."""
        self._require_train("result")
        if model is not None and model is not self.model:
            raise ValueError("send the model site.model gave you this round (the plugin rebuilds it every round)")
        if self._batches and not self._steps:
            raise RuntimeError(
                f"{self._batches} batch(es) were trained but site.optimizer never stepped: an optimizer built once "
                "at the top of the script still holds last round's parameters. Take it each round: "
                "model, optimizer = site.model, site.optimizer"
            )
        if self._batches and self.objective is not None and not self.objective.steps:
            raise RuntimeError(
                f"this round asks for the method {self.objective.options.method!r}: compute the loss with "
                "site.loss(predictions, labels), not your own"
            )
        if not self._samples:  # nothing retained to train on: weight 0, left out of the average (as the executor)
            return weights_result(self.model, 0)
        return weights_result(self.model, self._samples, self.objective)

    def _require_train(self, what: str) -> None:
        if self.model is None or self.optimizer is None:
            raise RuntimeError(f"site.{what}() belongs to a train task: call it after site.is_running() returned True")
