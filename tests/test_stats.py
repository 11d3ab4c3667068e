"""evaluation.stats: AUCs and their bootstrap intervals, t-intervals over seeds, paired differences, noise floors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from nvflare_unlearn.evaluation import noise_floor, paired_difference, t_interval
from nvflare_unlearn.evaluation.stats import auc, auc_ci, bootstrap_ci, tpr_at_fpr


def test_auc_matches_sklearn_with_and_without_ties():
    rng = np.random.default_rng(0)
    for rounding in (None, 1):
        p, n = rng.normal(0.4, 1, 300), rng.normal(0, 1, 200)
        if rounding is not None:
            p, n = np.round(p, rounding), np.round(n, rounding)  # many ties
        ref = roc_auc_score(np.r_[np.ones(p.size), np.zeros(n.size)], np.r_[p, n])
        assert auc(p, n) == pytest.approx(ref, abs=1e-12)
        assert auc_ci(p, n, n_boot=50)["auc"] == pytest.approx(ref, abs=1e-12)


def test_auc_extremes_and_symmetry():
    assert auc([2, 3], [0, 1]) == 1.0 and auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 1], [1, 1]) == 0.5


def test_auc_interval_covers_and_narrows():
    """Bootstrap intervals contain the estimate, shrink with more data, and usually cover the true AUC."""
    rng = np.random.default_rng(1)
    true = 0.5 * (1 + math.erf(0.5 / 2))  # AUC of N(0.5, 1) vs N(0, 1): Phi(0.5 / sqrt(2))
    small = auc_ci(rng.normal(0.5, 1, 100), rng.normal(0, 1, 100), n_boot=400)
    large = auc_ci(rng.normal(0.5, 1, 2000), rng.normal(0, 1, 2000), n_boot=400)
    for ci in (small, large):
        assert ci["low"] <= ci["auc"] <= ci["high"]
    assert large["high"] - large["low"] < 0.5 * (small["high"] - small["low"])
    covered = 0
    for seed in range(20):
        r = np.random.default_rng(100 + seed)
        ci = auc_ci(r.normal(0.5, 1, 200), r.normal(0, 1, 200), n_boot=300, seed=seed)
        covered += ci["low"] <= true <= ci["high"]
    assert covered >= 16  # nominal 95 %: 19 of 20 expected


def test_generic_bootstrap_agrees_with_the_auc_bootstrap():
    rng = np.random.default_rng(2)
    p, n = rng.normal(0.3, 1, 150), rng.normal(0, 1, 150)
    g = bootstrap_ci(auc, [p, n], n_boot=400, seed=3)
    a = auc_ci(p, n, n_boot=400, seed=3)
    assert g["value"] == pytest.approx(a["auc"])
    assert abs(g["low"] - a["low"]) < 0.03 and abs(g["high"] - a["high"]) < 0.03


def test_tpr_at_low_fpr():
    neg = np.arange(100.0)  # 0..99
    pos = np.array([99.5, 98.5, 97.5, 10.0])
    assert tpr_at_fpr(pos, neg, 0.0) == 0.25  # no false positive: threshold above 99
    assert tpr_at_fpr(pos, neg, 0.01) == 0.5  # one of 100 negatives may pass: above 98
    assert tpr_at_fpr(pos, neg, 0.02) == 0.75


def test_t_interval_known_values_and_missing_runs():
    r = t_interval([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["sd"] == 1.0
    assert r["half_width"] == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert t_interval([5.0])["half_width"] is None and t_interval([5.0])["mean"] == 5.0
    m = t_interval([1.0, None, 3.0])
    assert m["n"] == 2 and m["missing"] == 1 and m["mean"] == 2.0
    assert t_interval([])["mean"] is None


def test_paired_difference_cancels_shared_noise():
    shared = np.array([10.0, 20.0, 30.0, 40.0])  # seed effects far larger than the method effect
    a, b = shared + 1.0 + np.array([0.01, -0.01, 0.02, 0.0]), shared
    d = paired_difference(a.tolist(), b.tolist())
    assert d["mean"] == pytest.approx(1.005) and d["excludes_zero"]
    assert not t_interval(a.tolist())["low"] > t_interval(b.tolist())["high"]  # unpaired intervals overlap
    assert paired_difference([1.0, None], [0.0, 0.0])["n"] == 1


def test_noise_floor_pairs():
    f = noise_floor([0.50, 0.53, 0.49])
    assert f["n"] == 3 and len(f["pairs"]) == 3
    assert f["max_abs_diff"] == pytest.approx(0.04) and f["mean_abs_diff"] == pytest.approx((0.03 + 0.01 + 0.04) / 3)
    assert noise_floor([0.5])["max_abs_diff"] is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: auc([], [1.0]),
        lambda: auc([np.nan], [1.0]),
        lambda: auc_ci([1.0], [0.0], confidence=1.0),
        lambda: auc_ci([1.0], [0.0], n_boot=5),
        lambda: tpr_at_fpr([1.0], [0.0], fpr=1.0),
        lambda: t_interval([1.0, float("inf")]),
        lambda: paired_difference([1.0], [1.0, 2.0]),
        lambda: bootstrap_ci(auc, [[], [1.0]]),
    ],
)
def test_bad_input_is_a_value_error(call):
    with pytest.raises(ValueError):
        call()
