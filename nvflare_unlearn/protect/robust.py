"""Robust aggregation and screening of per-site class-activation reports.

The server forms class means ``[K, C]`` per conv layer from the sites' reports and scores channels on them. With the
exact count-weighted mean (``aggregation="mean"``, the paper's aggregation), a single site can move any class mean
arbitrarily far: its sums are added unchecked. The robust methods here work coordinate-wise over the *sites' own
class means*, so a minority of bad sites cannot drag a coordinate outside the range spanned by the honest sites.

Bounds (per coordinate ``(layer, class k, channel j)``, over the ``n_k`` sites that report class ``k``):

* ``"median"``: breakdown point 1/2. If fewer than ``n_k / 2`` sites are corrupted (any values, however large),
  the result lies in ``[min, max]`` of the honest sites' values for that coordinate.
* ``"trimmed_mean"`` with ``trim = beta``: drops ``g = floor(beta * n_k)`` values at each end. Breakdown point
  ``g / n_k`` (about ``beta``). If at most ``g`` sites are corrupted, the result lies in ``[min, max]`` of the honest
  values. With ``g = 0`` (for example ``beta = 0.1`` and fewer than 10 sites) nothing is trimmed and the method is
  as fragile as an unweighted mean: choose ``trim`` with the federation size in mind.
* ``"mean"``: breakdown point 0 (one site suffices to move it without limit).

Costs of robustness: both robust methods weight every site equally, whatever its sample count (a site with 5
images of a class counts as much as one with 5,000), and with non-IID sites the median of site means is not the
population mean. They are an option for federations that cannot trust every site, not the default.

Nothing here imports nvflare; the NVFlare aggregator calls these functions.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from nvflare_unlearn._validation import check_num_classes
from nvflare_unlearn.method.activations import ClassActivationReport, merge_reports, validate_report
from nvflare_unlearn.options import AGGREGATIONS
from nvflare_unlearn.protect.privacy import check_clip_bound, validate_clip_bound


def _check_finite_reports(reports: Sequence[ClassActivationReport]) -> None:
    """Every item a report with finite sums and non-negative counts; consistency is merge_reports' job."""
    if len(reports) == 0:
        raise ValueError("aggregate_class_means needs at least one report; got an empty list")
    for i, rep in enumerate(reports):
        if not isinstance(rep, ClassActivationReport):
            raise ValueError(f"report {i} is a {type(rep).__name__}, not a ClassActivationReport")
        if np.any(np.asarray(rep.counts) < 0):
            raise ValueError(f"report {i} has negative counts; screen reports with screen_report() first")
        for name, s in rep.sums.items():
            if not np.all(np.isfinite(np.asarray(s, dtype=np.float64))):
                raise ValueError(
                    f"report {i} layer {name!r} has non-finite values; screen reports with screen_report() "
                    "and drop the rejected ones before aggregating"
                )


def _trimmed_mean(values: np.ndarray, trim: float) -> np.ndarray:
    """Mean over axis 0 after dropping floor(trim * n) smallest and largest values per coordinate."""
    n = values.shape[0]
    g = int(np.floor(trim * n))
    if g == 0:
        return values.mean(axis=0)
    ordered = np.sort(values, axis=0)
    return ordered[g : n - g].mean(axis=0)


def aggregate_class_means(
    reports: Sequence[ClassActivationReport], aggregation: str = "mean", trim: float = 0.1
) -> dict[str, np.ndarray]:
    """Class means ``{layer: [K, C]}`` from per-site reports, exact (``"mean"``) or robust.

    ``"mean"`` is the exact count-weighted mean over all images, identical to ``merge_reports(reports).means()``.
    ``"median"`` and ``"trimmed_mean"`` take each site's class mean (its sums / its count) and combine the sites
    coordinate-wise; a site with count 0 for a class (no data, or dropped by min-count) is left out for that class.
    A class no site reports gets the same row as ``merge_reports(...).means()`` gives it.
    See the module docstring for the breakdown points. Non-finite or inconsistent reports raise ``ValueError``:
    screen them with :func:`screen_report` first.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0.0 <= float(trim) < 0.5:
        raise ValueError(f"trim must be a fraction in [0, 0.5) trimmed from each end; got {trim!r}")
    reports = list(reports)
    _check_finite_reports(reports)
    exact = merge_reports(reports).means()  # raises on mismatched layers, shapes, class counts, hook points
    if aggregation == "mean":
        return exact
    counts = np.stack([np.asarray(r.counts, dtype=np.int64) for r in reports])  # [S, K]
    out: dict[str, np.ndarray] = {}
    for name in exact:
        result = np.array(exact[name], dtype=np.float64, copy=True)
        for cls in range(counts.shape[1]):
            sites = np.nonzero(counts[:, cls] > 0)[0]
            if sites.size == 0:
                continue
            site_means = np.stack(
                [np.asarray(reports[s].sums[name][cls], dtype=np.float64) / counts[s, cls] for s in sites]
            )  # [n_k, C]
            if aggregation == "median":
                result[cls] = np.median(site_means, axis=0)
            else:
                result[cls] = _trimmed_mean(site_means, float(trim))
        out[name] = result
    return out


def screen_report(
    report: ClassActivationReport | Mapping[str, Any] | Any,
    expected_channels: Mapping[str, int],
    num_classes: int,
    clip_bound: float | None = None,
) -> str | None:
    """Why the server should reject this site's report, or ``None`` if it may be aggregated.

    Accepts the report object or its ``to_dict()`` form (what arrives in a DXO).
    Never raises for a bad report (garbage of any type included), so a server can log the reason, drop that one
    site and go on with the rest. Wraps :func:`validate_report` (layers and shapes match the model, finite values,
    non-negative integer counts). With ``clip_bound`` set (the bound every site's collector clips each per-image
    activation to), it also rejects a report whose sums are negative or exceed ``clip_bound * count``: clipped
    activations cannot produce them, so the site did not clip or the report was altered. This catches inflated
    values (e.g. x1000) that pass the shape and finiteness checks.
    """
    num_classes = check_num_classes(num_classes)  # server configuration errors raise; only the site's report is judged
    if clip_bound is not None:
        validate_clip_bound(clip_bound)  # a bad bound is the server's configuration error: raise, do not blame the site
    if not isinstance(report, (ClassActivationReport, Mapping)):
        return f"report is a {type(report).__name__}, not a ClassActivationReport or its to_dict() form"
    try:
        report = validate_report(report, dict(expected_channels), num_classes)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if clip_bound is not None:
        try:
            check_clip_bound(report, clip_bound)
        except ValueError as exc:
            return f"{exc}; the site did not clip or the report was altered"
    return None
