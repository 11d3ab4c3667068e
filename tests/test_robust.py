"""Robust aggregation of activation reports and per-site screening (nvflare_unlearn.protect.robust)."""

from __future__ import annotations

import numpy as np
import pytest

from nvflare_unlearn.method.activations import ClassActivationReport, merge_reports
from nvflare_unlearn.protect.robust import (
    aggregate_class_means,
    aggregate_updates,
    cap_report,
    low_median,
    robust_evaluation,
    screen_report,
    screen_update,
    size_caps,
)

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


# ------------------------------------------------------------------------------------------------ issue 11: caps


def test_low_median_and_size_caps():
    assert low_median([5, 1, 3]) == 3 and low_median([1, 1e12]) == 1  # two sites: one cannot double the reference
    assert low_median([10, 10, 10, 10, 1e9, 1e9]) == 10
    caps = size_caps({"a": 100, "b": 120, "c": 1e12}, None, 2.0)
    assert caps == {"a": 240.0, "b": 240.0, "c": 240.0}
    assert size_caps({"a": 100, "c": 1e12}, {"c": 50}, 2.0) == {"a": 200.0, "c": 50.0}  # the admin's table wins
    with pytest.raises(ValueError, match="factor"):
        size_caps({"a": 1}, None, 0)
    with pytest.raises(ValueError):
        low_median([])


def test_cap_report_keeps_means_and_limits_weight():
    rep = _report({"conv1": np.ones((K, 3)) * 0.5, "conv2": np.ones((K, 2))}, [10**6, 10**6, 0, 10**6])
    capped, was = cap_report(rep, 300)
    assert was and int(capped.counts.sum()) <= 300 and capped.counts[2] == 0
    for name in EXPECTED:
        means = capped.means()[name]
        np.testing.assert_allclose(means[[0, 1, 3]], rep.means()[name][[0, 1, 3]])
    same, was = cap_report(rep, 10**7)
    assert same is rep and not was


def test_counts_x1e6_do_not_buy_weight_in_the_capped_mean():
    """The issue's count attack: same class means, counts x 10^6. Exact mean: the site's means; capped: ~1/10."""
    sites = _honest_sites(10)
    liar = sites[0]
    means = {n: liar.means()[n] + 3.0 for n in EXPECTED}  # a site whose means differ by +3 everywhere
    sites[0] = _report(means, liar.counts * 10**6)
    uncapped = aggregate_class_means(sites, "mean")
    caps = size_caps({str(i): float(r.counts.sum()) for i, r in enumerate(sites)}, None, 2.0)
    capped = aggregate_class_means([cap_report(r, caps[str(i)])[0] for i, r in enumerate(sites)], "mean")
    honest = aggregate_class_means(sites[1:], "mean")
    for name in EXPECTED:
        assert np.all(uncapped[name] - honest[name] > 2.9)  # the liar's means took over
        assert np.all(capped[name] - honest[name] < 3.0 * 2 * 50 / (9 * 5 + 2 * 50) + 0.1)  # weight <= 2 sites'


def _updates(n=10, seed=0, size=50):
    rng = np.random.default_rng(seed)
    base = {"w": rng.normal(size=size).astype(np.float32), "n": np.array(7, dtype=np.int64)}
    sites = [
        {"w": (base["w"] + rng.normal(0.1, 0.01, size=size)).astype(np.float32), "n": np.array(9, dtype=np.int64)}
        for _ in range(n)
    ]
    return base, sites


@pytest.mark.parametrize("aggregation", ["mean", "median", "trimmed_mean"])
def test_update_clipping_and_outlier_filter_bound_a_boosted_site(aggregation):
    base, sites = _updates()
    sites[0] = {"w": base["w"] + 100.0 * (sites[0]["w"] - base["w"]), "n": sites[0]["n"]}
    out, info = aggregate_updates(base, sites, [1.0] * 10, aggregation, 0.2, clip=2.0, outlier=2.0)
    assert 0 in info["clipped"] and info["left_out"] == [0]
    honest = np.stack([s["w"] for s in sites[1:]])
    assert np.all(out["w"] >= honest.min(0) - 1e-6) and np.all(out["w"] <= honest.max(0) + 1e-6)
    assert out["n"] == 9 and out["n"].dtype == np.int64 and out["w"].dtype == np.float32
    plain, info = aggregate_updates(base, sites, [1.0] * 10, "mean", clip=None, outlier=None)
    assert info["clipped"] == [] and np.all(plain["w"] > honest.max(0))  # unprotected: one site moves it out


def test_weighted_mean_without_protection_is_fedavg():
    base, sites = _updates(3)
    out, _ = aggregate_updates(base, sites, [1.0, 2.0, 7.0], "mean", clip=None, outlier=None)
    want = (1 * sites[0]["w"].astype(float) + 2 * sites[1]["w"] + 7 * sites[2]["w"]) / 10
    np.testing.assert_allclose(out["w"], want, rtol=1e-6)


def test_aggregate_updates_rejects_bad_input():
    base, sites = _updates(3)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_updates(base, sites, [1, 1, 1], "max")
    with pytest.raises(ValueError, match="weight"):
        aggregate_updates(base, sites, [1, 1], "mean")
    with pytest.raises(ValueError, match="weight"):
        aggregate_updates(base, sites, [0, 0, 0], "mean")
    with pytest.raises(ValueError, match="clip"):
        aggregate_updates(base, sites, [1, 1, 1], clip=-1)
    bad = {"w": np.zeros(3, dtype=np.float32), "n": base["n"]}
    with pytest.raises(ValueError, match="screen_update"):
        aggregate_updates(base, [bad, *sites], [1, 1, 1, 1])
    assert "shape" in screen_update(base, bad)
    assert "NaN" in screen_update(base, {"w": np.full(50, np.nan), "n": base["n"]})
    assert "keys" in screen_update(base, {"w": base["w"]}) and "dict" in screen_update(base, [1, 2])
    assert screen_update(base, sites[0]) is None


def _eval_sites(n, u_acc=1.0, seed=0):
    rng = np.random.default_rng(seed)
    correct, total = {}, {}
    for s in range(n):
        t = rng.integers(4, 6, size=K).astype(float)
        c = t.copy()
        c[1] = np.round(u_acc * t[1])
        correct[f"s{s}"], total[f"s{s}"] = c, t
    return correct, total


def test_robust_evaluation_equals_pooled_on_honest_sites_and_flags_a_faker():
    correct, total = _eval_sites(10)
    caps = size_caps({s: t.sum() for s, t in total.items()}, None, 2.0)
    got = robust_evaluation(correct, total, [1], caps, 0.1)
    assert got["u_acc"] == 1.0 and got["flagged"] == {} and got["acc"] == 1.0
    correct["s0"][1], total["s0"][1] = 0.0, 1e9  # issue 11's evaluation attack
    caps = size_caps({s: t.sum() for s, t in total.items()}, None, 2.0)
    got = robust_evaluation(correct, total, [1], caps, 0.1)
    assert got["u_acc"] == 1.0 and list(got["flagged"]) == ["s0"] and got["per_site"]["s0"]["capped"]
    plain = robust_evaluation(correct, total, [1], {s: np.inf for s in total}, np.inf, np.inf)
    assert plain["u_acc"] < 1e-6  # the plain pooled sums: what the record used to say
    with pytest.raises(ValueError, match="same"):
        robust_evaluation(correct, {}, [1], caps)


def test_robust_evaluation_tolerates_binomial_noise_of_small_sites():
    """Honest sites with 4 to 5 U images each and 90 % accuracy: nobody is flagged for being unlucky."""
    rng = np.random.default_rng(3)
    correct, total = {}, {}
    for s in range(10):
        t = rng.integers(4, 6, size=K).astype(float)
        correct[f"s{s}"], total[f"s{s}"] = rng.binomial(t.astype(int), 0.9).astype(float), t
    got = robust_evaluation(correct, total, [1], size_caps({s: t.sum() for s, t in total.items()}), 0.1)
    assert got["flagged"] == {}
