"""Privacy controls for a site's class-activation upload: minimum counts, clipping bound, Gaussian noise.

A site uploads, per conv layer, the per-class SUMS of per-image activations (ReLU, then global average pooling, one
value per channel) and the per-class COUNTS. Three controls, applied on the site before the upload:

1. :func:`apply_min_count` - a class with fewer than ``min_count`` images at this site is not reported (sums and
   count zeroed), in the spirit of NVFlare's ``MinCountCleanser`` for federated statistics. A deterministic policy,
   not a differential-privacy guarantee.
2. Clipping - every per-image, per-channel activation must lie in ``[0, B]``. Activations after ReLU are >= 0; the
   upper bound B has to be enforced per image *inside the collector* (sums cannot be un-clipped afterwards).
   :func:`clip_activations` is that per-image operation; :func:`check_clip_bound` is the check a report can be
   given after the fact (necessary, not sufficient: class means <= B do not prove every image was clipped).
3. :func:`gaussian_noise` - the Gaussian mechanism on the per-class sums, (epsilon, delta)-DP with respect to
   adding or removing one image at the site (see :func:`sensitivity`).

Sensitivity (add/remove one image, all conv layers released together): the image adds its activation vector
(one value per channel of every hooked layer, ``C_total`` values, each in [0, B]) to the sum row of its own class
only, so the L2 change of the whole upload is at most ``B * sqrt(C_total)``. Counts: by default they are treated as
public (released exactly, NOT protected; they change by 1 in one class). With ``noise_counts=True`` they are noised
in the same Gaussian release, L2 sensitivity ``sqrt(B^2 * C_total + 1)``, then rounded and clipped at 0
(post-processing keeps the guarantee). Under replace-one adjacency (an image swapped for another of a different
class) the sensitivity is ``sqrt(2)`` times larger: pass ``epsilon``/``delta`` accordingly.

Sigma: the analytic Gaussian mechanism (Balle & Wang, ICML 2018, Thm. 8) gives the smallest sigma that is exactly
(epsilon, delta)-DP, for any epsilon > 0. The classic bound ``sqrt(2 ln(1.25/delta)) * S / epsilon`` (Dwork & Roth,
Thm. A.1) is only proven for epsilon < 1 and is offered for comparison (``method="classic"``).

Composition: one activation pass is one release. Unlearning k classes runs k passes (one per class, as in the
paper), so the request's total is (k*epsilon, k*delta) by basic composition; :func:`split_budget` divides a
per-request budget. Limitation: numpy's generator is not a cryptographic RNG and floating-point Gaussian samples
are not a hardened DP implementation (Mironov, CCS 2012); treat the guarantee as a design-level one.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from nvflare_unlearn.method.activations import ClassActivationReport


def _copy_report(
    report: ClassActivationReport, sums: dict[str, np.ndarray], counts: np.ndarray
) -> ClassActivationReport:
    return ClassActivationReport(
        sums=sums, counts=counts, hook_point=report.hook_point, layer_order=list(report.layer_order)
    )


def _require_report(report: object) -> ClassActivationReport:
    if not isinstance(report, ClassActivationReport):
        raise ValueError(f"expected a ClassActivationReport, got {type(report).__name__}")
    return report


def apply_min_count(report: ClassActivationReport, min_count: int) -> ClassActivationReport:
    """A new report in which every class with fewer than ``min_count`` images has zero sums and zero count.

    Small classes are where a site's statistics come closest to describing single images; dropping them is the
    per-class analogue of NVFlare's ``MinCountCleanser``. The server treats a zero-count class as not reported by
    this site (excluded from robust aggregation, adds nothing to the exact mean). ``min_count`` 0 or 1 keeps all.
    """
    _require_report(report)
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 0:
        raise ValueError(f"min_count must be a non-negative integer (images per class); got {min_count!r}")
    counts = np.asarray(report.counts, dtype=np.int64).copy()
    drop = counts < int(min_count)
    counts[drop] = 0
    sums = {}
    for name, s in report.sums.items():
        s = np.array(s, dtype=np.float64, copy=True)
        s[drop] = 0.0
        sums[name] = s
    return _copy_report(report, sums, counts)


def clip_activations(activations, clip_bound: float):
    """Clip per-image pooled activations (tensor or array ``[N, C]``) to ``[0, clip_bound]``.

    This is the per-image step the collector must apply before summing for :func:`gaussian_noise`'s sensitivity to
    hold. Works on numpy arrays and torch tensors alike (anything with ``.clip``).
    """
    validate_clip_bound(clip_bound)
    return activations.clip(0.0, float(clip_bound))


def validate_clip_bound(clip_bound: float) -> float:
    """``clip_bound`` as a float if it is a positive finite number (the bound B every sensitivity rests on)."""
    if isinstance(clip_bound, bool) or not isinstance(clip_bound, (int, float, np.floating, np.integer)):
        raise ValueError(f"clip_bound must be a positive number; got {clip_bound!r}")
    if not (math.isfinite(float(clip_bound)) and float(clip_bound) > 0):
        raise ValueError(f"clip_bound must be a positive finite number; got {clip_bound!r}")
    return float(clip_bound)


def check_clip_bound(report: ClassActivationReport, clip_bound: float) -> None:
    """Raise ``ValueError`` unless every class's sums lie in ``[0, clip_bound * count]``.

    A report that fails cannot have come from activations clipped to ``[0, clip_bound]``, so the noise calibrated to
    that bound would not give the stated guarantee. Passing does not prove per-image clipping (only the collector
    can do that); it catches a collector run without the clip and inflated values.
    """
    _require_report(report)
    bound = validate_clip_bound(clip_bound)
    counts = np.asarray(report.counts, dtype=np.float64)
    for name, s in report.sums.items():
        s = np.asarray(s, dtype=np.float64)
        if not np.all(np.isfinite(s)):
            raise ValueError(f"layer {name!r} has non-finite activation sums")
        if np.any(s < 0):
            raise ValueError(f"layer {name!r} has negative activation sums; ReLU activations are never negative")
        # relative slack 1e-6: sums travel as float32 (activations.WIRE_SUMS_DTYPE), which rounds up to ~6e-8
        over = np.nonzero(np.any(s > bound * counts[:, None] * (1 + 1e-6) + 1e-12, axis=1))[0]
        if over.size:
            raise ValueError(
                f"layer {name!r}: classes {over.tolist()} have mean activations above clip_bound={bound:g}; "
                f"collect the activations with per-image clipping to [0, {bound:g}] (or raise the bound)"
            )


def total_channels(report: ClassActivationReport) -> int:
    """Number of values one image contributes to its class row: channels summed over all reported layers."""
    return int(sum(np.asarray(s).shape[1] for s in report.sums.values()))


def sensitivity(num_channels: int, clip_bound: float, noise_counts: bool = False) -> float:
    """L2 sensitivity of one upload to adding/removing one image: ``B*sqrt(C_total)`` (``+1`` inside: noised counts)."""
    if isinstance(num_channels, bool) or not isinstance(num_channels, (int, np.integer)) or num_channels < 1:
        raise ValueError(f"num_channels must be a positive integer; got {num_channels!r}")
    bound = validate_clip_bound(clip_bound)
    return math.sqrt(bound * bound * int(num_channels) + (1.0 if noise_counts else 0.0))


def _check_eps_delta(epsilon: float, delta: float) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)) or not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (use math.inf for no noise); got {epsilon!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.floating)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), typically well below 1/number of images; got {delta!r}")


def _log_ndtr(x: float) -> float:
    """log Phi(x), accurate in the far left tail where Phi underflows."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Asymptotic series: Phi(x) ~ phi(x)/|x| * (1 - 1/x^2 + 3/x^4 - 15/x^6)
    x2 = x * x
    series = 1.0 - 1.0 / x2 + 3.0 / (x2 * x2) - 15.0 / (x2 * x2 * x2)
    return -0.5 * x2 - math.log(-x) - 0.5 * math.log(2.0 * math.pi) + math.log(series)


def analytic_gaussian_delta(sigma: float, epsilon: float, sens: float) -> float:
    """The exact delta of the Gaussian mechanism with noise ``sigma`` at ``epsilon`` (Balle & Wang 2018, Thm. 8)."""
    a = sens / (2.0 * sigma)
    b = epsilon * sigma / sens
    first = 0.5 * math.erfc(-(a - b) / math.sqrt(2.0))
    log_second = epsilon + _log_ndtr(-a - b)
    second = math.exp(log_second) if log_second < 700 else math.inf
    return first - second


def gaussian_sigma(epsilon: float, delta: float, sens: float, method: str = "analytic") -> float:
    """Noise standard deviation for an (epsilon, delta) Gaussian release of L2 sensitivity ``sens``.

    ``"analytic"``: smallest sigma with exact delta <= ``delta`` (bisection on Balle & Wang's condition); valid for
    every epsilon > 0. ``"classic"``: ``sqrt(2 ln(1.25/delta)) * sens / epsilon``, proven only for epsilon < 1, so
    larger epsilon raises. ``epsilon = inf`` gives 0 (no noise, no privacy).
    """
    if epsilon == math.inf:
        _check_eps_delta(1.0, delta)
        return 0.0
    _check_eps_delta(epsilon, delta)
    if not (math.isfinite(sens) and sens > 0):
        raise ValueError(f"sensitivity must be a positive finite number; got {sens!r}")
    if method == "classic":
        if epsilon >= 1:
            raise ValueError(
                f"the classic Gaussian bound is only proven for epsilon < 1 (got {epsilon}); use method='analytic'"
            )
        return math.sqrt(2.0 * math.log(1.25 / delta)) * sens / epsilon
    if method != "analytic":
        raise ValueError(f"unknown sigma method {method!r}; choose 'analytic' or 'classic'")
    delta_at: Callable[[float], float] = lambda s: analytic_gaussian_delta(s, epsilon, sens)  # noqa: E731
    lo, hi = sens * 1e-6, sens
    while delta_at(hi) > delta:  # delta(sigma) decreases in sigma
        lo, hi = hi, hi * 2.0
        if hi > sens * 1e12:
            raise ValueError(f"no noise level reaches delta={delta} at epsilon={epsilon}")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if delta_at(mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def split_budget(epsilon: float, delta: float, releases: int) -> tuple[float, float]:
    """Per-release (epsilon, delta) so that ``releases`` releases compose (basic composition) to the given total."""
    if isinstance(releases, bool) or not isinstance(releases, (int, np.integer)) or releases < 1:
        raise ValueError(f"releases must be a positive integer; got {releases!r}")
    if epsilon == math.inf:
        _check_eps_delta(1.0, delta)
        return math.inf, delta / releases
    _check_eps_delta(epsilon, delta)
    return epsilon / releases, delta / releases


def gaussian_noise(
    report: ClassActivationReport,
    epsilon: float,
    delta: float,
    clip_bound: float,
    rng: np.random.Generator,
    noise_counts: bool = False,
    method: str = "analytic",
) -> ClassActivationReport:
    """A new report with Gaussian noise on every per-class sum: (epsilon, delta)-DP per one added/removed image.

    Requires the report's activations to have been clipped per image to ``[0, clip_bound]`` (checked as far as a
    report allows, see :func:`check_clip_bound`). Noise ``N(0, sigma^2)`` is added to every entry of every class row
    of every layer, with sigma from :func:`gaussian_sigma` at sensitivity :func:`sensitivity`. Counts are public
    unless ``noise_counts``.
    Post-processing, which keeps the guarantee: noised counts are rounded and clipped at 0, and noised sums are
    clipped to ``[0, clip_bound * count]`` so the result is still a valid report. Apply :func:`apply_min_count`
    before this call when counts are public, after it when counts are noised (so the policy sees only noised counts).
    """
    _require_report(report)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); got {type(rng).__name__}"
        )
    bound = validate_clip_bound(clip_bound)
    check_clip_bound(report, bound)
    counts = np.asarray(report.counts, dtype=np.int64).copy()
    sums = {name: np.array(s, dtype=np.float64, copy=True) for name, s in report.sums.items()}
    sigma = gaussian_sigma(epsilon, delta, sensitivity(total_channels(report), bound, noise_counts), method)
    if sigma == 0.0:
        return _copy_report(report, sums, counts)
    if noise_counts:
        counts = np.maximum(np.rint(counts + rng.normal(0.0, sigma, size=counts.shape)), 0).astype(np.int64)
    for name in sorted(sums):
        noisy = sums[name] + rng.normal(0.0, sigma, size=sums[name].shape)
        sums[name] = np.clip(noisy, 0.0, bound * counts[:, None].astype(np.float64))
    return _copy_report(report, sums, counts)
