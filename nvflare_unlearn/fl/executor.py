"""Client side: one NVFlare ``Executor`` that serves every task of pretraining, unlearning and retraining.

Each task rebuilds the model from the registry name and the plan in the task's meta (the plan arrives on every
round), loads the numpy weights, and works on this site's own data:

- ``class_activations``: per-class activation SUMS and COUNTS on local training data -> DXO(COLLECTION).
  Statistics only: no image, label or per-sample value leaves the site.
- ``train``: local SGD on the retained classes only (the executor drops the forget classes itself) ->
  DXO(WEIGHTS) weighted by the number of samples. A site left with no retained data returns the global weights
  unchanged with weight 0, so the round goes on without it.
- ``validate``: per-class correct/total counts on local validation data -> DXO(METRICS).
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Optional, Sequence

import torch
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.security.logging import secure_format_exception
from torch.utils.data import DataLoader

from nvflare_unlearn._validation import check_num_classes, normalize_forget_classes
from nvflare_unlearn.fl import defs
from nvflare_unlearn.fl.model_state import global_model
from nvflare_unlearn.fl.site_answers import (
    activation_answer,
    protected_report,
    validation_answer,
    verification_answer,
    weights_answer,
)
from nvflare_unlearn.fl.site_data import load_site_split
from nvflare_unlearn.options import (
    PrivacyOptions,
    ScoringOptions,
    SiteDataOptions,
    TrainingOptions,
    fold_legacy,
)
from nvflare_unlearn.runtime.batches import EpochPermutation, site_shuffle_seed

_GROUPS = (SiteDataOptions, TrainingOptions, ScoringOptions, PrivacyOptions)


class UnlearningExecutor(Executor):
    def __init__(
        self,
        model_name: str,
        num_classes: int,
        site_data: Optional[dict] = None,
        training: Optional[dict] = None,
        scoring: Optional[dict] = None,
        privacy: Optional[dict] = None,
        forget_classes: Optional[Sequence[int]] = None,
        in_channels: Optional[int] = None,
        torch_threads: int = 1,
        activations_task: str = defs.TASK_ACTIVATIONS,
        train_task: str = defs.TASK_TRAIN,
        validate_task: str = defs.TASK_VALIDATE,
        verify_task: str = defs.TASK_VERIFY,
        **legacy: Any,
    ):
        """Plain arguments only (the option groups as dicts), so FedJob can export the executor into a job config.

        Args:
            model_name / num_classes / in_channels: the architecture (``nvflare_unlearn.build_model``).
            site_data: ``SiteDataOptions``: where this site's data comes from (``data_root`` may contain
                ``{site_name}``).
            training: ``TrainingOptions``: local SGD per ``train`` task; its seed varies the batch order.
            scoring: ``ScoringOptions``: the activation hook when the task does not say, and the pass's batch cap.
            privacy: ``PrivacyOptions``: min-count, per-image clipping and Gaussian noise on this site's upload.
                ``dp_epsilon`` / ``dp_delta`` are the whole request's budget: each activation pass (one per forget
                class named in the task) spends an equal share (basic composition), charged first to this site's
                privacy ledger, which refuses a release beyond ``dp_budget_*`` (default: one request). ``dp_unit``
                says what epsilon protects. The noise is drawn from fresh OS entropy: the server must not be able
                to reproduce and subtract it.
            forget_classes: classes this site never trains on (the server also sends them in each task's meta;
                the union is dropped). Used alone by retraining from scratch.
            torch_threads: torch intra-op threads in this client process (1 keeps simulated sites from fighting).
            legacy: version 0.1's flat keywords (``dataset=..., lr=...``), accepted with a FutureWarning.
        """
        super().__init__()
        if legacy:
            folded = fold_legacy(
                dict(site_data=site_data, training=training, scoring=scoring, privacy=privacy),
                legacy,
                _GROUPS,
                "UnlearningExecutor",
            )
            site_data, training, scoring, privacy = (folded[g.GROUP] for g in _GROUPS)
        self.model_name = model_name
        self.num_classes = check_num_classes(num_classes)
        self.site_data = SiteDataOptions.from_dict(site_data).to_dict()
        self.training = TrainingOptions.from_dict(training).to_dict()
        self.scoring = ScoringOptions.from_dict(scoring).to_dict()
        self.privacy = PrivacyOptions.from_dict(privacy).to_dict()
        self.forget_classes = normalize_forget_classes(forget_classes, self.num_classes, required=False)
        self.in_channels = in_channels
        self.torch_threads = torch_threads
        self.activations_task = activations_task
        self.train_task = train_task
        self.validate_task = validate_task
        self.verify_task = verify_task

        self._training = TrainingOptions.from_dict(self.training)
        self._scoring = ScoringOptions.from_dict(self.scoring)
        self._privacy = PrivacyOptions.from_dict(self.privacy)
        self._site_name = None
        self._train_data = None
        self._val_data = None
        self._device = None

    # ------------------------------------------------------------------ lifecycle
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            if self.torch_threads:
                torch.set_num_threads(int(self.torch_threads))
            from nvflare_unlearn.runtime import pick_device

            self._device = pick_device()
            self._site_name = fl_ctx.get_identity_name()

    def _data(self, split: str):
        """This site's train or validation split, loaded once per job."""
        if split == "train" and self._train_data is None:
            self._train_data = load_site_split(self._site_name, "train", self.site_data)
        if split == "test" and self._val_data is None:
            self._val_data = load_site_split(self._site_name, "test", self.site_data)
        return self._train_data if split == "train" else self._val_data

    # ------------------------------------------------------------------ dispatch
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self._site_name is None:  # START_RUN not seen (e.g. a unit test driving execute directly)
            self._site_name = fl_ctx.get_identity_name()
            from nvflare_unlearn.runtime import pick_device

            self._device = pick_device()
        handlers = {
            self.activations_task: self._class_activations,
            self.train_task: self._train,
            self.validate_task: self._validate,
            self.verify_task: self._verify,
        }
        handler = handlers.get(task_name)
        if handler is None:
            self.log_error(fl_ctx, f"unknown task {task_name!r}; this executor serves {sorted(handlers)}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            fl_model = FLModelUtils.from_shareable(shareable)
            meta = fl_model.meta or {}
            model = global_model(fl_model.params, meta, self.model_name, self.num_classes, self.in_channels)
            model.to(self._device)
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            dxo = handler(model, fl_model, meta, fl_ctx, abort_signal)
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            return dxo.to_shareable()
        except ValueError as e:  # bad task data (plan/weights mismatch, bad option): the server should know why
            self.log_error(fl_ctx, f"task {task_name!r} rejected: {secure_format_exception(e)}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        except Exception as e:
            self.log_exception(fl_ctx, f"task {task_name!r} failed: {secure_format_exception(e)}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    # ------------------------------------------------------------------ tasks
    def _loader(self, data, shuffle: bool, round_num: Optional[int]) -> DataLoader:
        """Batches of ``data``; shuffled, each epoch is one ``torch.randperm`` of a generator seeded by
        ``site_shuffle_seed`` (``EpochPermutation``: the in-process federation draws the same order)."""
        sampler = None
        if shuffle:
            sampler = EpochPermutation(
                len(data), site_shuffle_seed(self._training.seed, self._site_name, round_num or 0)
            )
        return DataLoader(data, batch_size=self._training.batch_size, sampler=sampler, num_workers=0)

    def _class_activations(self, model, fl_model, meta, fl_ctx, abort_signal) -> DXO:
        report, applied = protected_report(  # the same code path as a user's Client API script
            model,
            self._loader(self._data("train"), shuffle=False, round_num=None),
            self.num_classes,
            meta,
            own_privacy=self._privacy,
            hook_point=self._scoring.hook_point,
            max_batches=self._scoring.max_activation_batches,
            device=self._device,
            ledger_path=self._ledger_path(fl_ctx),
        )
        counts = [int(c) for c in report.counts]
        self.log_info(
            fl_ctx,
            f"activation report: {sum(counts)} samples, per class {counts}, {report.nbytes} bytes, "
            f"privacy applied {applied}",
        )
        return DXO(DataKind.COLLECTION, *activation_answer(report, applied))

    def _ledger_path(self, fl_ctx: FLContext) -> Optional[str]:
        """This site's privacy ledger file: ``dp_ledger`` (``{site_name}`` filled in), else ``privacy_ledger.json`` in
        the site's workspace root (kept across jobs, unlike the job's run folder); None without a workspace (a DP
        request is then refused by ``protected_report``)."""
        path = self._privacy.dp_ledger
        if path is None:
            engine = fl_ctx.get_engine()
            if engine is None:
                return None
            path = os.path.join(engine.get_workspace().get_root_dir(), "privacy_ledger.json")
        return path.replace("{site_name}", str(self._site_name))

    def _forget_set(self, meta) -> list[int]:
        forget = set(self.forget_classes)
        forget.update(int(c) for c in (meta.get(defs.META_FORGET) or []))
        return sorted(forget)

    def _train(self, model, fl_model, meta, fl_ctx, abort_signal) -> DXO:
        from nvflare_unlearn.data import filter_classes
        from nvflare_unlearn.runtime import train_epochs

        forget = self._forget_set(meta)
        data = self._data("train")
        if forget:
            data = filter_classes(data, drop=forget)
        n = len(data)
        if n == 0 or self._training.local_epochs == 0:
            # Nothing to learn from: hand the global weights back with zero weight so aggregation skips this site.
            self.log_info(fl_ctx, f"no retained training data (forget classes {forget}): zero-weight result")
            return DXO(DataKind.WEIGHTS, *weights_answer(model, 0))
        after_step = None
        if meta.get(defs.META_PLAN) and meta.get(defs.META_PRUNE_MODE) == "mask":
            from nvflare_unlearn.method.prune import enforce_masks

            after_step = enforce_masks  # pruned channels must stay at zero through training
        objective = self._objective(fl_model, forget)
        losses: list[float] = []
        steps = train_epochs(
            model,
            self._loader(data, shuffle=True, round_num=fl_model.current_round),
            epochs=self._training.local_epochs,
            lr=self._training.lr,
            device=self._device,
            momentum=self._training.momentum,
            weight_decay=self._training.weight_decay,
            after_step=after_step,
            loss_fn=objective.batch_loss if objective is not None else None,
            before_step=objective.before_step if objective is not None else None,
            losses=losses,
        )
        mean_loss = sum(losses) / len(losses) if losses else None
        self.log_info(
            fl_ctx,
            f"trained {self._training.local_epochs} epoch(s), {steps} steps on {n} samples (dropped {forget}), "
            f"mean loss {mean_loss}",
        )
        if mean_loss is not None and fl_ctx.get_engine() is not None:  # NVFlare experiment tracking: the server's
            # receivers (TensorBoard, MLflow) log it; a unit test or benchmark driving execute() has no engine
            dxo = create_analytic_dxo(
                tag="train_loss",
                value=mean_loss,
                data_type=AnalyticsDataType.SCALAR,
                global_step=fl_model.current_round,
            )
            send_analytic_dxo(self, dxo, fl_ctx)
        applied = objective.report() if objective is not None else {"loss": "ce", "steps": steps, "forget_steps": 0}
        return DXO(DataKind.WEIGHTS, *weights_answer(model, n, applied))

    def _objective(self, fl_model, forget: list[int]):
        """This round's objective (``unlearning.site_objective``: the one site path), None without forget classes."""
        from nvflare_unlearn.data import filter_classes
        from nvflare_unlearn.unlearning import site_objective

        params, meta = fl_model.params, fl_model.meta or {}

        def teacher():
            net = global_model(params, meta, self.model_name, self.num_classes, self.in_channels, teacher=True)
            return net.to(self._device)

        def forget_loader():
            held = filter_classes(self._data("train"), keep=forget)
            return self._loader(held, shuffle=True, round_num=fl_model.current_round) if len(held) else None

        seed = zlib.crc32(f"{self._training.seed}:{self._site_name}".encode())
        return site_objective(meta.get(defs.META_METHOD), forget, self.num_classes, teacher, forget_loader, seed)

    def _verify(self, model, fl_model, meta, fl_ctx, abort_signal) -> DXO:
        """The forgetting check (``runtime.verification``): round "stats" or "scores" on this site's data."""
        train = self._loader(self._data("train"), shuffle=False, round_num=None)
        test = self._loader(self._data("test"), shuffle=False, round_num=None)
        answer = verification_answer(model, meta, self._forget_set(meta), self.num_classes, train, test, self._device)
        return DXO(DataKind.COLLECTION, *answer)

    def _validate(self, model, fl_model, meta, fl_ctx, abort_signal) -> DXO:
        test = self._loader(self._data("test"), shuffle=False, round_num=None)
        return DXO(DataKind.METRICS, *validation_answer(model, test, self.num_classes, device=self._device))
