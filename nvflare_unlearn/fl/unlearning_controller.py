"""Server side: federated class unlearning (Wang et al., WWW 2022, Sec. 4) as a multi-phase ``run()``.

1. load the trained model (persistor) and evaluate it (federated ``validate``: per-class correct/total);
2. for each forget class: broadcast ``class_activations`` with the current plan in meta, screen and aggregate the
   reports (the ``ActivationAggregator`` component), then ``unlearning_step`` and apply the extended plan;
3. persist the pruned model with its plan (new files; the original checkpoint is never touched), evaluate it;
4. fine-tune with FedAvg on the retained classes (``FedAvgEvalController.run_rounds``; the plan rides in the meta
   of EVERY round) for ``num_rounds`` rounds or until ``stop_cond`` holds, evaluating each round;
5. write the final model, ``unlearning_metrics.json`` and the SIGNED audit record (with the public key beside it)
   into the server's run directory.

All math is in ``nvflare_unlearn.method``; this file only moves data between it and the sites.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel

from nvflare_unlearn import _io
from nvflare_unlearn._validation import normalize_forget_classes
from nvflare_unlearn.fl.aggregator import ActivationAggregator
from nvflare_unlearn.fl.defs import (
    META_DP_SIGMA,
    META_HOOK_POINT,
    META_METHOD,
    META_OBJECTIVE_APPLIED,
    META_ORIGINAL_CKPT,
    META_OUTPUT_FILE,
    META_PLAN,
    META_PRIVACY,
    META_PRIVACY_APPLIED,
    META_RESUME,
    META_TEACHER_PLAN,
    META_VERIFY,
    METRICS_FILE,
    PLAN_FILE,
    PRUNED_MODEL_FILE,
    RECORD_FILE,
    RECORD_PUBLIC_KEY_FILE,
    TASK_ACTIVATIONS,
    TASK_VERIFY,
    TEACHER_PREFIX,
)
from nvflare_unlearn.fl.fedavg_eval_controller import FedAvgEvalController, jsonable, site_name
from nvflare_unlearn.fl.model_state import count_params, parse_plan, state_to_numpy
from nvflare_unlearn.method.graph import conv_channels
from nvflare_unlearn.options import (
    FederationOptions,
    MethodOptions,
    PlanOptions,
    PrivacyOptions,
    ScoringOptions,
    SecurityOptions,
    fold_legacy,
)

#: seconds a site may take per verification round when task_timeout is not set (the check must not hang the job)
VERIFY_TIMEOUT_S = 900

_GROUPS = (MethodOptions, ScoringOptions, PlanOptions, PrivacyOptions, FederationOptions, SecurityOptions)


class UnlearningController(FedAvgEvalController):
    """Federated class unlearning: activations -> TF-IDF -> pruning -> FedAvg fine-tune -> record."""

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
                ``unlearning`` holds the method: prune, finetune, neggrad, random_label, scrub, and its recovery).
                ``privacy`` is what the sites were configured with; the audit record states it. ``security``: declared
                site sizes, robust fine-tuning and evaluation, and the key the record is signed with
                (``_signing_key``).
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
        self.unlearning = MethodOptions.from_dict(unlearning).to_dict()
        self.scoring = ScoringOptions.from_dict(scoring).to_dict()
        self.plan = plan_opts.to_dict()
        self.privacy = PrivacyOptions.from_dict(privacy).to_dict()
        self.aggregator_id = aggregator_id
        self._scoring = ScoringOptions.from_dict(self.scoring)
        self._plan = plan_opts
        self._privacy = PrivacyOptions.from_dict(self.privacy)
        self._method = MethodOptions.from_dict(self.unlearning)
        self._teacher: Optional[dict] = None  # the original weights, sent with train tasks when the objective distils
        self._teacher_plan: Optional[str] = None  # ... and the plan that shaped them (an original pruned before)

    def task_meta(self) -> dict:
        # the privacy the job asks for: a site applies it (or stricter settings of its own) and says what it applied
        return {**super().task_meta(), META_HOOK_POINT: self._scoring.hook_point, META_PRIVACY: dict(self.privacy)}

    def _aggregator(self) -> ActivationAggregator:
        agg = self.engine.get_component(self.aggregator_id)
        if not isinstance(agg, ActivationAggregator):
            raise RuntimeError(
                f"component {self.aggregator_id!r} must be an ActivationAggregator, got {type(agg).__name__}: "
                "add one to the server app (UnlearningRecipe does)"
            )
        return agg

    def options(self) -> dict:
        return {
            "unlearning": self.unlearning,
            "scoring": self.scoring,
            "plan": self.plan,
            "privacy": self.privacy,
            "federation": self.federation,
            "security": self.security,
        }

    def collect_means(self, model: FLModel, net, forget_class: int) -> tuple[dict, dict]:
        """One activation round: broadcast, screen and aggregate the sites' reports into class means."""
        aggregator = self._aggregator()
        aggregator.set_expected_layers(conv_channels(net))
        results = self.send_to_sites(TASK_ACTIVATIONS, model)
        no_result = list(self._no_result)
        sigmas = {site_name(r): (r.meta or {}).get(META_DP_SIGMA) for r in results}
        applied = {site_name(r): (r.meta or {}).get(META_PRIVACY_APPLIED) for r in results}
        for r in results:
            aggregator.accept_model(r)
        accepted = aggregator.accepted_sites
        quorum = self.quorum("activation")
        if len(accepted) < quorum:
            raise RuntimeError(
                f"class {forget_class}: {len(accepted)} valid activation report(s), the activation phase needs "
                f"min_clients={quorum}; rejected: {aggregator.rejected}, no result from: {no_result or 'none'}"
            )
        merged = aggregator.aggregate_model()
        merged.meta["no_result"] = no_result
        merged.meta["dp_sigma"] = {s: sigmas.get(s) for s in accepted}
        # None: the site's code did not say what it applied (a script answering without the client_api helpers)
        merged.meta["privacy_applied"] = {s: jsonable(applied.get(s)) for s in accepted}
        if merged.meta["counts"][forget_class] == 0:
            raise RuntimeError(
                f"no site holds samples of class {forget_class}: its channels cannot be identified; "
                "check the class id and the sites' data"
            )
        return merged.params, merged.meta

    def run_workflow(self) -> None:
        from nvflare_unlearn.protect.record import sha256_file

        started = time.time()
        loaded = self.load_model()
        if loaded is None or not loaded.params:
            raise RuntimeError("the persistor returned no model to unlearn from")
        loaded_meta = loaded.meta or {}
        original = loaded_meta.get(META_ORIGINAL_CKPT) or {}
        original_path = original.get("path")
        if not original_path or not os.path.isfile(original_path):
            raise RuntimeError(
                "the audit record needs the original checkpoint: the persistor reported none (give initial_ckpt)"
            )
        original_sha = sha256_file(original_path)
        plan_json = loaded_meta.get(META_PLAN)
        model = self.global_model(loaded.params, plan_json)
        net = self.to_torch(model)
        if self._method.needs_teacher:
            self._set_teacher(original_path)
        resume = loaded_meta.get(META_RESUME)
        self.set_progress(phase="start", num_rounds=self.num_rounds, forget_classes=self.forget_classes)
        if resume:
            plan, last_eval, done = self._resume(resume, original_path, original_sha, plan_json, started)
            if plan is not None and plan.steps:  # the outputs of a resumed job are complete too
                _io.write_text(os.path.join(self.get_run_dir(), PLAN_FILE), plan.to_json())
        else:
            self._record.update(
                model_name=self.model_name,
                num_classes=self.num_classes,
                forget_classes=self.forget_classes,
                options=self.options(),
                quorum=self._fed.quorums(len(self.sample_clients())),
                started_at=started,
                params_before=count_params(net),
                original_model={"path": original_path, "sha256": original_sha},
            )
            first_plan = parse_plan(plan_json)
            self._record["steps_before"] = len(first_plan.steps) if first_plan is not None else 0  # pruned before
            self._record["original"] = self.evaluate(model, "original", 0)
            if self._method.verify:
                self._record["verification_original"] = self.verify(model, "original")
            plan, net, model = self._prepare(model, net, parse_plan(plan_json))
            last_eval, done = self._record["pruned"], []

        # Phase 4: FedAvg fine-tuning on the retained classes with the method's objective, plan attached every
        # round (resumed: from the round after the checkpoint's, with its plan).
        model, history = self.run_rounds(model, stage="finetune", first_step=1, last_eval=last_eval, history=done)
        self._record["per_round"] = history
        self._record["rounds"] = len(history)
        self._record["unlearned"] = history[-1] if history else self._record["pruned"]
        self._check_objective(history)
        if self._method.verify:
            self.set_progress(phase="verify")
            self._record["verification"] = self._verdict(self.verify(model, "unlearned"))

        # Phase 5: the final model (weights + plan) through the persistor, the audit record, then the metrics.
        self.save_model(model)
        if sha256_file(original_path) != original_sha:
            raise RuntimeError(f"the original checkpoint {original_path} changed during the job")
        run_dir = self.get_run_dir()
        final_path = os.path.join(run_dir, loaded_meta.get(META_OUTPUT_FILE) or "")
        if plan is None:  # a method without pruning: the record states an empty plan of the original architecture
            plan = self._empty_plan()
        rounds = self._record.get("activation_rounds", [])
        self._write_audit_record(original_path, final_path, plan, rounds, started)
        self._record["files"] = dict(
            pruned_model=PRUNED_MODEL_FILE,
            plan=PLAN_FILE,
            metrics=METRICS_FILE,
            record=RECORD_FILE,
            record_public_key=RECORD_PUBLIC_KEY_FILE,
        )
        self._record["seconds"] = round(time.time() - started, 3)
        self.set_progress(phase="done")
        self.write_metrics("completed")

    def _prepare(self, model: FLModel, net, plan):
        """Phases 2-3: the method's preparation (pruning: statistics -> plan per forget class; classifier rows), then
        the prepared model and its plan persisted (new files) and evaluated. Returns (plan, net, model)."""
        from nvflare_unlearn.method.checkpoint import save_checkpoint

        if self._method.method == "prune":
            model, net, plan = self._prune(model, net, plan)
        if self._method.reset_rows:
            from nvflare_unlearn.method.reinit import reset_classifier_rows

            net = reset_classifier_rows(net, self.forget_classes, seed=0)
            model = self.global_model(state_to_numpy(net), (model.meta or {}).get(META_PLAN))
        self._record["params_after"] = count_params(net)
        run_dir = self.get_run_dir()
        if plan is not None and plan.steps:
            _io.write_text(os.path.join(run_dir, PLAN_FILE), plan.to_json())
        # the record keeps the key "pruned" for the prepared model; a method that does not prune says so in the log
        label = "pruned" if self._method.method == "prune" else "prepared (no pruning)"
        self._record["pruned"] = self.evaluate(model, label, 0)
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

    def _prune(self, model: FLModel, net, plan):
        """The paper's phase 2: per forget class, federated statistics -> ``unlearning_step`` -> apply the plan.

        ``prune_mode="reinit"`` selects exactly as mask mode does (the server's copy is masked between classes),
        then gives the chosen channels fresh weights in the dense model, which travels without a plan.
        """
        from nvflare_unlearn.method.prune import apply_pruning_plan, plan_summary
        from nvflare_unlearn.method.unlearning import unlearning_step

        reinit = self.prune_mode == "reinit"
        dense = copy.deepcopy(net) if reinit else None
        apply_mode = "mask" if reinit else self.prune_mode
        activation_rounds = []
        for index, forget_class in enumerate(self.forget_classes):
            t0 = time.time()
            self.set_progress(phase="activation", forget_class=forget_class, pass_index=index + 1)
            channels = int(sum(conv_channels(net).values()))  # this pass's DP sensitivity depends on it
            means, info = self.collect_means(model, net, forget_class)
            if self._privacy.dp:
                means = {k: np.maximum(v, 0.0) for k, v in means.items()}  # noisy means may dip below 0
            plan = unlearning_step(
                net,
                means,
                forget_class,
                self._scoring,
                self._plan,
                plan,
                class_counts=info["counts"],
                model_name=self.model_name,
                record={"sites": list(info["sites"])},
            )
            net = apply_pruning_plan(net, plan, mode=apply_mode)  # only the new step is applied
            model = self.global_model(state_to_numpy(net), plan.to_json(), meta_mode=apply_mode)
            activation_rounds.append(
                dict(
                    forget_class=forget_class,
                    sites=info["sites"],
                    rejected=info["rejected"],
                    capped=info.get("capped", {}),
                    counts=info["counts"],
                    no_result=info["no_result"],
                    channels=channels,
                    site_counts=info["site_counts"],
                    dp_sigma=info["dp_sigma"],
                    privacy_applied=info["privacy_applied"],
                    params=count_params(net),
                    seconds=round(time.time() - t0, 3),
                )
            )
            self.info(f"class {forget_class}: pruned to {count_params(net)} parameters (sites {info['sites']})")
        self._record["activation_rounds"] = activation_rounds
        self._record["plan_summary"] = plan_summary(plan, net)
        if reinit:
            from nvflare_unlearn.method.reinit import reinitialise_channels

            net = reinitialise_channels(dense, plan, seed=0)
            model = self.global_model(state_to_numpy(net), None)
        return model, net, plan

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

        before = self._record.get("verification_original")
        if after.get("status") != "ok":
            return {**after, "verdict": "verification unavailable", "forgotten": None}
        summary = verification_summary(after, before if before and before.get("status") == "ok" else None)
        return {**after, **summary}

    def round_record(self, averaged: list[FLModel]) -> dict:
        """The loss each averaged site says it minimised (checked and kept as a short name: it comes from the site)."""
        from nvflare_unlearn.method.objectives import reported_loss

        return {
            "objective_applied": {
                site_name(r): reported_loss((r.meta or {}).get(META_OBJECTIVE_APPLIED)) for r in averaged
            }
        }

    def _check_objective(self, history: list[dict]) -> None:
        """Record which sites ran the requested loss (``method.objectives.objective_check``); warn about the rest."""
        from nvflare_unlearn.method.objectives import OBJECTIVE_HINT, objective_check

        check = objective_check(self._method, [e.get("objective_applied") or {} for e in history])
        self._record["objective"] = check
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
        if "pruned" not in self._record:
            return None
        keep = (
            "original",
            "pruned",
            "activation_rounds",
            "plan_summary",
            "params_before",
            "params_after",
            "steps_before",
        )
        record = {k: self._record[k] for k in keep if k in self._record}
        record["per_round"] = list(history or [])
        return jsonable(
            dict(
                round=int(rounds_done),
                forget_classes=list(self.forget_classes),
                prune_mode=self.prune_mode,
                options={
                    "unlearning": self.unlearning,
                    "scoring": self.scoring,
                    "plan": self.plan,
                    "privacy": self.privacy,
                },
                original_sha256=self._record["original_model"]["sha256"],
                started_at=self._record.get("started_at"),
                record=record,
            )
        )

    def _resume(self, state: dict, original_path: str, original_sha: str, plan_json: Optional[str], started: float):
        """Check that a resume checkpoint belongs to this request and restore the record of the rounds it holds."""
        if list(state.get("forget_classes") or []) != list(self.forget_classes):
            raise RuntimeError(
                f"resume_from was saved by a job forgetting {state.get('forget_classes')}, this job forgets "
                f"{self.forget_classes}: resume with the same request"
            )
        if state.get("original_sha256") != original_sha:
            raise RuntimeError(
                "resume_from was saved from another original model (SHA-256 differs from initial_ckpt's): "
                "give the original checkpoint of the interrupted job as initial_ckpt"
            )
        if state.get("prune_mode") != self.prune_mode:
            raise RuntimeError(
                f"resume_from was pruned in {state.get('prune_mode')!r} mode, this job uses {self.prune_mode!r}"
            )
        done_rounds = int(state["round"])
        if done_rounds >= self.num_rounds:
            raise RuntimeError(
                f"resume_from already holds {done_rounds} fine-tuning round(s) and num_rounds={self.num_rounds}: "
                "nothing left to do (raise num_rounds to fine-tune further)"
            )
        saved = dict(state.get("record") or {})
        history = list(saved.pop("per_round", []))[:done_rounds]
        self._record.update(saved)
        self._record.update(
            model_name=self.model_name,
            num_classes=self.num_classes,
            forget_classes=self.forget_classes,
            options={**self.options(), **(state.get("options") or {})},  # the plan's options are the first job's
            quorum=self._fed.quorums(len(self.sample_clients())),
            started_at=state.get("started_at") or started,
            original_model={"path": original_path, "sha256": original_sha},
            resumed={
                "from": state.get("path"),
                "sha256": state.get("sha256"),
                "after_round": done_rounds,
                "at": started,
            },
        )
        self.info(f"resuming fine-tuning after round {done_rounds} of {self.num_rounds} from {state.get('path')}")
        last_eval = history[-1] if history else self._record.get("pruned")
        return parse_plan(plan_json), last_eval, history

    def _signing_key(self):
        """(private key, where it came from): ``security.signing_key``, else the provisioned server identity
        (``startup/server.key`` of a POC or production server), else this user's key outside the run folder
        (simulator; ``protect.signing.default_key_dir``, created on first use)."""
        from nvflare_unlearn.protect.signing import load_or_create_signing_key, load_signing_key

        if self._security.signing_key:
            return load_signing_key(self._security.signing_key), f"configured key {self._security.signing_key}"
        workspace = self.engine.get_workspace() if self.engine is not None else None
        if workspace is not None:
            provisioned = workspace.get_file_path_in_startup("server.key")
            if os.path.isfile(provisioned):
                return load_signing_key(provisioned), "provisioned server identity (startup/server.key)"
        key, path = load_or_create_signing_key()
        return key, f"user key {path}"

    def _write_audit_record(self, original_path, final_path, plan, activation_rounds, started) -> str:
        """``unlearning_record.json`` (``protect.record.build_record``): what was asked, done and measured; signed."""
        from nvflare_unlearn.protect.privacy import gaussian_sigma, sensitivity, split_budget
        from nvflare_unlearn.protect.record import build_record, write_record
        from nvflare_unlearn.protect.signing import public_key_pem, sign_record

        params: dict[str, Any] = self.options()
        # what each site says it applied to its upload (None: its code did not say, e.g. a script without the
        # client_api helpers): the request above is what was asked, this is what the sites vouch for
        params["privacy_applied"] = {
            f"class {a['forget_class']}": a.get("privacy_applied") or {} for a in activation_rounds
        }
        # the loss each site says it minimised, against the request (a script may ignore the method)
        params["objective_applied"] = self._record.get("objective")
        if self._record.get("resumed"):
            params["resumed"] = self._record["resumed"]
        if self._privacy.dp:
            eps, delta = split_budget(self._privacy.dp_epsilon, self._privacy.dp_delta, len(self.forget_classes))
            params["dp_per_pass"] = {"epsilon": eps, "delta": delta, "passes": len(self.forget_classes)}
            # sigma depends on the channels still present at each pass (the model shrinks pass by pass)
            noise_counts = self._privacy.dp_unit == "add_remove_image"
            params["dp_sigma"] = [
                gaussian_sigma(eps, delta, sensitivity(a["channels"], self._privacy.clip_bound, noise_counts))
                for a in activation_rounds
            ]
        site_counts: dict[str, list[int]] = {}
        rejected: dict[str, list[str]] = {}
        capped: dict[str, list[str]] = {}
        for a in activation_rounds:
            site_counts.update(a["site_counts"])
            for site, why in a.get("capped", {}).items():
                capped.setdefault(site, []).append(f"class {a['forget_class']}: {why}")
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
            parameters=jsonable(params),
            original_model_path=original_path,
            final_model_path=final_path,
            plan=plan,
            site_counts=site_counts,
            metrics_before={k: self._record["original"][k] for k in keys if k in self._record["original"]},
            metrics_after={k: self._record["unlearned"][k] for k in keys if k in self._record["unlearned"]},
            started_at=started,
            finished_at=time.time(),
            rejected_sites={s: "; ".join(v) for s, v in sorted(rejected.items())},
            verification=self._record.get("verification"),
            trained_sites=sorted({s for e in self._record.get("per_round", []) for s in e.get("trained_sites", [])}),
            model_name=self.model_name,
            params_before=self._record["params_before"],
            params_after=self._record["params_after"],
            steps_before=self._record.get("steps_before", 0),  # plan steps applied before a resumed run
            capped_sites={s: "; ".join(v) for s, v in sorted(capped.items())},
        )
        key, source = self._signing_key()
        record = sign_record(record, key, source)
        path = str(write_record(os.path.join(self.get_run_dir(), RECORD_FILE), record))
        _io.write_bytes(os.path.join(self.get_run_dir(), RECORD_PUBLIC_KEY_FILE), public_key_pem(key))
        self.info(
            f"audit record written to {path} (plan sha256 {record['plan']['sha256'][:12]}..., signed with {source}, "
            f"key id {record['signature']['key_id'][:16]}...)"
        )
        return path
