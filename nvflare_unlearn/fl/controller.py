"""Server side: the workflows. ``FedAvgEvalController`` (FedAvg + federated per-class evaluation, used to pretrain
and to retrain) and ``UnlearningController`` (the paper's federated unlearning, Sec. 4), a multi-phase
``ModelController.run()`` in the style of NVFlare's own examples:

1. load the trained model (persistor) and evaluate it (federated ``validate``: per-class correct/total);
2. for each forget class: broadcast ``class_activations`` with the current plan in meta, screen and aggregate the
   reports, score channels with TF-IDF, extend the pruning plan, apply it;
3. persist the pruned model with its plan (new files; the original checkpoint is never touched), evaluate it;
4. fine-tune with FedAvg on the retained classes (the plan rides in the meta of EVERY round) for ``num_rounds``
   rounds or until retained-class accuracy reaches ``target_r_acc``, evaluating each round;
5. write ``unlearning_metrics.json`` and the final model (weights + plan) into the server's run directory, and log
   U/R accuracy through NVFlare experiment tracking (TensorBoard).

All math is in the core modules; this file only moves data between them and the sites.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, Sequence

import numpy as np

from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.base_fedavg import BaseFedAvg
from nvflare.security.logging import secure_format_exception

from .aggregator import ActivationAggregator
from .defs import (
    FINAL_MODEL_FILE,
    META_DP_SIGMA,
    META_FORGET,
    META_HOOK_POINT,
    META_MODEL_NAME,
    META_NUM_CLASSES,
    META_PLAN,
    META_PRUNE_MODE,
    METRIC_CORRECT,
    METRIC_TOTAL,
    METRICS_FILE,
    PLAN_FILE,
    PRUNE_MODES,
    PRUNED_MODEL_FILE,
    RECORD_FILE,
    TASK_ACTIVATIONS,
    TASK_TRAIN,
    TASK_VALIDATE,
)
from .model_state import conv_channels, count_params, load_numpy_state, parse_plan, rebuild_model, state_to_numpy


def _weight(result: FLModel) -> float:
    value = (result.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
    try:
        weight = float(value)
    except (TypeError, ValueError):
        return 1.0
    return weight if np.isfinite(weight) and weight >= 0 else 1.0


def _client(result: FLModel) -> str:
    return str((result.meta or {}).get("client_name", "unknown"))


def _jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays -> plain Python, so metrics always serialise."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class FedAvgEvalController(BaseFedAvg):
    """FedAvg with federated per-class evaluation after every round; the base of the unlearning workflow.

    Differences from NVFlare's ``FedAvg`` that the unlearning job needs: the global FLModel's meta (pruning plan,
    forget classes) is re-attached every round, a site that trained on nothing (weight 0) is left out of the average
    instead of counted with weight 1, rounds stop early at a retained-class accuracy target, and U/R accuracy is
    tracked and written to ``unlearning_metrics.json``.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        num_rounds: int = 5,
        forget_classes: Optional[Sequence[int]] = None,
        min_clients: int = 1,
        target_r_acc: Optional[float] = None,
        prune_mode: str = "remove",
        hook_point: str = "conv",
        in_channels: Optional[int] = None,
        test_dataset: Optional[str] = None,
        test_data_root: Optional[str] = None,
        task_timeout: int = 0,
        wait_time_after_min_received: int = 10,
        persistor_id: str = "persistor",
        job_kind: str = "train",
    ):
        """
        Args:
            model_name / num_classes / in_channels: registry architecture of the global model.
            num_rounds: FedAvg rounds (fine-tuning rounds for unlearning; 0 = none).
            forget_classes: classes reported as the U set (and, for unlearning, forgotten and left out of training).
            min_clients: fewest sites whose results a task needs; fewer -> the job stops with a clear error.
            target_r_acc: stop training once federated retained-class accuracy reaches it (fraction 0..1).
            prune_mode / hook_point: sent to the sites in every task's meta.
            test_dataset / test_data_root: optional server-side test set ("digits", "cifar10", ...) evaluated
                centrally at every stage, next to the federated evaluation (simulator and benchmark runs).
            task_timeout: seconds a task may take (0 = no limit); a site past it is left out of that task. Not
                applied to the job's first task, which also waits for the sites to start up.
            wait_time_after_min_received: seconds to wait for stragglers once min_clients results are in.
            job_kind: label written into the metrics record ("pretrain", "retrain", ...).
        """
        super().__init__(num_rounds=num_rounds, persistor_id=persistor_id)
        if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 0:
            raise ValueError(f"num_rounds must be an integer >= 0, got {num_rounds!r}")
        if prune_mode not in PRUNE_MODES:
            raise ValueError(f"prune_mode must be one of {list(PRUNE_MODES)}, got {prune_mode!r}")
        if target_r_acc is not None and not 0.0 < float(target_r_acc) <= 1.0:
            raise ValueError(f"target_r_acc is a fraction in (0, 1], got {target_r_acc}")
        self.model_name = model_name
        self.num_classes = num_classes
        self.forget_classes = [int(c) for c in forget_classes] if forget_classes else []
        self.min_clients = min_clients
        self.target_r_acc = target_r_acc
        self.prune_mode = prune_mode
        self.hook_point = hook_point
        self.in_channels = in_channels
        self.test_dataset = test_dataset
        self.test_data_root = test_data_root
        self.task_timeout = task_timeout
        self.wait_time_after_min_received = wait_time_after_min_received
        self.job_kind = job_kind

        self._record: dict[str, Any] = {}
        self._test_loader = None
        self._no_result: list[str] = []  # sites of the last task that returned nothing usable
        self._tasks_sent = 0

    # ------------------------------------------------------------------ plumbing
    def _global_model(self, params: dict, plan_json: Optional[str], current_round: Optional[int] = None) -> FLModel:
        """The FLModel every task carries: weights + plan + forget classes (meta is rebuilt each time)."""
        meta = {
            META_PRUNE_MODE: self.prune_mode,
            META_FORGET: list(self.forget_classes),
            META_HOOK_POINT: self.hook_point,
            META_MODEL_NAME: self.model_name,
            META_NUM_CLASSES: self.num_classes,
        }
        if plan_json:
            meta[META_PLAN] = plan_json
        return FLModel(
            params_type=ParamsType.FULL,
            params=params,
            current_round=current_round,
            total_rounds=self.num_rounds,
            meta=meta,
        )

    def _send(self, task_name: str, model: FLModel) -> list[FLModel]:
        """Broadcast a task to all sites; at least ``min_clients`` valid results or a clear error."""
        clients = self.sample_clients()
        if len(clients) < self.min_clients:
            raise RuntimeError(f"only {len(clients)} site(s) connected, the job needs min_clients={self.min_clients}")
        results = self.broadcast_model(
            task_name=task_name,
            data=model,
            targets=clients,
            min_responses=self.min_clients,
            # The first task also waits for the sites to start (the simulator needs ~10 s for 4 sites), so
            # task_timeout would cut off healthy sites: it is bounded by min_clients + the straggler wait instead.
            timeout=self.task_timeout if self._tasks_sent else 0,
            wait_time_after_min_received=self.wait_time_after_min_received,
        )
        self._tasks_sent += 1
        results = sorted(results, key=_client)  # arrival order must not change sums (reproducible plans)
        answered = {_client(r) for r in results}
        self._no_result = sorted(str(c) for c in clients if str(c) not in answered)
        if self._no_result:
            self.warning(
                f"task {task_name!r}: no result from {self._no_result} (error, timeout or disconnect; see their logs); "
                f"going on with {sorted(answered)}"
            )
        if len(results) < self.min_clients:
            raise RuntimeError(
                f"task {task_name!r}: {len(results)} of {len(clients)} site(s) returned a result, "
                f"min_clients={self.min_clients}; see the site logs for their errors"
            )
        return results

    def _track(self, tag: str, value: Optional[float], step: int) -> None:
        """Log one scalar through NVFlare experiment tracking (a TBAnalyticsReceiver on the server writes it)."""
        if value is None:
            return
        dxo = create_analytic_dxo(tag=tag, value=float(value), data_type=AnalyticsDataType.SCALAR, global_step=step)
        send_analytic_dxo(self, dxo, self.fl_ctx)

    def _server_test_loader(self):
        if self.test_dataset is None:
            return None
        if self._test_loader is None:
            from torch.utils.data import DataLoader

            from ..data import load_dataset

            data = load_dataset(self.test_dataset, root=self.test_data_root, split="test")
            self._test_loader = DataLoader(data, batch_size=256, shuffle=False)
        return self._test_loader

    def evaluate(self, model: FLModel, stage: str, step: int) -> dict:
        """Federated evaluation: sum the sites' per-class correct/total, derive U/R and class-wise accuracy."""
        from ..metrics import class_correct_total, u_r_accuracy

        results = self._send(TASK_VALIDATE, model)
        correct = np.zeros(self.num_classes, dtype=np.int64)
        total = np.zeros(self.num_classes, dtype=np.int64)
        sites = []
        for r in results:
            metrics = r.metrics or {}
            c = np.asarray(metrics.get(METRIC_CORRECT, []), dtype=np.int64)
            t = np.asarray(metrics.get(METRIC_TOTAL, []), dtype=np.int64)
            if c.shape != (self.num_classes,) or t.shape != (self.num_classes,) or np.any(c < 0) or np.any(c > t):
                self.warning(f"{stage}: ignoring malformed evaluation counts from {_client(r)}")
                continue
            correct += c
            total += t
            sites.append(_client(r))
        if len(sites) < self.min_clients:
            raise RuntimeError(f"{stage}: only {len(sites)} valid evaluation result(s), min_clients={self.min_clients}")
        entry = dict(u_r_accuracy(correct, total, self.forget_classes))
        entry.update(
            acc=float(correct.sum() / max(total.sum(), 1)),
            correct=correct.tolist(),
            total=total.tolist(),
            sites=sites,
        )
        loader = self._server_test_loader()
        if loader is not None:
            net = self._to_torch(model)
            c, t = class_correct_total(net, loader, self.num_classes)
            entry["server"] = dict(u_r_accuracy(c, t, self.forget_classes))
            entry["server"].update(acc=float(c.sum() / max(t.sum(), 1)), correct=c.tolist(), total=t.tolist())
        self.info(
            f"[{stage}] federated accuracy: U={_fmt(entry.get('u_acc'))} R={_fmt(entry.get('r_acc'))} "
            f"all={_fmt(entry['acc'])} ({int(total.sum())} samples, {len(sites)} site(s))"
        )
        group = "original" if stage == "original" else "accuracy"  # step 0 of "accuracy" = the pruned model
        for key in ("u_acc", "r_acc", "acc"):
            self._track(f"{group}/{key}", entry.get(key), step)
        return _jsonable(entry)

    def _to_torch(self, model: FLModel):
        net = rebuild_model(
            self.model_name, self.num_classes, (model.meta or {}).get(META_PLAN), self.prune_mode, self.in_channels
        )
        return load_numpy_state(net, model.params)

    def _fedavg(self, results: list[FLModel]) -> FLModel:
        """Sample-weighted average of the sites' weights, leaving out sites that trained on nothing (weight 0)."""
        helper = WeightedAggregationHelper()
        used = []
        for r in results:
            w = _weight(r)
            if w > 0:
                helper.add(data=r.params, weight=w, contributor_name=_client(r), contribution_round=r.current_round)
                used.append(_client(r))
        if not used:
            raise RuntimeError("no site had retained-class data to train on this round")
        return FLModel(params_type=ParamsType.FULL, params=helper.get_result(), meta={"nr_aggregated": len(used)})

    def run_rounds(self, model: FLModel, stage: str = "train", first_step: int = 1) -> tuple[FLModel, list[dict]]:
        """FedAvg rounds on the retained classes, evaluating and persisting after each; returns (model, history)."""
        plan_json = (model.meta or {}).get(META_PLAN)
        history: list[dict] = []
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)
        for self.current_round in range(self.start_round, self.start_round + self.num_rounds):
            last_r = history[-1]["r_acc"] if history else self._record.get("_last_r_acc")
            if self.target_r_acc is not None and last_r is not None and last_r >= self.target_r_acc:
                self.info(f"retained-class accuracy {last_r:.4f} >= target {self.target_r_acc}: stopping")
                break
            if self.abort_signal.triggered:
                raise RuntimeError("job aborted")
            step = first_step + self.current_round - self.start_round
            self.info(f"{stage} round {self.current_round + 1}/{self.num_rounds}")
            model = self._global_model(model.params, plan_json, self.current_round)
            results = self._send(TASK_TRAIN, model)
            no_result = list(self._no_result)  # crashed or timed-out sites: the round goes on without them
            if not any(_weight(r) > 0 for r in results):
                raise RuntimeError(
                    f"round {self.current_round + 1}: no site had retained-class data to train on "
                    f"(sites: {[_client(r) for r in results]})"
                )
            aggr = self.aggregate(results, aggregate_fn=self._fedavg)
            model = self.update_model(model, aggr)
            model = self._global_model(model.params, plan_json, self.current_round)  # re-attach the plan
            self.save_model(model)
            entry = self.evaluate(model, f"{stage} round {self.current_round + 1}", step)
            entry.update(
                round=self.current_round + 1,
                n_trained=int(aggr.meta.get("nr_aggregated", 0)),
                trained_sites=sorted(_client(r) for r in results if _weight(r) > 0),
                no_result=no_result,
            )
            history.append(entry)
        return model, history

    # ------------------------------------------------------------------ outputs
    def _write_record(self, status: str, error: Optional[str] = None) -> str:
        record = {k: v for k, v in self._record.items() if not k.startswith("_")}
        record.update(status=status, job_kind=self.job_kind, finished_at=time.time())
        if error:
            record["error"] = error
        path = os.path.join(self.get_run_dir(), METRICS_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_jsonable(record), f, indent=2)
        os.replace(tmp, path)
        self.info(f"metrics written to {path} (status={status})")
        return path

    def run(self) -> None:
        try:
            self.run_workflow()
        except Exception as e:
            self._write_record("failed", error=secure_format_exception(e))
            raise

    def run_workflow(self) -> None:
        """Pretraining / retraining: evaluate the starting model, FedAvg rounds, evaluate, write the record."""
        from ..models import build_model

        model = self.load_model()
        if model is None or not model.params:
            raise RuntimeError("the persistor returned no model")
        model = self._global_model(model.params, (model.meta or {}).get(META_PLAN))
        net = self._to_torch(model)
        self._record.update(
            model_name=self.model_name,
            num_classes=self.num_classes,
            forget_classes=self.forget_classes,
            started_at=time.time(),
            params=count_params(net),
            params_full=count_params(build_model(self.model_name, self.num_classes, self.in_channels)),
        )
        self._record["initial"] = self.evaluate(model, "initial", 0)
        model, history = self.run_rounds(model, stage="train", first_step=1)
        self._record["per_round"] = history
        self._record["rounds"] = len(history)
        self._record["final"] = history[-1] if history else self._record["initial"]
        self.save_model(model)
        self._write_record("completed")


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class UnlearningController(FedAvgEvalController):
    """Federated class unlearning (Wang et al., WWW 2022): activations -> TF-IDF -> pruning -> FedAvg fine-tune."""

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        forget_classes: Sequence[int],
        prune_ratio: float = 0.1,
        num_rounds: int = 5,
        scope: str = "global",
        direction: str = "highest",
        idf: str = "paper",
        tf_norm: str = "share",
        coe: Optional[float] = None,
        min_channels: int = 1,
        prune_mode: str = "remove",
        hook_point: str = "conv",
        min_clients: int = 1,
        target_r_acc: Optional[float] = None,
        aggregator: Optional[ActivationAggregator] = None,
        in_channels: Optional[int] = None,
        test_dataset: Optional[str] = None,
        test_data_root: Optional[str] = None,
        task_timeout: int = 0,
        wait_time_after_min_received: int = 10,
        persistor_id: str = "persistor",
        min_count: int = 0,
        clip_bound: Optional[float] = None,
        dp_epsilon: Optional[float] = None,
        dp_delta: Optional[float] = None,
    ):
        """
        Args:
            forget_classes: class ids to forget, one statistics + pruning pass each (the paper's multi-class rule).
            prune_ratio: R, the fraction of scored channels pruned per class, in (0, 1).
            scope / direction / idf / tf_norm / coe / min_channels: plan options of ``build_pruning_plan`` and
                ``tfidf_scores`` (paper defaults: global threshold, prune the highest scores, paper IDF, share TF).
            prune_mode: "remove" (physical removal) or "mask" (shapes kept, channels held at zero).
            aggregator: how activation reports are screened and combined (default: exact count-weighted mean).
            min_count / clip_bound / dp_epsilon / dp_delta: the sites' upload privacy settings, for the audit
                record (the sites apply them). ``dp_epsilon`` / ``dp_delta`` are the whole request's budget, split
                evenly over the activation passes (one per forget class, basic composition).
            Other arguments: see ``FedAvgEvalController``.
        """
        super().__init__(
            model_name=model_name,
            num_classes=num_classes,
            num_rounds=num_rounds,
            forget_classes=forget_classes,
            min_clients=min_clients,
            target_r_acc=target_r_acc,
            prune_mode=prune_mode,
            hook_point=hook_point,
            in_channels=in_channels,
            test_dataset=test_dataset,
            test_data_root=test_data_root,
            task_timeout=task_timeout,
            wait_time_after_min_received=wait_time_after_min_received,
            persistor_id=persistor_id,
            job_kind="unlearn",
        )
        if not self.forget_classes:
            raise ValueError("forget_classes must name at least one class to forget")
        if not 0.0 < float(prune_ratio) < 1.0:
            raise ValueError(f"prune_ratio must be in (0, 1), got {prune_ratio}")
        self.prune_ratio = prune_ratio
        self.scope = scope
        self.direction = direction
        self.idf = idf
        self.tf_norm = tf_norm
        self.coe = coe
        self.min_channels = min_channels
        self.aggregator = aggregator
        self.min_count = min_count
        self.clip_bound = clip_bound
        self.dp_epsilon = dp_epsilon
        self.dp_delta = dp_delta

    def _collect_means(self, model: FLModel, net, forget_class: int) -> tuple[dict, dict]:
        """One activation round: broadcast, screen and aggregate the sites' reports into class means."""
        aggregator = self.aggregator or ActivationAggregator(num_classes=self.num_classes)
        aggregator.fl_ctx = self.fl_ctx
        aggregator.set_expected_layers(conv_channels(net))
        results = self._send(TASK_ACTIVATIONS, model)
        no_result = list(self._no_result)
        sigmas = {_client(r): (r.meta or {}).get(META_DP_SIGMA) for r in results}
        for r in results:
            aggregator.accept_model(r)
        accepted = aggregator.accepted_sites
        if len(accepted) < self.min_clients:
            raise RuntimeError(
                f"class {forget_class}: {len(accepted)} valid activation report(s), min_clients={self.min_clients}; "
                f"rejected: {aggregator.rejected}, no result from: {no_result or 'none'}"
            )
        merged = aggregator.aggregate_model()
        merged.meta["no_result"] = no_result
        merged.meta["dp_sigma"] = {s: sigmas.get(s) for s in accepted}
        counts = merged.meta["counts"]
        if counts[forget_class] == 0:
            raise RuntimeError(
                f"no site holds samples of class {forget_class}: its channels cannot be identified; "
                "check the class id and the sites' data"
            )
        return merged.params, merged.meta

    def run_workflow(self) -> None:
        from ..checkpoint import save_checkpoint
        from ..prune import apply_pruning_plan
        from ..tfidf import tfidf_scores

        started = time.time()
        loaded = self.load_model()
        if loaded is None or not loaded.params:
            raise RuntimeError("the persistor returned no model to unlearn from")
        plan_json = (loaded.meta or {}).get(META_PLAN)
        model = self._global_model(loaded.params, plan_json)
        net = self._to_torch(model)
        self._record.update(
            model_name=self.model_name,
            num_classes=self.num_classes,
            forget_classes=self.forget_classes,
            options=dict(
                prune_ratio=self.prune_ratio, scope=self.scope, direction=self.direction, idf=self.idf,
                tf_norm=self.tf_norm, coe=self.coe, min_channels=self.min_channels, prune_mode=self.prune_mode,
                hook_point=self.hook_point, num_rounds=self.num_rounds, target_r_acc=self.target_r_acc,
                min_clients=self.min_clients,
                aggregation=(self.aggregator.method if self.aggregator else "mean"),
                trim=(self.aggregator.trim if self.aggregator else None), task_timeout=self.task_timeout,
                wait_time_after_min_received=self.wait_time_after_min_received, min_count=self.min_count,
                clip_bound=self.clip_bound, dp_epsilon=self.dp_epsilon, dp_delta=self.dp_delta,
            ),
            started_at=started,
            params_before=count_params(net),
        )  # fmt: skip
        original_path = getattr(self.persistor, "initial_ckpt", None)
        if not original_path or not os.path.isfile(original_path):
            raise RuntimeError("the audit record needs the original checkpoint: the persistor has no initial_ckpt")
        from ..audit import sha256_file

        original_sha = sha256_file(original_path)
        self._record["original_model"] = {"path": original_path, "sha256": original_sha}
        self._record["original"] = self.evaluate(model, "original", 0)

        # Phase 2: one statistics + pruning pass per forget class; the plan composes across classes.
        plan = parse_plan(plan_json)
        activation_rounds = []
        for forget_class in self.forget_classes:
            t0 = time.time()
            channels = int(sum(conv_channels(net).values()))  # this pass's DP sensitivity depends on it
            means, info = self._collect_means(model, net, forget_class)
            means = {k: np.maximum(v, 0.0) for k, v in means.items()}  # noisy (DP) means may dip below 0
            scores = tfidf_scores(means, forget_class, idf=self.idf, tf_norm=self.tf_norm, coe=self.coe)
            plan = self._extend_plan(net, plan, scores, forget_class)
            plan.steps[-1]["scoring"] = {
                "idf": self.idf, "tf_norm": self.tf_norm, "coe": self.coe, "hook_point": self.hook_point,
                "class_counts": [int(c) for c in info["counts"]], "sites": list(info["sites"]),
            }  # fmt: skip
            net = apply_pruning_plan(net, plan, mode=self.prune_mode)  # only the new step is applied
            model = self._global_model(state_to_numpy(net), plan.to_json())
            activation_rounds.append(
                dict(forget_class=forget_class, sites=info["sites"], rejected=info["rejected"], counts=info["counts"],
                     no_result=info["no_result"], channels=channels, site_counts=info["site_counts"],
                     dp_sigma=info["dp_sigma"],
                     params=count_params(net), seconds=round(time.time() - t0, 3))
            )  # fmt: skip
            self.info(f"class {forget_class}: pruned to {count_params(net)} parameters (sites {info['sites']})")
        self._record["activation_rounds"] = activation_rounds
        self._record["params_after"] = count_params(net)
        self._record["plan_summary"] = plan.summary(net)

        # Phase 3: persist the pruned model and its plan (new files), evaluate it.
        run_dir = self.get_run_dir()
        with open(os.path.join(run_dir, PLAN_FILE), "w") as f:
            f.write(plan.to_json())
        save_checkpoint(
            os.path.join(run_dir, PRUNED_MODEL_FILE), net, plan, self.model_name, self.num_classes,
            extra={"prune_mode": self.prune_mode, "stage": "pruned", "forget_classes": self.forget_classes},
        )  # fmt: skip
        self._record["pruned"] = self.evaluate(model, "pruned", 0)
        self._record["_last_r_acc"] = self._record["pruned"].get("r_acc")

        # Phase 4: FedAvg fine-tuning on the retained classes, plan attached every round.
        model, history = self.run_rounds(model, stage="finetune", first_step=1)
        self._record["per_round"] = history
        self._record["rounds"] = len(history)
        self._record["unlearned"] = history[-1] if history else self._record["pruned"]

        # Phase 5: the final model (weights + plan) through the persistor, the audit record, then the metrics.
        self.save_model(model)
        if sha256_file(original_path) != original_sha:
            raise RuntimeError(f"the original checkpoint {original_path} changed during the job")
        final_path = os.path.join(run_dir, getattr(self.persistor, "output_file", FINAL_MODEL_FILE))
        self._write_audit_record(original_path, final_path, plan, activation_rounds, started)
        self._record["files"] = dict(
            pruned_model=PRUNED_MODEL_FILE, plan=PLAN_FILE, metrics=METRICS_FILE, record=RECORD_FILE
        )
        self._record["seconds"] = round(time.time() - started, 3)
        self._write_record("completed")

    def _write_audit_record(self, original_path, final_path, plan, activation_rounds, started) -> str:
        """``unlearning_record.json`` (``audit.build_record``): what was asked, done and measured, with digests."""
        from ..audit import build_record, write_record
        from ..privacy import gaussian_sigma, sensitivity, split_budget

        params = dict(self._record["options"])
        if self.dp_epsilon is not None:
            eps, delta = split_budget(self.dp_epsilon, self.dp_delta, len(self.forget_classes))
            params["dp_per_pass"] = {"epsilon": eps, "delta": delta, "passes": len(self.forget_classes)}
            # sigma depends on the channels still present at each pass (the model shrinks pass by pass)
            params["dp_sigma"] = [
                gaussian_sigma(eps, delta, sensitivity(a["channels"], self.clip_bound))
                for a in activation_rounds
            ]
        site_counts: dict[str, list[int]] = {}
        rejected: dict[str, list[str]] = {}
        for a in activation_rounds:
            site_counts.update(a["site_counts"])
            for site, why in a["rejected"].items():
                rejected.setdefault(site, []).append(f"class {a['forget_class']}: {why}")
            for site in a["no_result"]:
                rejected.setdefault(site, []).append(
                    f"class {a['forget_class']}: no result (the site failed or timed out, see its log)"
                )
        keys = ("u_acc", "r_acc", "acc", "mia")
        record = build_record(
            forget_classes=self.forget_classes,
            num_classes=self.num_classes,
            parameters=_jsonable(params),
            original_model_path=original_path,
            final_model_path=final_path,
            plan=plan,
            site_counts=site_counts,
            metrics_before={k: self._record["original"][k] for k in keys if k in self._record["original"]},
            metrics_after={k: self._record["unlearned"][k] for k in keys if k in self._record["unlearned"]},
            started_at=started,
            finished_at=time.time(),
            rejected_sites={s: "; ".join(v) for s, v in sorted(rejected.items())},
        )
        path = str(write_record(os.path.join(self.get_run_dir(), RECORD_FILE), record))
        self.info(f"audit record written to {path} (plan sha256 {record['plan']['sha256'][:12]}...)")
        return path

    def _extend_plan(self, net, plan, scores: dict, forget_class: int):
        """Add one forget class's step to the plan (indices of the original model, see ``build_pruning_plan``).

        In mask mode the model keeps its original widths, so the plan is built on a shape-only remove-mode replica
        and the scores are restricted to the channels still present.
        """
        from ..plan import build_pruning_plan

        shape_net = net
        if self.prune_mode == "mask" and plan is not None:
            kept = plan.kept_channels()
            scores = {n: (np.asarray(s)[kept[n]] if n in kept else s) for n, s in scores.items()}
            shape_net = rebuild_model(self.model_name, self.num_classes, plan.to_json(), "remove", self.in_channels)
        return build_pruning_plan(
            shape_net, scores, self.prune_ratio, scope=self.scope, direction=self.direction,
            min_channels=self.min_channels, forget_class=forget_class, base_plan=plan, model_name=self.model_name,
        )  # fmt: skip
