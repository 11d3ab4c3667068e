"""What a site sends back for each task, written once (payload, meta): the plugin's executor wraps it in a DXO,
a user's Client API script (``client_api``) in an FLModel. Both sides therefore apply the same privacy to the
activation upload, report the same objective with the weights and answer the forgetting check the same way.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from nvflare.apis.fl_constant import FLMetaKey
from torch import nn

from nvflare_unlearn.fl.defs import (
    META_DP_SIGMA,
    META_FORGET,
    META_HOOK_POINT,
    META_OBJECTIVE_APPLIED,
    META_PLAN,
    META_PRIVACY,
    META_PRIVACY_APPLIED,
    META_VERIFY,
    METRIC_CORRECT,
    METRIC_TOTAL,
)
from nvflare_unlearn.fl.model_state import model_key, state_to_numpy
from nvflare_unlearn.method.activations import WIRE_SUMS_DTYPE, ClassActivationReport
from nvflare_unlearn.options import PrivacyOptions

__all__ = [
    "activation_answer",
    "effective_privacy",
    "protected_report",
    "validation_answer",
    "verification_answer",
    "weights_answer",
]

Answer = tuple[dict[str, Any], dict[str, Any]]


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


def activation_answer(report: ClassActivationReport, applied: dict[str, Any]) -> Answer:
    """The activation task's answer from ``protected_report``'s output: the sums (``WIRE_SUMS_DTYPE``) and counts,
    and what privacy was applied, for the server's record."""
    return report.to_dict(sums_dtype=WIRE_SUMS_DTYPE), {
        FLMetaKey.NUM_STEPS_CURRENT_ROUND: int(report.counts.sum()),
        META_DP_SIGMA: float(applied["dp_sigma"]),
        META_PRIVACY_APPLIED: applied,
    }


def weights_answer(model: nn.Module, num_samples: int, applied: Optional[dict] = None) -> Answer:
    """The train task's answer: the full state as numpy, weighted by ``num_samples`` (0: left out of the average),
    with the objective's report (``UnlearningObjective.report``) when the site has one."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be an integer >= 0 (0 = nothing trained), got {num_samples!r}")
    meta: dict[str, Any] = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: num_samples}
    if applied is not None:
        meta[META_OBJECTIVE_APPLIED] = applied
    return state_to_numpy(model), meta


def validation_answer(model: nn.Module, loader: Iterable, num_classes: int, device=None) -> Answer:
    """The validate task's answer: per-class correct/total counts (the server sums them before dividing)."""
    from nvflare_unlearn.runtime import class_correct_total

    correct, total = class_correct_total(model, loader, num_classes, device=device)
    data = {METRIC_CORRECT: [int(c) for c in correct], METRIC_TOTAL: [int(t) for t in total]}
    return data, {FLMetaKey.NUM_STEPS_CURRENT_ROUND: int(sum(data[METRIC_TOTAL]))}


def verification_answer(
    model: nn.Module,
    meta: Optional[dict],
    forget_classes: list[int],
    num_classes: int,
    train_loader: Iterable,
    test_loader: Iterable,
    device=None,
) -> Answer:
    """The verify task's answer (``runtime.verification``): aggregates of this site's data only."""
    from nvflare_unlearn.runtime.verification import site_verification

    request = (meta or {}).get(META_VERIFY)
    data = site_verification(model, request, forget_classes, num_classes, train_loader, test_loader, device=device)
    return data, {FLMetaKey.NUM_STEPS_CURRENT_ROUND: 1}
