"""Server side: FedAvg with federated per-class evaluation after every round (pretraining, retraining, and the
fine-tuning phase of unlearning).

A narrow ``BaseFedAvg`` subclass. What it adds to NVFlare's ``FedAvg``: the global model's meta (pruning plan,
forget classes) is re-attached to every task, since NVFlare does not keep meta across rounds; a site that trained
on nothing (weight 0) is left out of the average instead of counted with weight 1; every round ends with a
federated evaluation (per-class correct/total from every site), whose U/R accuracy feeds NVFlare's ``stop_cond``
and the job's metrics record (``unlearning_metrics.json``).

No single site can steer it (``security`` options, math in ``nvflare_unlearn.protect.robust``): a site's FedAvg
weight and evaluation share are capped at its declared size (or a median-based cap), each site's update is
norm-clipped and the updates combined by a coordinate-wise median by default, and the evaluation leaves out sites
whose accuracy is an outlier, listing every site's own result in the metrics.
"""

from __future__ import annotations

import os
import time
from typing import Any, Generic, Optional, Sequence, TypeVar, overload

import numpy as np
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.math_utils import parse_compare_criteria
from nvflare.app_common.workflows.base_fedavg import BaseFedAvg
from nvflare.security.logging import secure_format_exception
from nvflare.widgets.info_collector import GroupInfoCollector, InfoCollector

from nvflare_unlearn import _io
from nvflare_unlearn._validation import check_num_classes, normalize_forget_classes
from nvflare_unlearn.fl.defs import (
    META_FORGET,
    META_MODEL_NAME,
    META_NUM_CLASSES,
    META_PLAN,
    META_PRUNE_MODE,
    META_RESUME,
    METRICS_FILE,
    PROGRESS_FILE,
    PROGRESS_STATS_GROUP,
    TASK_ACTIVATIONS,
    TASK_TRAIN,
    TASK_VALIDATE,
    TASK_VERIFY,
)
from nvflare_unlearn.fl.federated_eval import FederatedEvaluation, jsonable, site_name
from nvflare_unlearn.fl.job_record import TrainingRecord, UnlearningRecord
from nvflare_unlearn.fl.model_state import count_params, load_numpy_state, plan_from_meta, rebuild_model
from nvflare_unlearn.options import PRUNE_MODES, FederationOptions, OptionGroup, SecurityOptions, fold_legacy

G = TypeVar("G", bound=OptionGroup)

_PHASE_OF_TASK = {
    TASK_ACTIVATIONS: "activation",
    TASK_TRAIN: "train",
    TASK_VALIDATE: "validate",
    TASK_VERIFY: "validate",  # the forgetting check: evaluation-like passes over the sites' data
}


def site_weight(result: FLModel) -> float:
    """A site's claimed FedAvg weight (its ``NUM_STEPS_CURRENT_ROUND``); unusable values count as 1. The claim is
    capped before use (``protect.robust.size_caps``)."""
    value = (result.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
    try:
        weight = float(value)
    except (TypeError, ValueError):
        return 1.0
    return weight if np.isfinite(weight) and weight >= 0 else 1.0


class GroupView(Generic[G]):
    """A controller's option group, typed, read from the one place it is stored: the dict attribute named after the
    group, which NVFlare's job export reads back as the constructor argument of the same name."""

    def __init__(self, kind: type[G]):
        self.kind = kind

    @overload
    def __get__(self, obj: None, owner: type) -> GroupView[G]: ...
    @overload
    def __get__(self, obj: object, owner: type) -> G: ...
    def __get__(self, obj: Optional[object], owner: type) -> G | GroupView[G]:
        return self if obj is None else self.kind.from_dict(getattr(obj, self.kind.GROUP))


def _bounded(timeout: int, max_wait: Optional[int]) -> int:
    """A task timeout no longer than ``max_wait`` (0 = no limit)."""
    if max_wait is None:
        return timeout
    return min(timeout, max_wait) if timeout else max_wait


class FedAvgEvalController(FederatedEvaluation, BaseFedAvg):
    """FedAvg with federated per-class evaluation after every round; the base of the unlearning workflow."""

    _fed = GroupView(FederationOptions)
    _security = GroupView(SecurityOptions)

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        forget_classes: Optional[Sequence[int]] = None,
        federation: Optional[dict] = None,
        prune_mode: str = "remove",
        in_channels: Optional[int] = None,
        test_dataset: Optional[str] = None,
        test_data_root: Optional[str] = None,
        persistor_id: str = "persistor",
        job_kind: str = "train",
        security: Optional[dict] = None,
        **legacy: Any,
    ):
        """
        Args:
            model_name / num_classes / in_channels: the architecture of the global model (registry name or import
                path, see ``nvflare_unlearn.build_model``).
            forget_classes: the U set of the evaluation (for unlearning and retraining also dropped from training).
            federation: ``FederationOptions`` as a dict (rounds, quorum, timeouts, ``stop_cond``).
            prune_mode: how the plan in the model's meta is replayed when the server rebuilds the model.
            test_dataset / test_data_root: optional server-side test set ("digits", "cifar10", ...) evaluated
                centrally at every stage, next to the federated evaluation (simulator and benchmark runs).
            job_kind: label written into the metrics record ("pretrain", "retrain", "unlearn").
            security: ``SecurityOptions`` as a dict (declared site sizes, update aggregation, outlier tolerance).
            legacy: the flat federation keywords of version 0.1 (``num_rounds=...``), accepted with a FutureWarning.
        """
        if legacy:
            federation = fold_legacy({"federation": federation}, legacy, (FederationOptions,), type(self).__name__)[
                "federation"
            ]
        fed = FederationOptions.from_dict(federation)
        super().__init__(num_rounds=fed.num_rounds, persistor_id=persistor_id)
        if prune_mode not in PRUNE_MODES:
            raise ValueError(f"prune_mode must be one of {list(PRUNE_MODES)}, got {prune_mode!r}")
        self.model_name = model_name
        self.num_classes = check_num_classes(num_classes)
        self.forget_classes = normalize_forget_classes(forget_classes, self.num_classes, required=False)
        self.federation = fed.to_dict()
        self.prune_mode = prune_mode
        self.in_channels = in_channels
        self.test_dataset = test_dataset
        self.test_data_root = test_data_root
        self.job_kind = job_kind
        self.security = SecurityOptions.from_dict(security).to_dict()

        self._stop = parse_compare_criteria(fed.stop_cond) if fed.stop_cond else None
        self._record: TrainingRecord | UnlearningRecord = TrainingRecord()
        self._test_loader = None
        self._no_result: list[str] = []  # sites of the last task that returned nothing usable
        self._tasks_sent = 0
        self._progress: dict[str, Any] = {"job_kind": job_kind}
        self._round_base: Optional[dict] = None  # the global weights the current round's sites started from
        self._last_aggregation: dict = {}
        self._last_averaged: list[FLModel] = []  # the results the last aggregation averaged (round_record)

    # ------------------------------------------------------------------ plumbing
    def task_meta(self) -> dict:
        """What every task tells the sites besides the weights (rebuilt for each task: meta does not persist)."""
        return {
            META_PRUNE_MODE: self.prune_mode,
            META_FORGET: list(self.forget_classes),
            META_MODEL_NAME: self.model_name,
            META_NUM_CLASSES: self.num_classes,
        }

    def global_model(
        self,
        params: dict,
        plan_json: Optional[str],
        current_round: Optional[int] = None,
        meta_mode: Optional[str] = None,
    ) -> FLModel:
        """The FLModel every task carries: weights + the plan + ``task_meta`` (``meta_mode``: how sites replay it)."""
        meta = self.task_meta()
        if plan_json:
            meta[META_PLAN] = plan_json
        if meta_mode is not None:
            meta[META_PRUNE_MODE] = meta_mode
        return FLModel(
            params_type=ParamsType.FULL,
            params=params,
            current_round=current_round,
            total_rounds=self.num_rounds,
            meta=meta,
        )

    def send_to_sites(self, task_name: str, model: FLModel, max_wait: Optional[int] = None) -> list[FLModel]:
        """Broadcast a task to all sites; at least the phase's quorum of results, or a clear error.

        The quorum and timeout are the task's phase's (``FederationOptions.for_phase``): by default every site but
        one, so a site that dies mid-job costs at most ``wait_time_after_min_received`` per task, not the job.
        ``max_wait``: seconds this task may take at most, also when the phase's timeout is 0 (no limit).
        """
        phase = _PHASE_OF_TASK.get(task_name, "validate")
        everyone = self.sample_clients()
        min_clients, timeout = self._fed.for_phase(phase, len(everyone))
        # NVFlare deems a site disconnected some time (its dead-client grace period) after the site's job process
        # vanished: later tasks stop waiting for it
        deemed_gone = getattr(self.communicator, "get_client_disconnect_time", None)
        gone = [c for c in everyone if deemed_gone is not None and deemed_gone(c)]
        clients = [c for c in everyone if c not in gone]
        if len(clients) < min_clients:
            raise RuntimeError(
                f"only {len(clients)} site(s) connected, the {phase} phase needs min_clients={min_clients}"
            )
        results = self.broadcast_model(
            task_name=task_name,
            data=model,
            # every site: targets=None (NVFlare reads a target list's min_responses as the exact count it expects,
            # and warned "Number of results (2) is different from number of expected responses (1)" every task)
            targets=None if len(clients) == len(everyone) else clients,
            min_responses=min_clients,
            # The first task also waits for the sites to start (the simulator needs ~10 s for 4 sites), so
            # task_timeout would cut off healthy sites: it is bounded by min_clients + the straggler wait instead.
            timeout=_bounded(timeout if self._tasks_sent else 0, max_wait),
            wait_time_after_min_received=self._fed.wait_time_after_min_received,
        )
        self._tasks_sent += 1
        if self.abort_signal.triggered:  # not a quorum problem: the whole run is being ended
            raise RuntimeError(
                f"NVFlare aborted the run while task {task_name!r} was out (an admin's abort, or a site whose job "
                "process failed: NVFlare 2.9 ends the whole job then; the server's log.txt names the site in "
                "'Failing job ... due to reported failure from <site>')"
            )
        results = sorted(results, key=site_name)  # arrival order must not change sums (reproducible plans)
        answered = {site_name(r) for r in results}
        self._no_result = sorted(str(c) for c in everyone if str(c) not in answered)
        if self._no_result:
            self.warning(
                f"task {task_name!r}: no result from {self._no_result} (error, timeout or disconnect; see their logs); "
                f"going on with {sorted(answered)}"
            )
        if len(results) < min_clients:
            raise RuntimeError(
                f"task {task_name!r}: {len(results)} of {len(clients)} site(s) returned a result, "
                f"the {phase} phase needs min_clients={min_clients}; no result from {self._no_result}: "
                "see their logs (a site that died cannot rejoin a running job)"
            )
        return results

    def quorum(self, phase: str) -> int:
        """The quorum of ``phase`` for the sites connected now."""
        return self._fed.for_phase(phase, len(self.sample_clients()))[0]

    # ------------------------------------------------------------------ progress (what an operator watches)
    def set_progress(self, **fields: Any) -> None:
        """Update the job's progress: kept for ``show_stats`` (POC / production) and written to ``progress.json``
        in the run directory (the simulator), so the CLI can print phase, round and U/R while the job runs."""
        now = time.time()
        if "phase" in fields and fields["phase"] != self._progress.get("phase"):
            self._progress["phase_started"] = now
        self._progress.update(jsonable(fields))
        self._progress.setdefault("started", now)
        self._progress["updated"] = now
        try:
            _io.write_json(os.path.join(self.get_run_dir(), PROGRESS_FILE), self._progress, indent=None)
        except Exception as e:  # progress is for people watching: never fail the job over it
            self.debug(f"could not write progress: {secure_format_exception(e)}")

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == InfoCollector.EVENT_TYPE_GET_STATS:  # the admin's show_stats (as ScatterAndGather does)
            collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, None)
            if isinstance(collector, GroupInfoCollector):
                collector.add_info(group_name=PROGRESS_STATS_GROUP, info=dict(self._progress))

    def track(self, tag: str, value: Optional[float], step: int) -> None:
        """Log one scalar through NVFlare experiment tracking (a receiver on the server writes it)."""
        if value is None:
            return
        dxo = create_analytic_dxo(tag=tag, value=float(value), data_type=AnalyticsDataType.SCALAR, global_step=step)
        send_analytic_dxo(self, dxo, self.fl_ctx)

    def to_torch(self, model: FLModel):
        """The global model as a torch module (architecture from the name + the plan in its meta)."""
        net = rebuild_model(
            self.model_name, self.num_classes, plan_from_meta(model.meta), self.prune_mode, self.in_channels
        )
        return load_numpy_state(net, model.params)

    def should_stop_rounds(self, last_eval: Optional[dict]) -> bool:
        """NVFlare's ``stop_cond`` semantics ("<metric> <op> <value>") on the latest federated evaluation."""
        if self._stop is None or not last_eval:
            return False
        key, target, op_fn = self._stop
        value = last_eval.get(key)
        if value is not None and op_fn(value, target):
            self.info(f"{self._fed.stop_cond} holds ({key}={value:.4f}): stopping")
            return True
        return False

    # ------------------------------------------------------------------ FedAvg
    def _fedavg(self, results: list[FLModel]) -> FLModel:
        """The next global weights from the sites' models (``protect.robust.aggregate_updates``): claimed weights
        capped, malformed models and sites that trained on nothing (weight 0) left out, updates clipped, outlying
        updates left out, the rest combined as ``security.update_aggregation`` says."""
        from nvflare_unlearn.protect.robust import aggregate_updates, screen_update, size_caps

        if self._round_base is None:
            raise RuntimeError("the round's global weights are unknown: _fedavg runs inside run_rounds")
        usable, dropped = [], {}
        for r in results:
            reason = screen_update(self._round_base, r.params)
            if reason is not None:
                dropped[site_name(r)] = reason
                self.warning(f"left {site_name(r)} out of the average: {reason}")
            elif site_weight(r) > 0:
                usable.append(r)
        if not usable:
            raise RuntimeError("no site had retained-class data to train on this round")
        sec = self._security
        caps = size_caps({site_name(r): site_weight(r) for r in usable}, sec.site_sizes, sec.size_cap_factor)
        weights = [min(site_weight(r), caps[site_name(r)]) for r in usable]
        params, info = aggregate_updates(
            self._round_base,
            [r.params for r in usable],
            weights,
            sec.update_aggregation,
            sec.update_trim,
            sec.update_clip,
            sec.update_outlier,
        )
        names = [site_name(r) for r in usable]
        self._last_averaged = [r for i, r in enumerate(usable) if i not in set(info["left_out"])]
        self._last_aggregation = {
            "aggregation": sec.update_aggregation,
            "weights": dict(zip(names, weights)),
            "capped": sorted(n for n, r in zip(names, usable) if site_weight(r) > caps[n]),
            "clipped": [names[i] for i in info["clipped"]],
            "update_norms": dict(zip(names, info["update_norms"])),
            "left_out": [names[i] for i in info["left_out"]],
            "dropped": dropped,
        }
        return FLModel(params_type=ParamsType.FULL, params=params, meta={"nr_aggregated": len(usable)})

    def train_task_model(self, model: FLModel) -> FLModel:
        """What a train task carries besides ``global_model`` (the unlearning job adds its method's needs)."""
        return model

    def round_record(self, averaged: list[FLModel]) -> dict:
        """What a round's history entry keeps about the sites whose update was averaged, besides the aggregation
        (the unlearning job adds the loss each says it minimised)."""
        return {}

    def run_rounds(
        self,
        model: FLModel,
        stage: str = "train",
        first_step: int = 1,
        last_eval: Optional[dict] = None,
        history: Optional[list[dict]] = None,
    ) -> tuple[FLModel, list[dict]]:
        """FedAvg rounds on the retained classes, evaluating and persisting after each; returns (model, history).

        ``last_eval``: the evaluation of ``model`` as it comes in, so ``stop_cond`` can end the phase before round 1.
        ``history``: rounds already done (a resumed job): the rounds go on from the next one.
        """
        plan_json = (model.meta or {}).get(META_PLAN)
        history = list(history or [])
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)
        for current_round in range(self.start_round + len(history), self.start_round + self.num_rounds):
            self.current_round = current_round  # BaseFedAvg's attribute: components read it
            if self.should_stop_rounds(history[-1] if history else last_eval):
                break
            if self.abort_signal.triggered:
                raise RuntimeError("job aborted")
            step = first_step + self.current_round - self.start_round
            self.info(f"{stage} round {self.current_round + 1}/{self.num_rounds}")
            self.set_progress(
                phase=stage, round=self.current_round + 1, num_rounds=self.num_rounds, rounds_done=len(history)
            )
            model = self.global_model(model.params, plan_json, self.current_round)
            self._round_base = model.params  # the weights the sites start from (before a task adds a teacher)
            results = self.send_to_sites(TASK_TRAIN, self.train_task_model(model))
            no_result = list(self._no_result)  # crashed or timed-out sites: the round goes on without them
            if not any(site_weight(r) > 0 for r in results):
                raise RuntimeError(
                    f"round {self.current_round + 1}: no site had retained-class data to train on "
                    f"(sites: {[site_name(r) for r in results]})"
                )
            aggr = self.aggregate(results, aggregate_fn=self._fedavg)
            model = self.update_model(model, aggr)
            model = self.global_model(model.params, plan_json, self.current_round)  # re-attach the plan
            entry = self.evaluate(model, f"{stage} round {self.current_round + 1}", step)
            entry.update(
                round=self.current_round + 1,
                n_trained=int(aggr.meta.get("nr_aggregated", 0)),
                trained_sites=sorted(site_name(r) for r in results if site_weight(r) > 0),
                no_result=no_result,
                aggregation=jsonable(self._last_aggregation),
                **self.round_record(self._last_averaged),
            )
            history.append(entry)
            self._record.per_round = list(history)  # a job that fails later still records its rounds
            self._record.rounds = len(history)
            state = self.resume_state(len(history), history)
            if state is not None:  # saved with the weights: a stopped job can be resubmitted to go on from here
                model.meta[META_RESUME] = state
            self.save_model(model)
            model.meta.pop(META_RESUME, None)
            self.set_progress(rounds_done=len(history))
        return model, history

    def resume_state(self, rounds_done: int, history: Optional[list] = None) -> Optional[dict]:
        """The job state saved with each round's model (None: this job cannot be resumed)."""
        return None

    # ------------------------------------------------------------------ outputs
    def write_metrics(self, status: str, error: Optional[str] = None) -> str:
        """``unlearning_metrics.json`` in the server's run directory (atomically: a reader never sees half)."""
        record = self._record.to_dict()
        record.update(status=status, job_kind=self.job_kind, finished_at=time.time())
        if error:
            record["error"] = error
        path = os.path.join(self.get_run_dir(), METRICS_FILE)
        _io.write_json(path, jsonable(record))
        self.info(f"metrics written to {path} (status={status})")
        return path

    def run(self) -> None:
        try:
            self.run_workflow()
        except Exception as e:
            self.write_metrics("failed", error=secure_format_exception(e))
            raise

    def run_workflow(self) -> None:
        """Pretraining / retraining: evaluate the starting model, FedAvg rounds, evaluate, write the record."""
        from nvflare_unlearn.models import build_model

        model = self.load_model()
        if model is None or not model.params:
            raise RuntimeError("the persistor returned no model")
        model = self.global_model(model.params, (model.meta or {}).get(META_PLAN))
        net = self.to_torch(model)
        record = self._record = TrainingRecord(
            model_name=self.model_name,
            num_classes=self.num_classes,
            forget_classes=self.forget_classes,
            federation=self.federation,
            started_at=time.time(),
            params=count_params(net),
            params_full=count_params(build_model(self.model_name, self.num_classes, self.in_channels)),
        )
        self.set_progress(phase="start", num_rounds=self.num_rounds)
        record.initial = self.evaluate(model, "initial", 0)
        model, history = self.run_rounds(model, stage="train", first_step=1)
        record.per_round, record.rounds = history, len(history)
        record.final = history[-1] if history else record.initial
        self.save_model(model)
        self.set_progress(phase="done")
        self.write_metrics("completed")
