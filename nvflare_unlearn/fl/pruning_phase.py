"""The paper's phase 2 at the server (Wang et al., WWW 2022, Sec. 4): per forget class, one federated statistics
pass (``class_activations``), the sites' reports screened and combined by the ``ActivationAggregator``, then
``unlearning_step`` extends the pruning plan and the server's model is pruned by it.

A mixin of ``UnlearningController``, kept apart so the controller file reads as the job's phases; the math is in
``nvflare_unlearn.method``.
"""

from __future__ import annotations

import copy
import time

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel

from nvflare_unlearn.fl.aggregator import ActivationAggregator
from nvflare_unlearn.fl.defs import META_DP_SIGMA, META_PRIVACY_APPLIED, TASK_ACTIVATIONS
from nvflare_unlearn.fl.federated_eval import jsonable, site_name
from nvflare_unlearn.fl.model_state import count_params, state_to_numpy
from nvflare_unlearn.method.graph import conv_channels


class PruningPhase:
    """Statistics passes and pruning, for a ``FedAvgEvalController`` that has the unlearning options
    (``aggregator_id``, ``_scoring``, ``_plan``, ``_privacy``) and a ``UnlearningRecord``."""

    def _aggregator(self) -> ActivationAggregator:
        agg = self.engine.get_component(self.aggregator_id)
        if not isinstance(agg, ActivationAggregator):
            raise RuntimeError(
                f"component {self.aggregator_id!r} must be an ActivationAggregator, got {type(agg).__name__}: "
                "add one to the server app (UnlearningRecipe does)"
            )
        return agg

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
        self._record.activation_rounds = activation_rounds
        self._record.plan_summary = plan_summary(plan, net)
        if reinit:
            from nvflare_unlearn.method.reinit import reinitialise_channels

            net = reinitialise_channels(dense, plan, seed=0)
            model = self.global_model(state_to_numpy(net), None)
        return model, net, plan
