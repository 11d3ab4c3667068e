"""Privacy controls for a site's class-activation upload: minimum counts, clipping bound, Gaussian noise.

A site uploads, per conv layer, the per-class SUMS of per-image activations (ReLU, then global average pooling, one
value per channel) and the per-class COUNTS. Four controls, applied on the site before the upload:

1. :func:`apply_min_count` - a class with fewer than ``min_count`` images at this site is not reported (sums and
   count zeroed), in the spirit of NVFlare's ``MinCountCleanser`` for federated statistics. A deterministic policy,
   not a differential-privacy guarantee.
2. Clipping - every per-image, per-channel activation must lie in ``[0, B]``. Activations after ReLU are >= 0; the
   upper bound B has to be enforced per image *inside the collector* (sums cannot be un-clipped afterwards).
   :func:`clip_activations` is that per-image operation; :func:`check_clip_bound` is the check a report can be
   given after the fact (necessary, not sufficient: class means <= B do not prove every image was clipped).
3. :func:`gaussian_noise` - the Gaussian mechanism on the per-class sums (and, for the add/remove unit, the counts).
4. :class:`PrivacyLedger` - the site's own account of every release it made from its data, which refuses a release
   beyond the site's budget, so a server cannot ask again and again and average the noise away.

What epsilon covers (the unit of privacy; ``PrivacyOptions.dp_unit``):

* ``"swap_within_class"`` (default): two data sets are neighbours when one image is replaced by another image OF
  THE SAME CLASS. Class counts do not change, so they are released exactly (public), and one image moves the sum
  row of its class by a vector in ``[-B, B]^C_total``: L2 sensitivity ``B * sqrt(C_total)``. This does NOT protect
  whether an image is in the data set at all, nor the class sizes: both are released exactly.
* ``"add_remove_image"``: neighbours differ by one image added or removed. Counts are then noised in the same
  Gaussian release (``noise_counts=True``), L2 sensitivity ``sqrt(B^2 * C_total + 1)``, rounded and clipped at 0.
  This is the usual DP unit; it costs noisy counts (and so noisy class means) at small sites.

``C_total`` is the number of channels of every hooked conv layer together (all released together).

Sigma: the analytic Gaussian mechanism (Balle & Wang, ICML 2018, Thm. 8) gives the smallest sigma that is exactly
(epsilon, delta)-DP, for any epsilon > 0. The classic bound ``sqrt(2 ln(1.25/delta)) * S / epsilon`` (Dwork & Roth,
Thm. A.1) is only proven for epsilon < 1 and is offered for comparison (``method="classic"``).

Composition: one activation pass is one release. Unlearning k classes runs k passes (one per class, as in the
paper), so the request's total is (k*epsilon, k*delta) by basic composition; :func:`split_budget` divides a
per-request budget, and the site's ledger adds up every release across requests. Not covered: the fine-tuning
updates (weights) and the evaluation counts a site returns carry no noise. Limitation: numpy's generator is not a
cryptographic RNG and floating-point Gaussian samples are not a hardened DP implementation (Mironov, CCS 2012);
treat the guarantee as a design-level one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nvflare_unlearn import _io
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
    """L2 sensitivity of one upload: ``B*sqrt(C_total)`` for one image swapped within its class (counts public),
    ``sqrt(B^2*C_total + 1)`` for one image added or removed with the counts noised (``noise_counts``)."""
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
    """A new report with Gaussian noise on every per-class sum: (epsilon, delta)-DP for one image swapped within its
    class (counts public), or, with ``noise_counts``, for one image added or removed (counts noised too).

    Requires the report's activations to have been clipped per image to ``[0, clip_bound]`` (checked as far as a
    report allows, see :func:`check_clip_bound`). Noise ``N(0, sigma^2)`` is added to every entry of every class row
    of every layer, with sigma from :func:`gaussian_sigma` at sensitivity :func:`sensitivity`.
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


# ------------------------------------------------------------------------------------------------ the site's ledger
class BudgetExceeded(ValueError):
    """A release the site's privacy ledger refuses: it would spend more than the site's budget."""


_LEDGER_FORMAT = "nvflare_unlearn.privacy_ledger/1"
_SLACK = 1e-9  # relative: k releases of epsilon/k add up to epsilon up to float rounding


class PrivacyLedger:
    """The site's own account of every DP release it made from its data, kept at the site (a JSON file).

    Every release is recorded BEFORE it leaves the site (a crash after recording over-counts, never under-counts)
    with its (epsilon, delta), the model it was computed on and a note; a release that would take the running total
    (basic composition) over the budget raises :class:`BudgetExceeded` and nothing is released. The budget covers
    every release this site makes from its data, whatever model or server asks. The first use writes the budget
    into the file; a later job's configuration can lower it but never raise it (only the site's admin, editing the
    file, can). An unreadable ledger refuses every release (fail closed). Writes are atomic.
    """

    def __init__(self, path: str | os.PathLike, budget_epsilon: float, budget_delta: float):
        _check_eps_delta(budget_epsilon, budget_delta)
        if not math.isfinite(float(budget_epsilon)):
            raise ValueError("a privacy budget must be finite (an infinite budget is no budget)")
        self.path = Path(path)
        self.budget_epsilon = float(budget_epsilon)
        self.budget_delta = float(budget_delta)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {
                "format": _LEDGER_FORMAT,
                "budget": {"epsilon": self.budget_epsilon, "delta": self.budget_delta},
                "entries": [],
            }
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            budget = data["budget"]
            eps, delta = float(budget["epsilon"]), float(budget["delta"])
            entries = list(data["entries"])
            for e in entries:
                float(e["epsilon"]), float(e["delta"])
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise BudgetExceeded(
                f"privacy ledger {str(self.path)!r} is unreadable ({type(exc).__name__}); no release until the "
                "site's admin repairs or removes it"
            ) from None
        if data.get("format") != _LEDGER_FORMAT:
            raise BudgetExceeded(f"{str(self.path)!r} is not a privacy ledger; no release until it is repaired")
        data["budget"] = {"epsilon": min(eps, self.budget_epsilon), "delta": min(delta, self.budget_delta)}
        return data

    def spent(self) -> tuple[float, float]:
        """(epsilon, delta) released so far (basic composition)."""
        entries = self._read()["entries"]
        return float(sum(float(e["epsilon"]) for e in entries)), float(sum(float(e["delta"]) for e in entries))

    def spend(self, epsilon: float, delta: float, *, model: str, note: str = "") -> dict[str, Any]:
        """Record one release of (epsilon, delta) about ``model``, or raise ``BudgetExceeded`` (nothing recorded)."""
        _check_eps_delta(epsilon, delta)
        if not math.isfinite(float(epsilon)):
            raise BudgetExceeded("a release without noise (epsilon = inf) cannot be charged to a finite budget")
        with _locked(self.path):
            data = self._read()
            eps_used = sum(float(e["epsilon"]) for e in data["entries"])
            delta_used = sum(float(e["delta"]) for e in data["entries"])
            budget = data["budget"]
            if (
                eps_used + epsilon > budget["epsilon"] * (1 + _SLACK)
                or delta_used + delta > budget["delta"] * (1 + _SLACK) + 1e-300
            ):
                raise BudgetExceeded(
                    f"this release (epsilon {epsilon:g}, delta {delta:g}) would exceed the site's privacy budget "
                    f"(epsilon {budget['epsilon']:g}, delta {budget['delta']:g}; spent {eps_used:g}, {delta_used:g} "
                    f"in {len(data['entries'])} release(s)); ledger {str(self.path)!r}"
                )
            entry = {
                "time": time.time(),
                "epsilon": float(epsilon),
                "delta": float(delta),
                "model": str(model)[:128],
                "note": str(note)[:256],
            }
            data["entries"].append(entry)
            _io.write_json(self.path, data)
        return entry


def site_ledger(privacy: Any, path: str | os.PathLike) -> PrivacyLedger | None:
    """The ledger a site keeps under ``PrivacyOptions`` (None without DP): budget ``dp_budget_*``, by default one
    request's ``dp_epsilon`` / ``dp_delta``."""
    from nvflare_unlearn.options import PrivacyOptions

    privacy = PrivacyOptions.from_dict(privacy)
    if not privacy.dp:
        return None
    return PrivacyLedger(
        path,
        privacy.dp_budget_epsilon if privacy.dp_budget_epsilon is not None else privacy.dp_epsilon,
        privacy.dp_budget_delta if privacy.dp_budget_delta is not None else privacy.dp_delta,
    )


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside the ledger, so two tasks of one site cannot both pass the budget check."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - no flock (Windows): one process per site is assumed
            pass
        yield


def privatize_report(
    report: ClassActivationReport,
    privacy: Any,
    passes: int,
    rng: np.random.Generator,
    ledger: PrivacyLedger | None = None,
    model: str = "",
) -> tuple[ClassActivationReport, float]:
    """What a site does to its activation report before it leaves (``PrivacyOptions``); returns (report, sigma).

    Min-count, then (with DP) one Gaussian release of ``dp_epsilon / passes``, ``dp_delta / passes`` at the
    sensitivity of ``dp_unit`` (noised counts for ``add_remove_image``, where min-count then runs on the noised
    counts), charged to ``ledger`` first. The report must come from a collector that clipped per image to
    ``clip_bound``. Used by the executor and the Client API helper alike.
    """
    from nvflare_unlearn.options import PrivacyOptions

    privacy = PrivacyOptions.from_dict(privacy)
    noise_counts = privacy.dp and privacy.dp_unit == "add_remove_image"
    if privacy.min_count > 1 and not noise_counts:
        report = apply_min_count(report, privacy.min_count)
    sigma = 0.0
    if privacy.dp:
        eps, delta = split_budget(privacy.dp_epsilon, privacy.dp_delta, passes)
        if ledger is not None:
            ledger.spend(eps, delta, model=model, note=f"activation statistics, 1 of {passes} pass(es)")
        bound = privacy.clip_bound
        report = gaussian_noise(report, eps, delta, bound, rng, noise_counts=noise_counts)
        sigma = gaussian_sigma(eps, delta, sensitivity(total_channels(report), bound, noise_counts))
        if privacy.min_count > 1 and noise_counts:
            report = apply_min_count(report, privacy.min_count)
    return report, sigma
