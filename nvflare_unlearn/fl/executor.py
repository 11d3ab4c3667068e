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

import math
import zlib
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.security.logging import secure_format_exception

from ..activations import WIRE_SUMS_DTYPE
from .defs import (
    META_DP_SIGMA,
    META_FORGET,
    META_HOOK_POINT,
    META_PLAN,
    META_PRUNE_MODE,
    METRIC_CORRECT,
    METRIC_TOTAL,
    TASK_ACTIVATIONS,
    TASK_TRAIN,
    TASK_VALIDATE,
)
from .model_state import load_numpy_state, rebuild_model, state_to_numpy
from .site_data import check_data_spec, load_site_split


def check_dp_options(clip_bound, dp_epsilon, dp_delta) -> None:
    """Clip bound and (epsilon, delta) as the sites will use them; a clear ValueError before any job starts."""
    from ..privacy import validate_clip_bound

    if clip_bound is not None:
        validate_clip_bound(clip_bound)
    if (dp_epsilon is None) != (dp_delta is None):
        raise ValueError("give dp_epsilon and dp_delta together (Gaussian noise needs both), or neither")
    if dp_epsilon is None:
        return
    if clip_bound is None:
        raise ValueError("dp_epsilon needs clip_bound: the noise is calibrated to activations clipped to [0, B]")
    for name, value in (("dp_epsilon", dp_epsilon), ("dp_delta", dp_delta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not dp_delta < 1:
        raise ValueError(f"dp_delta must be < 1, got {dp_delta!r}")


class UnlearningExecutor(Executor):
    def __init__(
        self,
        model_name: str,
        num_classes: int,
        dataset: str = "digits",
        data_root: Optional[str] = None,
        partition: str = "iid",
        n_sites: int = 1,
        alpha: float = 0.5,
        q: float = 0.5,
        data_seed: int = 0,
        train_subset: Optional[int] = None,
        batch_size: int = 64,
        local_epochs: int = 1,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        forget_classes: Optional[Sequence[int]] = None,
        hook_point: str = "conv",
        max_activation_batches: Optional[int] = None,
        min_count: int = 0,
        clip_bound: Optional[float] = None,
        dp_epsilon: Optional[float] = None,
        dp_delta: Optional[float] = None,
        in_channels: Optional[int] = None,
        seed: int = 0,
        torch_threads: int = 1,
        activations_task: str = TASK_ACTIVATIONS,
        train_task: str = TASK_TRAIN,
        validate_task: str = TASK_VALIDATE,
    ):
        """Plain arguments only, so FedJob can export the executor into a job config.

        Args:
            model_name / num_classes / in_channels: the registry architecture (``nvflare_unlearn.build_model``).
            dataset, data_root, partition, n_sites, alpha, q, data_seed, train_subset: where this site's data
                comes from (see ``site_data.load_site_split``); ``data_root`` may contain ``{site_name}``.
            batch_size, local_epochs, lr, momentum, weight_decay: local SGD per ``train`` task.
            forget_classes: classes this site never trains on (the server also sends them in each task's meta;
                the union is dropped). Used alone by retraining from scratch.
            hook_point: default activation hook when the task does not say ("conv" = raw conv output).
            max_activation_batches: cap on the activation pass (None = all local training data).
            min_count: a class with fewer local images is not reported (sums and count zeroed), in the spirit of
                NVFlare's MinCountCleanser (``nvflare_unlearn.privacy.apply_min_count``).
            clip_bound: clip each image's pooled activation to [0, B] before summing (bounds one image's effect).
            dp_epsilon / dp_delta: add Gaussian noise to the per-class sums, (epsilon, delta)-DP per activation
                pass for one added/removed image (``privacy.gaussian_noise``; needs ``clip_bound``). The noise is
                drawn from fresh OS entropy: the server must not be able to reproduce and subtract it.
            seed: base seed for shuffling; the round number and site name vary it.
            torch_threads: torch intra-op threads in this client process (1 keeps simulated sites from fighting).
        """
        super().__init__()
        check_data_spec(dataset, partition, n_sites, alpha, q)
        if isinstance(local_epochs, bool) or not isinstance(local_epochs, int) or local_epochs < 0:
            raise ValueError(f"local_epochs must be an integer >= 0, got {local_epochs!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model_name = model_name
        self.num_classes = num_classes
        self.dataset = dataset
        self.data_root = data_root
        self.partition = partition
        self.n_sites = n_sites
        self.alpha = alpha
        self.q = q
        self.data_seed = data_seed
        self.train_subset = train_subset
        self.batch_size = batch_size
        self.local_epochs = local_epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.forget_classes = [int(c) for c in forget_classes] if forget_classes else None
        self.hook_point = hook_point
        self.max_activation_batches = max_activation_batches
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
            raise ValueError(f"min_count must be an integer >= 0, got {min_count!r}")
        self.min_count = min_count
        check_dp_options(clip_bound, dp_epsilon, dp_delta)
        self.clip_bound = clip_bound
        self.dp_epsilon = dp_epsilon
        self.dp_delta = dp_delta
        self.in_channels = in_channels
        self.seed = seed
        self.torch_threads = torch_threads
        self.activations_task = activations_task
        self.train_task = train_task
        self.validate_task = validate_task

        self._site_name = None
        self._train_data = None
        self._val_data = None
        self._device = None

    # ------------------------------------------------------------------ lifecycle
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            if self.torch_threads:
                torch.set_num_threads(int(self.torch_threads))
            from ..metrics import pick_device

            self._device = pick_device()
            self._site_name = fl_ctx.get_identity_name()

    def _data(self, split: str):
        """This site's train or validation split, loaded once per job."""
        if split == "train" and self._train_data is None:
            self._train_data = load_site_split(
                self._site_name, "train", self.dataset, self.data_root, self.partition, self.n_sites,
                self.data_seed, self.alpha, self.q, subset=self.train_subset,
            )  # fmt: skip
        if split == "test" and self._val_data is None:
            self._val_data = load_site_split(
                self._site_name, "test", self.dataset, self.data_root, self.partition, self.n_sites,
                self.data_seed, self.alpha, self.q,
            )  # fmt: skip
        return self._train_data if split == "train" else self._val_data

    # ------------------------------------------------------------------ dispatch
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self._site_name is None:  # START_RUN not seen (e.g. a unit test driving execute directly)
            self._site_name = fl_ctx.get_identity_name()
            from ..metrics import pick_device

            self._device = pick_device()
        handlers = {
            self.activations_task: self._class_activations,
            self.train_task: self._train,
            self.validate_task: self._validate,
        }
        handler = handlers.get(task_name)
        if handler is None:
            self.log_error(fl_ctx, f"unknown task {task_name!r}; this executor serves {sorted(handlers)}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            fl_model = FLModelUtils.from_shareable(shareable)
            meta = fl_model.meta or {}
            model = rebuild_model(
                self.model_name,
                self.num_classes,
                plan_json=meta.get(META_PLAN),
                mode=meta.get(META_PRUNE_MODE, "remove"),
                in_channels=self.in_channels,
            )
            load_numpy_state(model, fl_model.params or {})
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
        generator = None
        if shuffle:
            generator = torch.Generator()
            generator.manual_seed(zlib.crc32(f"{self.seed}:{self._site_name}:{round_num or 0}".encode()))
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, generator=generator, num_workers=0)

    def _class_activations(self, model, fl_model, meta, fl_ctx, abort_signal) -> DXO:
        from ..activations import collect_class_activations

        data = self._data("train")
        report = collect_class_activations(
            model,
            self._loader(data, shuffle=False, round_num=None),
            self.num_classes,
            hook_point=meta.get(META_HOOK_POINT, self.hook_point),
            device=self._device,
            max_batches=self.max_activation_batches,
            clip=self.clip_bound,
        )
        if self.min_count > 1:
            from ..privacy import apply_min_count

            report = apply_min_count(report, self.min_count)
        sigma = 0.0
        if self.dp_epsilon is not None:  # after min-count: counts are public, a dropped class stays at zero
            import numpy as np

            from ..privacy import gaussian_noise, gaussian_sigma, sensitivity, total_channels

            report = gaussian_noise(report, self.dp_epsilon, self.dp_delta, self.clip_bound, np.random.default_rng())
            sigma = gaussian_sigma(
                self.dp_epsilon, self.dp_delta, sensitivity(total_channels(report), self.clip_bound)
            )
        counts = [int(c) for c in report.counts]
        self.log_info(
            fl_ctx,
            f"activation report: {sum(counts)} samples, per class {counts}, {report.nbytes} bytes, "
            f"noise sigma {sigma:g}",
        )
        return DXO(
            data_kind=DataKind.COLLECTION,
            data=report.to_dict(sums_dtype=WIRE_SUMS_DTYPE),
            meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: int(sum(counts)), META_DP_SIGMA: float(sigma)},
        )

    def _forget_set(self, meta) -> list[int]:
        forget = set(self.forget_classes or [])
        forget.update(int(c) for c in (meta.get(META_FORGET) or []))
        return sorted(forget)

    def _train(self, model, fl_model, meta, fl_ctx, abort_signal) -> DXO:
        from ..data import filter_classes
        from ..metrics import train_epochs

        forget = self._forget_set(meta)
        data = self._data("train")
        if forget:
            data = filter_classes(data, drop=forget)
        n = len(data)
        if n == 0 or self.local_epochs == 0:
            # Nothing to learn from: hand the global weights back with zero weight so aggregation skips this site.
            self.log_info(fl_ctx, f"no retained training data (forget classes {forget}): zero-weight result")
            return DXO(
                data_kind=DataKind.WEIGHTS,
                data=state_to_numpy(model),
                meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 0},
            )
        after_step = None
        if meta.get(META_PLAN) and meta.get(META_PRUNE_MODE) == "mask":
            from ..prune import enforce_masks

            after_step = enforce_masks  # pruned channels must stay at zero through training
        steps = train_epochs(
            model,
            self._loader(data, shuffle=True, round_num=fl_model.current_round),
            epochs=self.local_epochs,
            lr=self.lr,
            device=self._device,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            after_step=after_step,
        )
        self.log_info(fl_ctx, f"trained {self.local_epochs} epoch(s), {steps} steps on {n} samples (dropped {forget})")
        return DXO(
            data_kind=DataKind.WEIGHTS,
            data=state_to_numpy(model),
            meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: n},
        )

    def _validate(self, model, fl_model, meta, fl_ctx, abort_signal) -> DXO:
        from ..metrics import class_correct_total

        data = self._data("test")
        correct, total = class_correct_total(
            model, self._loader(data, shuffle=False, round_num=None), self.num_classes, device=self._device
        )
        return DXO(
            data_kind=DataKind.METRICS,
            data={METRIC_CORRECT: [int(c) for c in correct], METRIC_TOTAL: [int(t) for t in total]},
            meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: int(sum(total))},
        )
