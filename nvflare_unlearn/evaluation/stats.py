"""Small statistics for forgetting claims: AUCs with bootstrap intervals, t-intervals over seeds, noise floors.

Why here: a forgetting test is only evidence when its uncertainty is stated. Three kinds of uncertainty matter:

- **sampling** of the images a test is scored on: a stratified bootstrap over the two groups gives a confidence
  interval for an AUC (``auc_ci``) or any other statistic (``bootstrap_ci``);
- **run-to-run** variation of the method (client sampling, batch order): several seeds and a Student-t interval
  of the mean (``t_interval``), and of paired differences between two methods run with the same seeds
  (``paired_difference``);
- the **noise floor**: how much two retrained models (the gold standard, different seeds) already differ on the
  same metric (``noise_floor``). A method's distance to retraining below that floor is not a difference.

Pure numpy (plus ``scipy.stats`` for the t quantile; scipy is a dependency of scikit-learn).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "auc",
    "auc_ci",
    "bootstrap_ci",
    "noise_floor",
    "paired_difference",
    "t_interval",
    "tpr_at_fpr",
]


def _scores(name: str, values: Any) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty: an AUC needs at least one score in each group")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds non-finite scores (NaN or inf)")
    return a


def auc(scores_pos: Any, scores_neg: Any) -> float:
    """ROC AUC of "positive scores above negative scores" (ties count half): the Mann-Whitney U / (n+ n-).

    0.5 is chance; 1.0 every positive outranks every negative.
    """
    p, n = _scores("scores_pos", scores_pos), _scores("scores_neg", scores_neg)
    bins = _value_bins(p, n)
    return float(_weighted_auc(_bin_counts(bins, None, True), _bin_counts(bins, None, False))[0])


def _value_bins(p: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, group starts, is_pos): both groups sorted together, equal scores forming one group (ties)."""
    both = np.concatenate([p, n])
    order = np.argsort(both, kind="mergesort")
    srt = both[order]
    starts = np.r_[0, np.flatnonzero(srt[1:] != srt[:-1]) + 1]
    return order, starts, order < p.size


def _bin_counts(bins: tuple[np.ndarray, np.ndarray, np.ndarray], weights: np.ndarray | None, pos: bool) -> np.ndarray:
    """(B, groups) draw counts of one group's samples per distinct score (``weights`` (B, n): resample counts)."""
    order, starts, is_pos = bins
    keep = is_pos if pos else ~is_pos
    w = np.ones((1, int(keep.sum()))) if weights is None else np.asarray(weights, dtype=np.float64)
    full = np.zeros((w.shape[0], order.size))
    full[:, keep] = w[:, (order[keep] if pos else order[keep] - int(is_pos.sum()))]
    return np.add.reduceat(full, starts, axis=1)


def _weighted_auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC per row from per-value counts (B, bins) of positives and negatives, values in ascending order."""
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each value
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    return wins / (pos.sum(axis=1) * neg.sum(axis=1))


def tpr_at_fpr(scores_pos: Any, scores_neg: Any, fpr: float = 0.01) -> float:
    """True-positive rate at the largest threshold whose false-positive rate is <= ``fpr`` (Carlini et al. 2022).

    With n negatives the achievable FPRs are multiples of 1/n: below 1/n only "no false positive" qualifies.
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    p, n = _scores("scores_pos", scores_pos), _scores("scores_neg", scores_neg)
    allowed = int(math.floor(fpr * n.size + 1e-9))  # false positives allowed
    neg_sorted = np.sort(n)[::-1]
    # threshold strictly above the (allowed+1)-th highest negative score
    thr = neg_sorted[allowed] if allowed < n.size else -np.inf
    return float(np.mean(p > thr))


def bootstrap_ci(
    statistic: Callable[..., float],
    groups: Sequence[Any],
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Percentile bootstrap interval of ``statistic(*groups)``, resampling each group independently (stratified).

    Returns ``{"value", "low", "high", "n_boot", "confidence"}``; ``value`` is the statistic on the data as given.
    """
    _check_confidence(confidence)
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    arrays = [np.asarray(g) for g in groups]
    if any(a.shape[0] == 0 for a in arrays):
        raise ValueError("every group needs at least one sample")
    rng = np.random.default_rng(seed)
    value = float(statistic(*arrays))
    boots = np.empty(n_boot)
    for b in range(n_boot):
        boots[b] = statistic(*(a[rng.integers(0, a.shape[0], a.shape[0])] for a in arrays))
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"value": value, "low": float(lo), "high": float(hi), "n_boot": int(n_boot), "confidence": confidence}


def auc_ci(
    scores_pos: Any, scores_neg: Any, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """AUC with a stratified percentile-bootstrap interval (positives and negatives resampled separately).

    Returns ``{"auc", "low", "high", "n_pos", "n_neg", "n_boot", "confidence"}``. Vectorised: 1,000 resamples of
    a few thousand scores take a fraction of a second.
    """
    _check_confidence(confidence)
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    p, n = _scores("scores_pos", scores_pos), _scores("scores_neg", scores_neg)
    rng = np.random.default_rng(seed)
    bins = _value_bins(p, n)
    value = float(_weighted_auc(_bin_counts(bins, None, True), _bin_counts(bins, None, False))[0])
    boots = []
    chunk = max(1, 2_000_000 // (p.size + n.size))  # bound memory: a few (chunk, n) arrays
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        wp = rng.multinomial(p.size, np.full(p.size, 1.0 / p.size), size=b)  # a resample = draw counts per sample
        wn = rng.multinomial(n.size, np.full(n.size, 1.0 / n.size), size=b)
        boots.append(_weighted_auc(_bin_counts(bins, wp, True), _bin_counts(bins, wn, False)))
    lo, hi = np.quantile(np.concatenate(boots), [(1 - confidence) / 2, (1 + confidence) / 2])
    return {
        "auc": value,
        "low": float(lo),
        "high": float(hi),
        "n_pos": int(p.size),
        "n_neg": int(n.size),
        "n_boot": int(n_boot),
        "confidence": confidence,
    }


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def t_interval(values: Sequence[float | None], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of independent runs (seeds) with a two-sided Student-t interval: ``mean ± t_{n-1} * sd / sqrt(n)``.

    ``None`` entries (a run that did not measure the value, e.g. "not reached") are left out and counted in
    ``missing``. With one value the interval is undefined (``half_width`` None); with none, ``mean`` is None.
    """
    from scipy.stats import t as student_t

    _check_confidence(confidence)
    v = np.asarray([float(x) for x in values if x is not None], dtype=np.float64)
    if v.size and not np.all(np.isfinite(v)):
        raise ValueError("values must be finite (use None for a missing run)")
    out: dict[str, Any] = {
        "n": int(v.size),
        "missing": int(len(values) - v.size),
        "confidence": confidence,
        "mean": float(v.mean()) if v.size else None,
        "sd": float(v.std(ddof=1)) if v.size > 1 else None,
        "half_width": None,
        "low": None,
        "high": None,
    }
    if v.size > 1:
        half = float(student_t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
        out.update(half_width=half, low=out["mean"] - half, high=out["mean"] + half)
    return out


def paired_difference(a: Sequence[float | None], b: Sequence[float | None], confidence: float = 0.95) -> dict[str, Any]:
    """``a[i] - b[i]`` per pair (same seed, so shared noise cancels) and the t-interval of their mean.

    A pair with a missing side is left out. ``excludes_zero`` says whether the interval lies on one side of 0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values must have equal length, got {len(a)} and {len(b)}")
    diffs = [None if x is None or y is None else float(x) - float(y) for x, y in zip(a, b)]
    out = t_interval(diffs, confidence)
    out["differences"] = diffs
    out["excludes_zero"] = bool(out["low"] is not None and (out["low"] > 0 or out["high"] < 0))
    return out


def noise_floor(values: Sequence[float | None]) -> dict[str, Any]:
    """Retrain-vs-retrain spread of one metric: ``|v_i - v_j|`` over every pair of retrained references.

    Returns ``{"values", "pairs", "mean_abs_diff", "max_abs_diff", "n"}`` (``None`` fields with fewer than two
    references). A method whose distance to retraining is within ``max_abs_diff`` is indistinguishable from
    retraining by this metric at this number of references.
    """
    v = [float(x) for x in values if x is not None]
    pairs = [abs(x - y) for x, y in itertools.combinations(v, 2)]
    return {
        "values": v,
        "n": len(v),
        "pairs": pairs,
        "mean_abs_diff": float(np.mean(pairs)) if pairs else None,
        "max_abs_diff": float(np.max(pairs)) if pairs else None,
    }
