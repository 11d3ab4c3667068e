"""Server side: federated class unlearning (Wang et al., WWW 2022, Sec. 4) as a multi-phase ``run()``.

1. load the trained model (persistor) and evaluate it (federated ``validate``: per-class correct/total);
2. for each forget class: broadcast ``class_activations`` with the current plan in meta, screen and aggregate the
   reports (the ``ActivationAggregator`` component), then ``unlearning_step`` and apply the extended plan
   (``fl.pruning_phase``; a method that does not prune only prepares the model);
3. persist the pruned model with its plan (new files; the original checkpoint is never touched), evaluate it;
4. fine-tune with FedAvg on the retained classes (``FedAvgEvalController.run_rounds``; the plan rides in the meta
   of EVERY round) for ``num_rounds`` rounds or until ``stop_cond`` holds, evaluating each round;
5. write the final model, ``unlearning_metrics.json`` and the SIGNED audit record (with the public key beside it)
   into the server's run directory.

Each phase is one short method below; what they find goes into a typed ``fl.job_record.UnlearningRecord`` (the
metrics file), and the audit record is assembled from it by ``protect.record.build_job_record``.

All math is in ``nvflare_unlearn.method``; this file only moves data between it and the sites.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel

from nvflare_unlearn import _io
from nvflare_unlearn._validation import normalize_forget_classes
from nvflare_unlearn.fl.defs import (
    META_HOOK_POINT,
    META_METHOD,
    META_OBJECTIVE_APPLIED,
    META_ORIGINAL_CKPT,
    META_OUTPUT_FILE,
    META_PLAN,
    META_PRIVACY,
    META_RESUME,
    META_TEACHER_PLAN,
    META_VERIFY,
    METRICS_FILE,
    PLAN_FILE,
    PRUNED_MODEL_FILE,
    RECORD_FILE,
    RECORD_PUBLIC_KEY_FILE,
    TASK_VERIFY,
    TEACHER_PREFIX,
)
from nvflare_unlearn.fl.fedavg_eval_controller import FedAvgEvalController, GroupView
from nvflare_unlearn.fl.federated_eval import jsonable, site_name
from nvflare_unlearn.fl.job_record import UnlearningRecord, resume_problem
from nvflare_unlearn.fl.model_state import count_params, parse_plan, state_to_numpy
from nvflare_unlearn.fl.pruning_phase import PruningPhase
from nvflare_unlearn.options import (
    FederationOptions,
    PlanOptions,
    PrivacyOptions,
    ScoringOptions,
    SecurityOptions,
    fold_legacy,
)
from nvflare_unlearn.unlearning import MethodOptions

#: seconds a site may take per verification round when task_timeout is not set (the check must not hang the job)
VERIFY_TIMEOUT_S = 900

_GROUPS = (MethodOptions, ScoringOptions, PlanOptions, PrivacyOptions, FederationOptions, SecurityOptions)


class _Original(NamedTuple):
    """The model a job starts from as the persistor loaded it, and the original checkpoint the record names."""

    model: FLModel
    path: str
    sha256: str
    plan_json: Optional[str]
    output_file: str  # the final model's file name in the run directory
    resume: Optional[dict]  # the saved job state, when the persistor loaded a round checkpoint to resume


class UnlearningController(PruningPhase, FedAvgEvalController):
    """Federated class unlearning: activations -> TF-IDF -> pruning -> FedAvg fine-tune -> record."""

    _method = GroupView(MethodOptions)
    _scoring = GroupView(ScoringOptions)
    _plan = GroupView(PlanOptions)
    _privacy = GroupView(PrivacyOptions)

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        forget_classes: Sequence[int],
        unlearning: Optional[dict] = None,
        scoring: Optional[dict] = None,
        plan: Optional[dict] = None,
        privacy: Optional[dict] = None,
        federation: Optional[dict] = None,
        in_channels: Optional[int] = None,
        test_dataset: Optional[str] = None,
        test_data_root: Optional[str] = None,
        persistor_id: str = "persistor",
        aggregator_id: str = "activation_aggregator",
        security: Optional[dict] = None,
        **legacy: Any,
    ):
        """
        Args:
            forget_classes: class ids to forget, one statistics + pruning pass each (the paper's multi-class rule).
            unlearning / scoring / plan / privacy / federation: the option groups as dicts (``nvflare_unlearn.options``;
                ``unlearning`` holds the method (``nvflare-unlearn methods``) and its recovery; unset, the measured
                default, resolved here so the metrics and the record carry the concrete method).
                ``privacy`` is what the sites were configured with; the audit record states it. ``security``: declared
                site sizes, robust fine-tuning and evaluation, and the key the record is signed with
                (``protect.signing.find_signing_key``).
            aggregator_id: the ``ActivationAggregator`` component that screens and combines the sites' reports.
            legacy: version 0.1's flat keywords (``prune_ratio=...``), accepted with a FutureWarning.
            Other arguments: see ``FedAvgEvalController``.
        """
        if legacy:
            folded = fold_legacy(
                dict(
                    unlearning=unlearning,
                    scoring=scoring,
                    plan=plan,
                    privacy=privacy,
                    federation=federation,
                    security=security,
                ),
                legacy,
                _GROUPS,
                type(self).__name__,
            )
            unlearning, scoring, plan, privacy, federation, security = (folded[g.GROUP] for g in _GROUPS)
        plan_opts = PlanOptions.from_dict(plan)
        super().__init__(
            model_name=model_name,
            num_classes=num_classes,
            forget_classes=forget_classes,
            federation=federation,
            prune_mode=plan_opts.prune_mode,
            in_channels=in_channels,
            test_dataset=test_dataset,
            test_data_root=test_data_root,
            persistor_id=persistor_id,
            job_kind="unlearn",
            security=security,
        )
        self.forget_classes = normalize_forget_classes(forget_classes, self.num_classes)
        self.unlearning = MethodOptions.from_dict(unlearning).resolved().to_dict()  # unset: the measured default
        self.scoring = ScoringOptions.from_dict(scoring).to_dict()
        self.plan = plan_opts.to_dict()
        self.privacy = PrivacyOptions.from_dict(privacy).to_dict()
        self.aggregator_id = aggregator_id
        self._record: UnlearningRecord = UnlearningRecord()
        self._teacher: Optional[dict] = None  # the original weights, sent with train tasks when the objective distils
        self._teacher_plan: Optional[str] = None  # ... and the plan that shaped them (an original pruned before)

    def task_meta(self) -> dict:
        # the privacy the job asks for: a site applies it (or stricter settings of its own) and says what it applied
        return {**super().task_meta(), META_HOOK_POINT: self._scoring.hook_point, META_PRIVACY: dict(self.privacy)}

    def options(self) -> dict:
        """Every option group as a dict, as the request states them in the metrics and the record."""
        return {g.GROUP: getattr(self, g.GROUP) for g in _GROUPS}

    def run_workflow(self) -> None:
        """The phases in order; a resumed job restores phases 1-3 from its checkpoint and goes on with its rounds."""
        started = time.time()
        original = self._load_original()
        model = original.model
        net = self.to_torch(model)
        if self._method.needs_teacher:
            self._set_teacher(original.path)
        self.set_progress(phase="start", num_rounds=self.num_rounds, forget_classes=self.forget_classes)
        if original.resume:
            plan, last_eval, done = self._resume(original, started)
        else:
            self._evaluate_original(original, net, started)
            plan, net, model = self._prepare(model, net, parse_plan(original.plan_json))
            last_eval, done = self._record.pruned, []
        model = self._finetune(model, last_eval, done)
        if self._method.verify:
            self.set_progress(phase="verify")
            self._record.verification = self._verdict(self.verify(model, "unlearned"))
        self._write_outputs(model, original, plan, started)

    def _load_original(self) -> _Original:
        """Phase 1: the model to unlearn from (or the round checkpoint to resume) through the persistor, and the
        original checkpoint the record names, hashed now and again before the record is written."""
        from nvflare_unlearn.protect.record import sha256_file

        loaded = self.load_model()
        if loaded is None or not loaded.params:
            raise RuntimeError("the persistor returned no model to unlearn from")
        meta = loaded.meta or {}
        path = (meta.get(META_ORIGINAL_CKPT) or {}).get("path")
        if not path or not os.path.isfile(path):
            raise RuntimeError(
                "the audit record needs the original checkpoint: the persistor reported none (give initial_ckpt)"
            )
        plan_json = meta.get(META_PLAN)
        model = self.global_model(loaded.params, plan_json)
        return _Original(
            model, path, sha256_file(path), plan_json, meta.get(META_OUTPUT_FILE) or "", meta.get(META_RESUME)
        )

    def _evaluate_original(self, original: _Original, net, started: float) -> None:
        """Phase 1 of a new job: the request and the original model in the record; the original evaluated (and
        checked for forgetting, as the baseline of the final check)."""
        first_plan = parse_plan(original.plan_json)
        record = self._record = UnlearningRecord(
            model_name=self.model_name,
            num_classes=self.num_classes,
            forget_classes=self.forget_classes,
            options=self.options(),
            quorum=self._fed.quorums(len(self.sample_clients())),
            started_at=started,
            params_before=count_params(net),
            original_model={"path": original.path, "sha256": original.sha256},
            steps_before=len(first_plan.steps) if first_plan is not None else 0,  # the original was pruned before
        )
        record.original = self.evaluate(original.model, "original", 0)
        if self._method.verify:
            record.verification_original = self.verify(original.model, "original")

    def _finetune(self, model: FLModel, last_eval: Optional[dict], done: list[dict]) -> FLModel:
        """Phase 4: FedAvg fine-tuning on the retained classes with the method's objective, the plan attached every
        round (resumed: from the round after the checkpoint's, with its plan)."""
        model, history = self.run_rounds(model, stage="finetune", first_step=1, last_eval=last_eval, history=done)
        self._record.per_round, self._record.rounds = history, len(history)
        self._record.unlearned = history[-1] if history else self._record.pruned
        self._check_objective(history)
        return model

    def _write_outputs(self, model: FLModel, original: _Original, plan, started: float) -> None:
        """Phase 5: the final model (weights + plan) through the persistor, the signed audit record, the metrics."""
        from nvflare_unlearn.protect.record import sha256_file

        self.save_model(model)
        if sha256_file(original.path) != original.sha256:
            raise RuntimeError(f"the original checkpoint {original.path} changed during the job")
        final_path = os.path.join(self.get_run_dir(), original.output_file)
        if plan is None:  # a method without pruning: the record states an empty plan of the original architecture
            plan = self._empty_plan()
        self._write_audit_record(original.path, final_path, plan, started)
        self._record.files = dict(
            pruned_model=PRUNED_MODEL_FILE,
            plan=PLAN_FILE,
            metrics=METRICS_FILE,
            record=RECORD_FILE,
            record_public_key=RECORD_PUBLIC_KEY_FILE,
        )
        self._record.seconds = round(time.time() - started, 3)
        self.set_progress(phase="done")
        self.write_metrics("completed")

    def _prepare(self, model: FLModel, net, plan):
        """Phases 2-3: the method's preparation (pruning: statistics -> plan per forget class; classifier rows), then
        the prepared model and its plan persisted (new files) and evaluated. Returns (plan, net, model)."""
        from nvflare_unlearn.method.checkpoint import save_checkpoint

        if self._method.spec.prunes:
            model, net, plan = self._prune(model, net, plan)
        if self._method.reset_rows:
            from nvflare_unlearn.method.reinit import reset_classifier_rows

            net = reset_classifier_rows(net, self.forget_classes, seed=0)
            model = self.global_model(state_to_numpy(net), (model.meta or {}).get(META_PLAN))
        self._record.params_after = count_params(net)
        run_dir = self.get_run_dir()
        if plan is not None and plan.steps:
            _io.write_text(os.path.join(run_dir, PLAN_FILE), plan.to_json())
        # the record keeps the key "pruned" for the prepared model; a method that does not prune says so in the log
        label = "pruned" if self._method.spec.prunes else "prepared (no pruning)"
        self._record.pruned = self.evaluate(model, label, 0)
        save_checkpoint(
            os.path.join(run_dir, PRUNED_MODEL_FILE),
            net,
            parse_plan((model.meta or {}).get(META_PLAN)),  # reinit: the dense model carries no plan
            self.model_name,
            self.num_classes,
            extra={
                "prune_mode": self.prune_mode,
                "stage": "prepared",
                "forget_classes": self.forget_classes,
                "resume": self.resume_state(0),  # a job that dies in round 1 can resume from here
            },
        )
        return plan, net, model

    def _set_teacher(self, original_path: str) -> None:
        """The original model, sent with every train task of a distilling objective (resumed jobs included)."""
        from nvflare_unlearn.fl.persistor import load_initial_model

        teacher, teacher_plan = load_initial_model(
            original_path, self.model_name, self.num_classes, self.in_channels, self.prune_mode
        )
        self._teacher = state_to_numpy(teacher)
        self._teacher_plan = teacher_plan.to_json() if teacher_plan is not None else None

    def _empty_plan(self):
        from nvflare_unlearn.method.graph import conv_modules, coupled_groups
        from nvflare_unlearn.method.plan import PruningPlan
        from nvflare_unlearn.models import build_model

        net = build_model(self.model_name, self.num_classes, in_channels=self.in_channels)
        groups = coupled_groups(net)
        convs = conv_modules(net)
        return PruningPlan(convs={n: convs[n].out_channels for g in groups for n in g}, groups=groups,
                           model_name=self.model_name)  # fmt: skip

    # ------------------------------------------------------------------ verification
    def verify(self, model: FLModel, label: str) -> dict:
        """The forgetting check (``runtime.verification``) on ``model``: two rounds at the sites, aggregates only."""
        from nvflare_unlearn.runtime.verification import (
            auc_from_histograms,
            fit_probe,
            membership_auc,
            merge_site_stats,
        )

        t0 = time.time()
        try:  # a site whose script does not answer the verify task must not hold the job: bounded wait
            stats = self.send_to_sites(TASK_VERIFY, self._verify_model(model, {"round": "stats"}), VERIFY_TIMEOUT_S)
            merged = merge_site_stats([r.params for r in stats])
            probe = fit_probe(merged, self.forget_classes)
            request = {"round": "scores", "w": probe["w"].tolist(), "edges": probe["edges"].tolist()}
            scored = self.send_to_sites(TASK_VERIFY, self._verify_model(model, request), VERIFY_TIMEOUT_S)
            pos = np.sum([np.asarray(r.params["score_hist_forget"]) for r in scored], axis=0)
            neg = np.sum([np.asarray(r.params["score_hist_retained"]) for r in scored], axis=0)
        except (RuntimeError, ValueError, KeyError) as e:
            self.warning(f"verification of the {label} model unavailable: {e}")
            return {"status": "unavailable", "reason": str(e)}
        out = {
            "status": "ok",
            "membership": membership_auc(merged),
            "probe": auc_from_histograms(pos, neg),
            "sites": sorted(site_name(r) for r in stats),
            "feature_dim": int(len(probe["w"])),
            "seconds": round(time.time() - t0, 3),
        }
        self.info(
            f"[verify {label}] membership AUC {out['membership']['auc']}, probe AUC {out['probe']['auc']} "
            f"({out['seconds']} s)"
        )
        return jsonable(out)

    def _verify_model(self, model: FLModel, request: dict) -> FLModel:
        out = self.global_model(model.params, (model.meta or {}).get(META_PLAN))
        out.meta[META_VERIFY] = request
        return out

    def _verdict(self, after: dict) -> dict:
        from nvflare_unlearn.runtime.verification import verification_summary

        before = self._record.verification_original
        if after.get("status") != "ok":
            return {**after, "verdict": "verification unavailable", "forgotten": None}
        summary = verification_summary(after, before if before and before.get("status") == "ok" else None)
        return {**after, **summary}

    def round_record(self, averaged: list[FLModel]) -> dict:
        """The loss each averaged site says it minimised (checked and kept as a short name: it comes from the site)."""
        from nvflare_unlearn.unlearning.objective import reported_loss

        return {
            "objective_applied": {
                site_name(r): reported_loss((r.meta or {}).get(META_OBJECTIVE_APPLIED)) for r in averaged
            }
        }

    def _check_objective(self, history: list[dict]) -> None:
        """Record which sites ran the requested loss (``unlearning.objective.objective_check``); warn about the rest."""
        from nvflare_unlearn.unlearning.objective import OBJECTIVE_HINT, objective_check

        check = objective_check(self._method, [e.get("objective_applied") or {} for e in history])
        self._record.objective = check
        for site in check["not_as_requested"]:
            self.warning(
                f"{site} reported {', '.join(check['sites'][site])}, not the requested {check['requested']}: "
                + OBJECTIVE_HINT
            )

    def train_task_model(self, model: FLModel) -> FLModel:
        """The train task carries the method's objective, and the original model when the objective distils."""
        model.meta[META_METHOD] = self._method.to_dict()
        if self._teacher is not None:
            model.params = {**model.params, **{TEACHER_PREFIX + k: v for k, v in self._teacher.items()}}
            if self._teacher_plan:
                model.meta[META_TEACHER_PLAN] = self._teacher_plan
        return model

    # ------------------------------------------------------------------ resume
    def resume_state(self, rounds_done: int, history: Optional[list] = None) -> Optional[dict]:
        """What a later job needs to go on after ``rounds_done`` fine-tuning rounds (saved with the model)."""
        options = {g: getattr(self, g) for g in ("unlearning", "scoring", "plan", "privacy")}  # the plan's options
        return jsonable(self._record.resume_state(rounds_done, history or [], self.prune_mode, options))

    def _resume(self, original: _Original, started: float):
        """Check that a resume checkpoint belongs to this request (``job_record.resume_problem``, as the recipe
        does) and restore the record of the rounds it holds. Returns (plan, the last evaluation, the rounds done)."""
        state = original.resume
        problem = resume_problem(
            state, self.forget_classes, self.num_rounds, original_sha256=original.sha256, prune_mode=self.prune_mode
        )
        if problem:
            raise RuntimeError(problem)
        record = self._record = UnlearningRecord()
        history = record.restore(state)
        record.model_name, record.num_classes = self.model_name, self.num_classes
        record.forget_classes = self.forget_classes
        record.options = {**self.options(), **(state.get("options") or {})}  # the plan's options are the first job's
        record.quorum = self._fed.quorums(len(self.sample_clients()))
        record.started_at = state.get("started_at") or started
        record.original_model = {"path": original.path, "sha256": original.sha256}
        record.resumed = {
            "from": state.get("path"),
            "sha256": state.get("sha256"),
            "after_round": int(state["round"]),
            "at": started,
        }
        self.info(f"resuming fine-tuning after round {state['round']} of {self.num_rounds} from {state.get('path')}")
        plan = parse_plan(original.plan_json)
        if plan is not None and plan.steps:  # the outputs of a resumed job are complete too
            _io.write_text(os.path.join(self.get_run_dir(), PLAN_FILE), plan.to_json())
        return plan, history[-1] if history else record.pruned, history

    def _write_audit_record(self, original_path: str, final_path: str, plan, started: float) -> str:
        """``unlearning_record.json`` (``protect.record.build_job_record``): what was asked, done and measured, signed
        (``protect.signing.find_signing_key``: the configured key, else the provisioned server identity, else this
        user's key outside the run folder), with the public key beside it."""
        from nvflare_unlearn.protect.record import build_job_record, write_record
        from nvflare_unlearn.protect.signing import find_signing_key, public_key_pem, sign_record

        record = build_job_record(
            jsonable(self._record.to_dict()),
            options=jsonable(self.options()),
            original_model_path=original_path,
            final_model_path=final_path,
            plan=plan,
            started_at=started,
            finished_at=time.time(),
        )
        workspace = self.engine.get_workspace() if self.engine is not None else None
        provisioned = workspace.get_file_path_in_startup("server.key") if workspace is not None else None
        key, source = find_signing_key(self._security.signing_key, provisioned)
        record = sign_record(record, key, source)
        path = str(write_record(os.path.join(self.get_run_dir(), RECORD_FILE), record))
        _io.write_bytes(os.path.join(self.get_run_dir(), RECORD_PUBLIC_KEY_FILE), public_key_pem(key))
        self.info(
            f"audit record written to {path} (plan sha256 {record['plan']['sha256'][:12]}..., signed with {source}, "
            f"key id {record['signature']['key_id'][:16]}...)"
        )
        return path
