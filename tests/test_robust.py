"""Robust aggregation of activation reports and per-site screening (nvflare_unlearn.protect.robust)."""

from __future__ import annotations

import numpy as np
import pytest

from nvflare_unlearn.method.activations import ClassActivationReport, merge_reports
from nvflare_unlearn.protect.robust import aggregate_class_means, screen_report

EXPECTED = {"conv1": 3, "conv2": 2}
K = 4


def _report(means: dict[str, np.ndarray], counts) -> ClassActivationReport:
    counts = np.asarray(counts, dtype=np.int64)
    sums = {name: np.asarray(m, dtype=np.float64) * counts[:, None] for name, m in means.items()}
    return ClassActivationReport(sums=sums, counts=counts, hook_point="conv")


def _honest_sites(n: int = 10, seed: int = 0) -> list[ClassActivationReport]:
    rng = np.random.default_rng(seed)
    base = {name: rng.uniform(0.5, 1.5, size=(K, c)) for name, c in EXPECTED.items()}
    sites = []
    for _ in range(n):
        means = {name: b + rng.normal(0, 0.05, size=b.shape).clip(-0.4, 0.4) for name, b in base.items()}
        sites.append(_report(means, rng.integers(5, 50, size=K)))
    return sites


def _site_means(reports, name, cls):
    return np.stack([r.sums[name][cls] / r.counts[cls] for r in reports if r.counts[cls] > 0])


def test_mean_is_the_exact_count_weighted_mean():
    sites = _honest_sites()
    got = aggregate_class_means(sites, "mean")
    want = merge_reports(sites).means()
    for name in EXPECTED:
        np.testing.assert_array_equal(got[name], want[name])
        # and by hand: sum of sums / sum of counts
        manual = sum(r.sums[name] for r in sites) / sum(r.counts for r in sites)[:, None]
        np.testing.assert_allclose(got[name], manual, rtol=1e-12)


def test_median_and_trimmed_mean_hand_worked():
    # one layer, 2 classes x 2 channels, five sites; class means per site (counts differ: robust methods ignore them)
    vals = [
        [[1.0, 10.0], [2.0, 0.0]],
        [[2.0, 20.0], [4.0, 0.0]],
        [[3.0, 30.0], [6.0, 0.0]],
        [[4.0, 40.0], [8.0, 0.0]],
        [[100.0, 0.0], [10.0, 0.0]],
    ]
    counts = [[1, 1], [2, 3], [3, 1], [4, 2], [5, 9]]
    sites = [_report({"c": np.array(v)}, c) for v, c in zip(vals, counts)]
    med = aggregate_class_means(sites, "median")["c"]
    # class 0 channel 0: median(1,2,3,4,100)=3 ; channel 1: median(10,20,30,40,0)=20 ; class 1: median(2,4,6,8,10)=6
    np.testing.assert_allclose(med, [[3.0, 20.0], [6.0, 0.0]])
    tm = aggregate_class_means(sites, "trimmed_mean", trim=0.2)["c"]
    # floor(0.2*5)=1 dropped at each end: mean(2,3,4)=3 ; mean(10,20,30)=20 ; mean(4,6,8)=6
    np.testing.assert_allclose(tm, [[3.0, 20.0], [6.0, 0.0]])
    # trim=0.1 with 5 sites trims floor(0.5)=0 values: the unweighted mean of site means (documented fragility)
    tm0 = aggregate_class_means(sites, "trimmed_mean", trim=0.1)["c"]
    np.testing.assert_allclose(tm0, np.mean(np.array(vals), axis=0))


def test_sites_lacking_a_class_are_excluded_for_that_class():
    a = _report({"c": np.array([[1.0, 1.0], [5.0, 5.0]])}, [10, 10])
    b = _report({"c": np.array([[2.0, 2.0], [0.0, 0.0]])}, [10, 0])  # no class-1 data (or dropped by min-count)
    c = _report({"c": np.array([[3.0, 3.0], [7.0, 7.0]])}, [10, 10])
    med = aggregate_class_means([a, b, c], "median")["c"]
    np.testing.assert_allclose(med[0], [2.0, 2.0])
    np.testing.assert_allclose(med[1], [6.0, 6.0])  # median of {5, 7}, not of {5, 0, 7}


def test_class_no_site_reports_gets_zero_row_never_nan():
    a = _report({"c": np.array([[1.0, 1.0], [0.0, 0.0]])}, [3, 0])
    b = _report({"c": np.array([[2.0, 4.0], [0.0, 0.0]])}, [3, 0])
    for method in ("mean", "median", "trimmed_mean"):
        out = aggregate_class_means([a, b], method)["c"]
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[1], [0.0, 0.0])


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_one_x1000_site_of_ten_stays_within_the_honest_range(method):
    honest = _honest_sites(10)
    clean = aggregate_class_means(honest, method)
    poisoned = list(honest)
    bad = poisoned[3]
    poisoned[3] = ClassActivationReport({n: s * 1000.0 for n, s in bad.sums.items()}, bad.counts.copy(), "conv")
    robust = aggregate_class_means(poisoned, method)
    mean_clean = aggregate_class_means(honest, "mean")
    mean_bad = aggregate_class_means(poisoned, "mean")
    survivors = honest[:3] + honest[4:]
    for name in EXPECTED:
        for cls in range(K):
            vals = _site_means(survivors, name, cls)
            lo, hi = vals.min(axis=0), vals.max(axis=0)
            # the stated bound: result inside [min, max] of the 9 honest sites, per coordinate
            assert np.all(robust[name][cls] >= lo - 1e-12) and np.all(robust[name][cls] <= hi + 1e-12)
            # so it moved by at most the honest spread (here at most 0.8, typically far less)
            assert np.all(np.abs(robust[name][cls] - clean[name][cls]) <= (hi - lo) + 1e-12)
        # the exact mean explodes: the poisoned site alone lifts it by ~ (1000-1) * its weight
        assert np.max(np.abs(mean_bad[name] - mean_clean[name])) > 20.0
        assert np.max(np.abs(robust[name] - clean[name])) < 0.8


def test_swapped_classes_from_one_site_cannot_leave_the_honest_range():
    honest = _honest_sites(10, seed=1)
    bad = honest[0]
    perm = [1, 0, 2, 3]  # the site relabels class 0 as 1 and back
    swapped = ClassActivationReport({n: s[perm] for n, s in bad.sums.items()}, bad.counts[perm], "conv")
    poisoned = [swapped] + honest[1:]
    med = aggregate_class_means(poisoned, "median")
    for name in EXPECTED:
        for cls in range(K):
            vals = _site_means(honest[1:], name, cls)
            assert np.all(med[name][cls] >= vals.min(axis=0) - 1e-12)
            assert np.all(med[name][cls] <= vals.max(axis=0) + 1e-12)


def test_non_finite_report_is_refused_with_advice_to_screen():
    sites = _honest_sites(3)
    sites[1].sums["conv1"][0, 0] = np.nan
    with pytest.raises(ValueError, match="screen_report"):
        aggregate_class_means(sites, "median")
    with pytest.raises(ValueError, match="non-finite"):
        aggregate_class_means(sites, "mean")


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"aggregation": "mode"}, "aggregation must be one of"),
        ({"aggregation": "trimmed_mean", "trim": 0.5}, "trim"),
        ({"aggregation": "trimmed_mean", "trim": -0.1}, "trim"),
        ({"aggregation": "median", "trim": "x"}, "trim"),
    ],
)
def test_bad_arguments_raise(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        aggregate_class_means(_honest_sites(3), **kwargs)


def test_bad_report_lists_raise():
    with pytest.raises(ValueError, match="at least one report"):
        aggregate_class_means([], "median")
    sites = _honest_sites(2)
    with pytest.raises(ValueError, match="not a ClassActivationReport"):
        aggregate_class_means([sites[0], {"sums": {}}], "median")
    other = _report({"other": np.ones((K, 3))}, np.ones(K))
    with pytest.raises(ValueError, match="different layers"):
        aggregate_class_means([sites[0], other], "median")
    neg = ClassActivationReport(dict(sites[1].sums), np.array([1, -1, 1, 1]), "conv")
    with pytest.raises(ValueError, match="negative counts"):
        aggregate_class_means([sites[0], neg], "trimmed_mean")


# ---------------------------------------------------------------- screen_report


def test_screen_accepts_good_report_and_its_dict_form():
    rep = _honest_sites(1)[0]
    assert screen_report(rep, EXPECTED, K) is None
    assert screen_report(rep.to_dict(), EXPECTED, K) is None
    assert screen_report(rep, EXPECTED, K, clip_bound=2.0) is None  # honest means are below 2


def _bad_reports():
    good = _honest_sites(1)[0]
    nan = ClassActivationReport({n: s.copy() for n, s in good.sums.items()}, good.counts.copy(), "conv")
    nan.sums["conv2"][1, 1] = np.nan
    missing = ClassActivationReport({"conv1": good.sums["conv1"]}, good.counts.copy(), "conv")
    wrong_shape = ClassActivationReport(
        {"conv1": good.sums["conv1"][:, :2], "conv2": good.sums["conv2"]}, good.counts.copy(), "conv"
    )
    wrong_k = ClassActivationReport({n: s[:3] for n, s in good.sums.items()}, good.counts[:3], "conv")
    neg_count = ClassActivationReport(dict(good.sums), np.array([1, -2, 3, 4]), "conv")
    neg_sums = ClassActivationReport({n: -s for n, s in good.sums.items()}, good.counts.copy(), "conv")
    return {
        "nan": (nan, "NaN"),
        "missing layer": (missing, "missing"),
        "wrong shape": (wrong_shape, "shape"),
        "wrong class count": (wrong_k, "shape"),
        "negative count": (neg_count, "non-negative"),
        "negative sums": (neg_sums, "non-negative"),
        "string": ("garbage", "str"),
        "none": (None, "NoneType"),
        "dict without keys": ({"junk": 1}, "missing key"),
        "dict with text sums": ({"hook_point": "conv", "sums": {"conv1": "abc"}, "counts": [1, 2, 3, 4]}, ""),
    }


@pytest.mark.parametrize("case", list(_bad_reports()))
def test_screen_rejects_bad_reports_with_a_reason_and_never_raises(case):
    report, fragment = _bad_reports()[case]
    reason = screen_report(report, EXPECTED, K)
    assert isinstance(reason, str) and reason
    assert fragment in reason


def test_screen_with_clip_bound_catches_inflated_values():
    rep = _honest_sites(1)[0]
    x1000 = ClassActivationReport({n: s * 1000 for n, s in rep.sums.items()}, rep.counts.copy(), "conv")
    assert screen_report(x1000, EXPECTED, K) is None  # finite, right shapes: validation alone cannot tell
    reason = screen_report(x1000, EXPECTED, K, clip_bound=2.0)
    assert reason is not None and "clip_bound" in reason and "did not clip" in reason


def test_screen_raises_for_server_configuration_errors():
    rep = _honest_sites(1)[0]
    with pytest.raises(ValueError, match="clip_bound"):
        screen_report(rep, EXPECTED, K, clip_bound=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        screen_report(rep, EXPECTED, 1)
