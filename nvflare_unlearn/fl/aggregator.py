"""Server side: aggregate the sites' class-activation reports into class means for TF-IDF scoring.

A ``ModelAggregator`` in NVFlare's FLModel style (``accept_model`` / ``aggregate_model`` / ``reset_stats``). Each
report is screened against the current model's conv layers and shapes before it counts; a bad report is rejected
with its reason logged and recorded, and the rest go on. The math (validation, exact or robust means) lives in
``nvflare_unlearn.method.activations`` / ``nvflare_unlearn.protect.robust``.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Optional

import numpy as np
from nvflare.apis.fl_component import FLComponent
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants

from nvflare_unlearn._validation import check_num_classes
from nvflare_unlearn.method.activations import ClassActivationReport, merge_reports, validate_report
from nvflare_unlearn.options import ScoringOptions
from nvflare_unlearn.protect.robust import aggregate_class_means, screen_report


def _site(model: FLModel) -> str:
    meta = model.meta or {}
    return str(meta.get("client_name") or meta.get("site_name") or AppConstants.CLIENT_UNKNOWN)


class ActivationAggregator(ModelAggregator):
    def __init__(
        self,
        num_classes: int,
        aggregation: str = "mean",
        trim: float = 0.1,
        clip_bound: Optional[float] = None,
        allow_negative: bool = False,
        **deprecated,
    ):
        """
        Args:
            num_classes: label space of the model (every report must have one row per class).
            aggregation: "mean" (exact count-weighted mean, the paper), or "median" / "trimmed_mean" (robust to a
                minority of faulty sites, see ``nvflare_unlearn.protect.robust`` for the bounds and their costs).
                ``method`` is its deprecated name.
            trim: fraction trimmed at each end for "trimmed_mean".
            clip_bound: when sites clip each activation to [0, B], reject reports whose sums exceed B * count.
            allow_negative: accept negative sums (sites add Gaussian noise, DP on); the other checks still apply
                and, with ``clip_bound``, sums above B * count are still rejected. Class means can then be
                negative: the controller clamps them at 0 before TF-IDF.
        """
        FLComponent.__init__(self)  # ModelAggregator.__init__ skips it (no logger otherwise)
        ModelAggregator.__init__(self)
        if "method" in deprecated:  # version 0.1's name
            warnings.warn(
                "ActivationAggregator: 'method' is deprecated, use 'aggregation'", FutureWarning, stacklevel=2
            )
            aggregation = deprecated.pop("method")
        if deprecated:
            raise TypeError(f"ActivationAggregator() got unexpected keyword argument(s) {sorted(deprecated)}")
        opts = ScoringOptions(aggregation=aggregation, trim=trim)  # the one check of both
        self.num_classes = check_num_classes(num_classes)
        self.aggregation = opts.aggregation
        self.trim = opts.trim
        self.clip_bound = clip_bound
        self.allow_negative = bool(allow_negative)
        self._expected: dict[str, int] = {}
        self._reports: dict[str, ClassActivationReport] = {}
        self.rejected: dict[str, str] = {}

    def set_expected_layers(self, expected_channels: Mapping[str, int]) -> None:
        """The conv layers (name -> channels) of the model the reports were computed on; resets the round."""
        if not expected_channels:
            raise ValueError("the model has no Conv2d layers: there is nothing to collect activations from")
        self._expected = {str(k): int(v) for k, v in expected_channels.items()}
        self.reset_stats()

    def reset_stats(self) -> None:
        self._reports = {}
        self.rejected = {}

    def accept_model(self, model: FLModel) -> bool:
        """Screen one site's report; keep it if valid, else log and record why it was rejected."""
        if not self._expected:
            raise RuntimeError("call set_expected_layers(model's conv channels) before accepting reports")
        site = _site(model)
        reason = self._screen(model.params)
        if reason is None and site in self._reports:
            reason = "a second report from the same site in one round"
        if reason is not None:
            self.rejected[site] = reason
            self._log("warning", f"rejected activation report from {site}: {reason}")
            return False
        report = ClassActivationReport.from_dict(model.params, allow_negative=self.allow_negative)
        self._reports[site] = report
        self._log("info", f"accepted activation report from {site}: {int(np.sum(report.counts))} samples")
        return True

    def _screen(self, params) -> Optional[str]:
        """Why a report is rejected (None = keep); ``robust.screen_report``, or its noise-tolerant variant."""
        if not self.allow_negative:
            return screen_report(params, self._expected, self.num_classes, clip_bound=self.clip_bound)
        if not isinstance(params, Mapping):
            return f"report is a {type(params).__name__}, not a ClassActivationReport's to_dict() form"
        try:
            report = validate_report(params, dict(self._expected), self.num_classes, allow_negative=True)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if self.clip_bound is not None:
            counts = np.asarray(report.counts, dtype=np.float64)[:, None]
            for name, sums in report.sums.items():
                # privacy.gaussian_noise clips noisy sums to [0, B * count]; the slack only covers float32 rounding
                if np.any(np.asarray(sums) > self.clip_bound * counts * (1 + 1e-6) + 1e-12):
                    return f"layer {name!r}: sums above clip_bound * count; the site did not clip or altered the report"
        return None

    def site_counts(self) -> dict[str, list[int]]:
        """Per-class counts of every accepted report (after the sites' min-count), by site."""
        return {s: [int(c) for c in self._reports[s].counts] for s in sorted(self._reports)}

    @property
    def accepted_sites(self) -> list[str]:
        return sorted(self._reports)

    def aggregate_model(self) -> FLModel:
        """Class means per layer (params), merged per-class counts and the contributing sites (meta)."""
        if not self._reports:
            raise RuntimeError(f"no valid activation report to aggregate (rejected: {self.rejected or 'none'})")
        reports = [self._reports[s] for s in sorted(self._reports)]
        means = aggregate_class_means(reports, self.aggregation, self.trim)
        merged = merge_reports(reports)
        return FLModel(
            params_type=ParamsType.FULL,
            params=means,
            meta={
                "counts": [int(c) for c in merged.counts],
                "hook_point": merged.hook_point,
                "sites": self.accepted_sites,
                "site_counts": self.site_counts(),
                "rejected": dict(self.rejected),
                "aggregation": self.aggregation,
            },
        )

    def _log(self, level: str, msg: str) -> None:
        if self.fl_ctx is not None:
            getattr(self, level)(msg)
        else:  # used outside a running job (tests, notebooks)
            getattr(self.logger, level)(msg)
