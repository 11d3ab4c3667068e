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

import math
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


# ------------------------------------------------------------------------------------------------ declared sizes
def low_median(values: Sequence[float]) -> float:
    """The lower median (``sorted[(n - 1) // 2]``): an honest value whenever fewer than half the values inflate.

    With two sites it is the smaller one, so one site cannot double the reference by lying.
    """
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("low_median needs at least one value")
    return vals[(len(vals) - 1) // 2]


def size_caps(
    reported: Mapping[str, float], declared: Mapping[str, int] | None = None, factor: float = 2.0
) -> dict[str, float]:
    """The most weight each site may carry: its declared size, or ``factor`` x the low median of reported sizes.

    Threat model: a minority of sites lie about how much data they hold (counts, ``NUM_STEPS_CURRENT_ROUND``, test
    totals). ``declared`` is the server admin's table (job configuration, set before the job, not by the sites);
    a site missing from it gets the data-driven default, which a minority of inflating sites cannot raise.
    """
    if not reported:
        return {}
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"size cap factor must be a positive number, got {factor!r}")
    default = float(factor) * low_median([max(float(v), 0.0) for v in reported.values()])
    declared = dict(declared or {})
    return {site: float(declared[site]) if site in declared else default for site in reported}


def cap_report(report: ClassActivationReport, cap: float) -> tuple[ClassActivationReport, bool]:
    """The report with its weight (total count) scaled down to ``cap`` and its class means kept; (report, capped).

    Counts are scaled per class (at least 1 where the site holds the class), sums by the same per-class factor.
    """
    counts = np.asarray(report.counts, dtype=np.int64)
    total = int(counts.sum())
    if total <= cap:
        return report, False
    scaled = np.floor(counts * (float(cap) / total)).astype(np.int64)
    scaled = np.where(counts > 0, np.maximum(scaled, 1), 0)
    ratio = np.divide(scaled, counts, out=np.zeros(len(counts)), where=counts > 0)
    sums = {name: np.asarray(s, dtype=np.float64) * ratio[:, None] for name, s in report.sums.items()}
    return (
        ClassActivationReport(
            sums=sums, counts=scaled, hook_point=report.hook_point, layer_order=list(report.layer_order)
        ),
        True,
    )


# ------------------------------------------------------------------------------------------------ fine-tuning
def screen_update(base: Mapping[str, Any], params: Any) -> str | None:
    """Why a site's returned model cannot be averaged (None = it can): keys, shapes, finiteness."""
    if not isinstance(params, Mapping):
        return f"the result is a {type(params).__name__}, not a dict of arrays"
    missing, extra = sorted(set(base) - set(params)), sorted(set(params) - set(base))
    if missing or extra:
        return f"keys differ from the global model's (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, ref in base.items():
        try:
            arr = np.asarray(params[key], dtype=np.float64)
        except (TypeError, ValueError):
            return f"{key!r} is not numeric"
        if arr.shape != np.shape(ref):
            return f"{key!r} has shape {arr.shape}, the global model {np.shape(ref)}"
        if not np.all(np.isfinite(arr)):
            return f"{key!r} holds NaN or infinite values"
    return None


def aggregate_updates(
    base: Mapping[str, Any],
    site_params: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    aggregation: str = "median",
    trim: float = 0.2,
    clip: float | None = 2.0,
    outlier: float | None = 2.0,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The next global model from the sites' models: clip each site's update, leave out outliers, combine;
    returns (params, info).

    A site's update is its model minus ``base`` (the global model it was sent).

    1. ``clip``: an update whose L2 norm (over all floating-point entries) exceeds ``clip`` x the median update norm
       of the round is scaled down to that norm, so a site that boosts its update (model replacement) moves the
       model no further than a typical site.
    2. ``outlier``: a site whose (clipped) update lies further than ``outlier`` x the median such distance from the
       coordinate-wise median update is left out of the round (the site at the median distance never is). A site
       that trains the forgotten class back in sends an update pointing elsewhere than the honest majority's: on
       digits it lay 3 to 5 median distances away, the honest sites 0.75 to 1.2 (``benchmarks/robustness_privacy``).
    3. ``"mean"``: weighted by ``weights`` (capped sample counts, NVFlare's FedAvg), ``"median"`` /
       ``"trimmed_mean"``: coordinate-wise over the sites kept, unweighted (the bounds of
       :func:`aggregate_class_means`). Integer buffers (BatchNorm's ``num_batches_tracked``) take the median.
    Screen each site's model with :func:`screen_update` first.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0.0 <= float(trim) < 0.5:
        raise ValueError(f"trim must be a fraction in [0, 0.5), got {trim!r}")
    for name, value in (("clip", clip), ("outlier", outlier)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{name} must be a positive multiple of a median (update norm, distance) or None")
    site_params = list(site_params)
    w = np.asarray(list(weights), dtype=np.float64)
    if not site_params or w.shape != (len(site_params),) or np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("aggregate_updates needs one finite non-negative weight per site and a positive total")
    for i, params in enumerate(site_params):
        reason = screen_update(base, params)
        if reason is not None:
            raise ValueError(f"site {i}: {reason}; drop it with screen_update() before aggregating")
    floats = [k for k, v in base.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
    deltas = [
        {k: np.asarray(p[k], dtype=np.float64) - np.asarray(base[k], dtype=np.float64) for k in floats}
        for p in site_params
    ]
    norms = np.array([math.sqrt(sum(float(np.sum(d[k] ** 2)) for k in floats)) for d in deltas])
    scale = np.ones(len(deltas))
    bound = None
    if clip is not None:
        bound = float(clip) * float(np.median(norms))
        if bound > 0:
            scale = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
    deltas = [{k: d[k] * sc for k in floats} for d, sc in zip(deltas, scale)]
    keep = list(range(len(deltas)))
    distances = [0.0] * len(deltas)
    if outlier is not None and len(deltas) > 2 and floats:
        centre = {k: np.median(np.stack([d[k] for d in deltas]), axis=0) for k in floats}
        distances = [math.sqrt(sum(float(np.sum((d[k] - centre[k]) ** 2)) for k in floats)) for d in deltas]
        limit = max(float(outlier), 1.0) * float(np.median(distances))  # the median site is always kept
        if limit > 0:
            keep = [i for i, dist in enumerate(distances) if dist <= limit]
    out: dict[str, np.ndarray] = {}
    wk = w[keep]
    if wk.sum() <= 0:
        wk = np.ones(len(keep))
    for key, ref in base.items():
        ref = np.asarray(ref)
        if key in floats:
            stack = np.stack([deltas[i][key] for i in keep])
            if aggregation == "mean":
                delta = np.tensordot(wk / wk.sum(), stack, axes=1)
            elif aggregation == "median":
                delta = np.median(stack, axis=0)
            else:
                delta = _trimmed_mean(stack, float(trim))
            out[key] = (ref.astype(np.float64) + delta).astype(ref.dtype)
        else:  # integer buffers: a site cannot push a counter anywhere the honest majority did not
            values = np.stack([np.asarray(site_params[i][key], np.float64) for i in keep])
            out[key] = np.rint(np.median(values, 0)).astype(ref.dtype)
    info = {
        "update_norms": [float(n) for n in norms],
        "clip_norm": bound,
        "clipped": [i for i, s in enumerate(scale) if s < 1.0],
        "distances": [float(d) for d in distances],
        "left_out": [i for i in range(len(deltas)) if i not in keep],
        "aggregation": aggregation,
    }
    return out, info


# ------------------------------------------------------------------------------------------------ evaluation
def _accuracy(correct: np.ndarray, total: np.ndarray, mask: np.ndarray) -> float | None:
    t = float(total[mask].sum())
    return None if t <= 0 else float(correct[mask].sum()) / t


def robust_evaluation(
    site_correct: Mapping[str, Sequence[float]],
    site_total: Mapping[str, Sequence[float]],
    forget_classes: Sequence[int],
    caps: Mapping[str, float],
    outlier_tol: float = 0.1,
    set_cap_factor: float = 2.0,
) -> dict[str, Any]:
    """Combine the sites' per-class correct/total counts so that one site can neither dominate nor fake the result.

    1. Weight: a site whose test total exceeds its cap (declared test size, or :func:`size_caps`' default) counts
       as if it held ``cap`` images (its per-class counts scaled down, its accuracies unchanged); and its share of
       the U-set and of the R-set is capped at ``set_cap_factor`` x the low median of the sites' shares, so a site
       cannot pile its whole weight onto the forget classes.
    2. Outliers: for the U-set and the R-set, the centre is the median of the sites' accuracies (one vote per
       site); a site further from it than ``outlier_tol + 3 * sqrt(p (1 - p) / n)`` (the binomial noise of its own
       ``n`` images, ``p`` the centre clamped to [0.05, 0.95]) is flagged and left out.
    3. The result (``u_acc``, ``r_acc``, ``acc``, ``class_acc``, pooled ``correct`` / ``total``) pools the sites
       that were not flagged; ``per_site`` and ``median`` (the centres) are returned beside it.
    With honest sites under their caps and none flagged, the result equals the plain pooled accuracy.
    """
    sites = sorted(site_correct)
    if not sites or sorted(site_total) != sites:
        raise ValueError("robust_evaluation needs correct and total counts for the same, non-empty set of sites")
    k = len(np.asarray(site_correct[sites[0]]))
    u = np.zeros(k, dtype=bool)
    u[list(forget_classes)] = True
    sets = (("u_acc", u), ("r_acc", ~u))
    per_site: dict[str, dict[str, Any]] = {}
    scaled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in sites:
        c = np.asarray(site_correct[s], dtype=np.float64)
        t = np.asarray(site_total[s], dtype=np.float64)
        n = float(t.sum())
        factor = min(1.0, float(caps[s]) / n) if n > 0 else 1.0
        scaled[s] = (c * factor, t * factor)
        per_site[s] = {
            "u_acc": _accuracy(c, t, u),
            "r_acc": _accuracy(c, t, ~u),
            "acc": _accuracy(c, t, np.ones(k, dtype=bool)),
            "images": n,
            "weight": n * factor,
            "capped": factor < 1.0,
        }
    for _key, mask in sets:  # per-set caps: no site's U-set (or R-set) weight above the factor x the median site's
        shares = {s: float(scaled[s][1][mask].sum()) for s in sites}
        cap = float(set_cap_factor) * low_median(list(shares.values()))
        for s in sites:
            if shares[s] > cap > 0:
                f = np.where(mask, cap / shares[s], 1.0)
                scaled[s] = (scaled[s][0] * f, scaled[s][1] * f)
                per_site[s]["capped"] = True
    flagged: dict[str, str] = {}
    centres: dict[str, float | None] = {}
    for key, mask in sets:
        have = [s for s in sites if per_site[s][key] is not None]
        if not have:
            centres[key] = None
            continue
        centre = float(np.median([per_site[s][key] for s in have]))
        centres[key] = centre
        p = min(max(centre, 0.05), 0.95)
        for s in have:
            n_own = max(float(np.asarray(site_total[s], dtype=np.float64)[mask].sum()), 1.0)
            tol = outlier_tol + 3.0 * math.sqrt(p * (1 - p) / n_own)
            gap = abs(per_site[s][key] - centre)
            if gap > tol:
                flagged.setdefault(s, f"{key} {per_site[s][key]:.3f} is {gap:.3f} from the sites' median {centre:.3f}")
    kept = [s for s in sites if s not in flagged]
    correct = sum((scaled[s][0] for s in kept), np.zeros(k))
    total = sum((scaled[s][1] for s in kept), np.zeros(k))
    for s in sites:
        per_site[s]["flagged"] = flagged.get(s)
    return {
        "u_acc": _accuracy(correct, total, u),
        "r_acc": _accuracy(correct, total, ~u),
        "acc": _accuracy(correct, total, np.ones(k, dtype=bool)),
        "class_acc": [None if t <= 0 else float(c / t) for c, t in zip(correct, total)],
        "correct": correct,
        "total": total,
        "sites": kept,
        "flagged": flagged,
        "per_site": per_site,
        "median": centres,
    }
