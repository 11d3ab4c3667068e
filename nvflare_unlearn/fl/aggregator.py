"""Server side: aggregate the sites' class-activation reports into class means for TF-IDF scoring.

A ``ModelAggregator`` in NVFlare's FLModel style (``accept_model`` / ``aggregate_model`` / ``reset_stats``). Each
report is screened against the current model's conv layers and shapes (and, with a clip bound, its sums against
``[0, B * count]``) before it counts; a bad report is rejected with its reason logged and recorded, and the rest go
on. A site's weight is capped at its declared size (``site_sizes``, the server admin's table) or, for a site not in
the table, at ``size_cap_factor`` x the median site's count, so inflated counts buy no influence; the class means
are then combined robustly by default (``median``). The math lives in ``nvflare_unlearn.protect.robust``.
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
from nvflare_unlearn.options import ScoringOptions, SecurityOptions
from nvflare_unlearn.protect.robust import aggregate_class_means, cap_report, screen_report, size_caps


def _site(model: FLModel) -> str:
    meta = model.meta or {}
    return str(meta.get("client_name") or meta.get("site_name") or AppConstants.CLIENT_UNKNOWN)


class ActivationAggregator(ModelAggregator):
    def __init__(
        self,
        num_classes: int,
        aggregation: str = ScoringOptions.aggregation,
        trim: float = ScoringOptions.trim,
        clip_bound: Optional[float] = None,
        allow_negative: bool = False,
        site_sizes: Optional[Mapping[str, int]] = None,
        size_cap_factor: float = SecurityOptions.size_cap_factor,
        **deprecated,
    ):
        """
        Args:
            num_classes: label space of the model (every report must have one row per class).
            aggregation: "median" (default) / "trimmed_mean" (robust to a minority of bad sites, see
                ``nvflare_unlearn.protect.robust`` for the bounds and their costs) or "mean" (the exact
                count-weighted mean of the paper: one site can move it). ``method`` is its deprecated name.
            trim: fraction trimmed at each end for "trimmed_mean".
            clip_bound: when sites clip each activation to [0, B], reject reports whose sums lie outside
                [0, B * count] (the sites' DP noise is post-processed into that range too).
            allow_negative: for reports noised by another DP implementation that does not post-process: sums
                may then be negative, but still within [-B * count, B * count]; needs ``clip_bound``.
            site_sizes: the server admin's table site -> training images; a site's count is capped at it.
            size_cap_factor: a site not in ``site_sizes`` is capped at this x the low median of the sites' counts.
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
        sec = SecurityOptions(site_sizes=site_sizes, size_cap_factor=size_cap_factor)
        self.num_classes = check_num_classes(num_classes)
        self.aggregation = opts.aggregation
        self.trim = opts.trim
        self.clip_bound = clip_bound
        self.allow_negative = bool(allow_negative)
        if self.allow_negative and clip_bound is None:
            raise ValueError("allow_negative needs clip_bound: noisy sums are only accepted within [-B*count, B*count]")
        self.site_sizes = None if sec.site_sizes is None else dict(sec.site_sizes)
        self.size_cap_factor = sec.size_cap_factor
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
            reason = reason if len(reason) <= 300 else reason[:297] + "..."  # a site cannot flood the record
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
        counts = np.asarray(report.counts, dtype=np.float64)[:, None]
        for name, sums in report.sums.items():
            # |sums| <= B * count: no more room than a site that clips honestly; the slack covers float32 rounding
            if np.any(np.abs(np.asarray(sums)) > self.clip_bound * counts * (1 + 1e-6) + 1e-12):
                return f"layer {name!r}: sums outside [-B*count, B*count]; the site did not clip or altered the report"
        return None

    def site_counts(self) -> dict[str, list[int]]:
        """Per-class counts of every accepted report (after the sites' min-count), by site."""
        return {s: [int(c) for c in self._reports[s].counts] for s in sorted(self._reports)}

    @property
    def accepted_sites(self) -> list[str]:
        return sorted(self._reports)

    def capped_reports(self) -> tuple[list[ClassActivationReport], dict[str, str]]:
        """The accepted reports (sorted by site) with each site's weight capped; site -> why it was capped."""
        sites = sorted(self._reports)
        totals = {s: float(np.sum(self._reports[s].counts)) for s in sites}
        caps = size_caps(totals, self.site_sizes, self.size_cap_factor)
        out, capped = [], {}
        for s in sites:
            report, was_capped = cap_report(self._reports[s], caps[s])
            out.append(report)
            if was_capped:
                source = "declared size" if self.site_sizes and s in self.site_sizes else "median-based cap"
                capped[s] = f"reported {int(totals[s])} images, weight capped at {int(caps[s])} ({source})"
                self._log("warning", f"activation report from {s}: {capped[s]}")
        return out, capped

    def aggregate_model(self) -> FLModel:
        """Class means per layer (params), merged per-class counts and the contributing sites (meta)."""
        if not self._reports:
            raise RuntimeError(f"no valid activation report to aggregate (rejected: {self.rejected or 'none'})")
        reports, capped = self.capped_reports()
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
                "capped": capped,
                "aggregation": self.aggregation,
            },
        )

    def _log(self, level: str, msg: str) -> None:
        if self.fl_ctx is not None:
            getattr(self, level)(msg)
        else:  # used outside a running job (tests, notebooks)
            getattr(self.logger, level)(msg)
