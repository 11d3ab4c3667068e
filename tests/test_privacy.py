"""Min-count, clipping and the Gaussian mechanism on activation uploads (nvflare_unlearn.protect.privacy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from nvflare_unlearn.method.activations import ClassActivationReport, validate_report
from nvflare_unlearn.protect.privacy import (
    BudgetExceeded,
    PrivacyLedger,
    analytic_gaussian_delta,
    apply_min_count,
    check_clip_bound,
    clip_activations,
    gaussian_noise,
    gaussian_sigma,
    privatize_report,
    sensitivity,
    site_ledger,
    split_budget,
    total_channels,
)


def _report(counts=(0, 2, 5, 40), channels=(3, 5), fill=0.5) -> ClassActivationReport:
    counts = np.asarray(counts, dtype=np.int64)
    sums = {f"conv{i}": np.full((len(counts), c), fill) * counts[:, None] for i, c in enumerate(channels)}
    return ClassActivationReport(sums=sums, counts=counts, hook_point="conv")


# ---------------------------------------------------------------- min count


def test_min_count_zeroes_small_classes_and_keeps_the_rest():
    rep = _report()
    out = apply_min_count(rep, 5)
    np.testing.assert_array_equal(out.counts, [0, 0, 5, 40])  # 2 < 5 dropped; 5 kept (>= min_count)
    for name, s in out.sums.items():
        np.testing.assert_array_equal(s[:2], 0.0)
        np.testing.assert_array_equal(s[2:], rep.sums[name][2:])
    assert out.hook_point == rep.hook_point and out.layer_order == rep.layer_order
    # the input is untouched (the site may still need it)
    np.testing.assert_array_equal(rep.counts, [0, 2, 5, 40])
    assert rep.sums["conv0"][1, 0] == 1.0
    validate_report(out, {"conv0": 3, "conv1": 5}, 4)


def test_min_count_zero_and_one_keep_everything():
    rep = _report()
    for m in (0, 1):
        out = apply_min_count(rep, m)
        np.testing.assert_array_equal(out.counts, rep.counts)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_min_count_rejects_non_integers(bad):
    with pytest.raises(ValueError, match="min_count"):
        apply_min_count(_report(), bad)


def test_min_count_rejects_non_reports():
    with pytest.raises(ValueError, match="ClassActivationReport"):
        apply_min_count({"counts": [1, 2]}, 2)


# ---------------------------------------------------------------- clipping


def test_clip_activations_numpy_and_torch():
    a = np.array([[-1.0, 0.5, 3.0]])
    np.testing.assert_array_equal(clip_activations(a, 2.0), [[0.0, 0.5, 2.0]])
    t = torch.tensor([[-1.0, 0.5, 3.0]])
    assert torch.equal(clip_activations(t, 2.0), torch.tensor([[0.0, 0.5, 2.0]]))
    for bad in (0, -1.0, math.inf, math.nan, "2", True):
        with pytest.raises(ValueError, match="clip_bound"):
            clip_activations(a, bad)


def test_check_clip_bound():
    rep = _report(fill=0.5)
    check_clip_bound(rep, 0.5)  # mean exactly at the bound is allowed
    # a sum exactly at the bound, rounded up by the float32 wire format, is still accepted
    at_bound = ClassActivationReport({"c": np.array([[0.1 * 3], [0.0]])}, np.array([3, 0]), "conv")
    wire = ClassActivationReport.from_dict({**at_bound.to_dict(), "sums": {"c": at_bound.sums["c"].astype(np.float32)}})
    assert wire.sums["c"][0, 0] > 0.1 * 3
    check_clip_bound(wire, 0.1)
    with pytest.raises(ValueError, match="classes \\[1, 2, 3\\].*per-image clipping"):
        check_clip_bound(rep, 0.4)
    zero_count_nonzero_sum = ClassActivationReport({"c": np.array([[1.0], [0.0]])}, np.array([0, 3]), "conv")
    with pytest.raises(ValueError, match="classes \\[0\\]"):
        check_clip_bound(zero_count_nonzero_sum, 10.0)
    neg = ClassActivationReport({"c": np.array([[-1.0], [0.0]])}, np.array([2, 3]), "conv")
    with pytest.raises(ValueError, match="negative"):
        check_clip_bound(neg, 10.0)


# ---------------------------------------------------------------- sensitivity and sigma


def test_sensitivity_formula():
    assert sensitivity(48, 2.0) == pytest.approx(2.0 * math.sqrt(48))
    assert sensitivity(48, 2.0, noise_counts=True) == pytest.approx(math.sqrt(4.0 * 48 + 1))
    assert total_channels(_report(channels=(16, 32, 64))) == 112
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_channels"):
            sensitivity(bad, 1.0)


def test_classic_sigma_formula_and_its_validity_range():
    s = gaussian_sigma(0.5, 1e-5, 3.0, method="classic")
    assert s == pytest.approx(math.sqrt(2 * math.log(1.25 / 1e-5)) * 3.0 / 0.5)
    with pytest.raises(ValueError, match="epsilon < 1"):
        gaussian_sigma(1.0, 1e-5, 3.0, method="classic")
    with pytest.raises(ValueError, match="unknown sigma method"):
        gaussian_sigma(0.5, 1e-5, 3.0, method="laplace")


@pytest.mark.parametrize("eps", [0.05, 0.5, 1.0, 4.0, 20.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-6])
def test_analytic_sigma_is_the_smallest_that_meets_delta(eps, delta):
    sens = 7.0
    sigma = gaussian_sigma(eps, delta, sens)

    # Balle & Wang (2018) Thm 8, evaluated independently with scipy
    def exact_delta(s):
        return norm.cdf(sens / (2 * s) - eps * s / sens) - math.exp(eps) * norm.cdf(-sens / (2 * s) - eps * s / sens)

    assert exact_delta(sigma) <= delta * (1 + 1e-6)
    assert exact_delta(sigma * 0.99) > delta  # tight: 1 % less noise breaks the guarantee
    assert analytic_gaussian_delta(sigma, eps, sens) == pytest.approx(exact_delta(sigma), rel=1e-6, abs=1e-15)
    if eps < 1:
        assert sigma < gaussian_sigma(eps, delta, sens, method="classic")


def test_sigma_scales_linearly_with_sensitivity_and_inf_means_no_noise():
    assert gaussian_sigma(1.0, 1e-5, 10.0) == pytest.approx(10 * gaussian_sigma(1.0, 1e-5, 1.0), rel=1e-9)
    assert gaussian_sigma(math.inf, 1e-5, 10.0) == 0.0


@pytest.mark.parametrize("eps, delta", [(0, 1e-5), (-1, 1e-5), (1, 0), (1, 1), (1, -0.1), ("1", 1e-5), (1, None)])
def test_bad_epsilon_delta(eps, delta):
    with pytest.raises(ValueError, match="epsilon|delta"):
        gaussian_sigma(eps, delta, 1.0)


def test_split_budget():
    assert split_budget(2.0, 1e-5, 4) == (0.5, 2.5e-6)
    assert split_budget(math.inf, 1e-5, 2) == (math.inf, 5e-6)
    with pytest.raises(ValueError, match="releases"):
        split_budget(1.0, 1e-5, 0)


# ---------------------------------------------------------------- the mechanism


def test_noise_has_the_calibrated_scale():
    # large counts keep every noised sum far from the post-processing clip, so the raw noise is observable
    counts = np.array([10**6, 10**6], dtype=np.int64)
    sums = {"a": np.full((2, 1000), 0.5e6), "b": np.full((2, 1500), 0.5e6)}
    rep = ClassActivationReport(sums=sums, counts=counts, hook_point="conv")
    bound, eps, delta = 1.0, 1.0, 1e-5
    out = gaussian_noise(rep, eps, delta, bound, np.random.default_rng(0))
    noise = np.concatenate([(out.sums[n] - sums[n]).ravel() for n in sums])
    sigma = gaussian_sigma(eps, delta, bound * math.sqrt(2500))
    assert noise.size == 5000
    assert abs(noise.mean()) < 4 * sigma / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(sigma, rel=0.05)  # sampling error of the std ~ 1 %
    np.testing.assert_array_equal(out.counts, counts)  # counts public by default


def test_noise_is_reproducible_and_keeps_the_report_valid():
    rep = _report(counts=(3, 8, 20, 40), fill=0.9)
    a = gaussian_noise(rep, 0.5, 1e-5, 1.0, np.random.default_rng(7))
    b = gaussian_noise(rep, 0.5, 1e-5, 1.0, np.random.default_rng(7))
    c = gaussian_noise(rep, 0.5, 1e-5, 1.0, np.random.default_rng(8))
    for n in rep.sums:
        np.testing.assert_array_equal(a.sums[n], b.sums[n])
        assert not np.array_equal(a.sums[n], c.sums[n])
        assert not np.array_equal(a.sums[n], rep.sums[n])
        # post-processing: inside [0, B * count], so the server's screen with the same bound accepts it
        assert np.all(a.sums[n] >= 0) and np.all(a.sums[n] <= 1.0 * a.counts[:, None])
    validate_report(a, {"conv0": 3, "conv1": 5}, 4)
    check_clip_bound(a, 1.0)
    assert a.layer_order == rep.layer_order


def test_noised_counts_are_non_negative_integers_and_change():
    rep = _report(counts=(3, 8, 20, 40), fill=0.005)  # small bound: count noise dominates the sensitivity
    out = gaussian_noise(rep, 1.0, 1e-5, 0.01, np.random.default_rng(1), noise_counts=True)
    assert out.counts.dtype == np.int64 and np.all(out.counts >= 0)
    assert not np.array_equal(out.counts, rep.counts)


def test_epsilon_inf_returns_an_unchanged_copy():
    rep = _report()
    out = gaussian_noise(rep, math.inf, 1e-5, 1.0, np.random.default_rng(0))
    assert out is not rep
    for n in rep.sums:
        np.testing.assert_array_equal(out.sums[n], rep.sums[n])
        assert out.sums[n] is not rep.sums[n]


def test_noise_refuses_unclipped_reports_and_bad_arguments():
    rep = _report(fill=0.5)
    with pytest.raises(ValueError, match="per-image clipping"):
        gaussian_noise(rep, 1.0, 1e-5, 0.25, np.random.default_rng(0))
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        gaussian_noise(rep, 1.0, 1e-5, 1.0, 42)
    with pytest.raises(ValueError, match="epsilon"):
        gaussian_noise(rep, 0.0, 1e-5, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="clip_bound"):
        gaussian_noise(rep, 1.0, 1e-5, -1.0, np.random.default_rng(0))


# ---------------------------------------------------------------- the site's ledger and the unit of privacy


def test_ledger_refuses_a_release_beyond_the_budget_and_records_before_releasing(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", 1.0, 1e-5)
    ledger.spend(0.5, 5e-6, model="m1", note="class 3")
    ledger.spend(0.5, 5e-6, model="m1", note="class 5")  # exactly the budget (float rounding tolerated)
    with pytest.raises(BudgetExceeded, match="would exceed the site's privacy budget"):
        ledger.spend(0.01, 1e-9, model="m1")
    assert ledger.spent() == pytest.approx((1.0, 1e-5))
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert [e["model"] for e in data["entries"]] == ["m1", "m1"] and data["budget"] == {"epsilon": 1.0, "delta": 1e-5}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # a later configuration cannot raise the budget the ledger holds; it can lower it
    with pytest.raises(BudgetExceeded):
        PrivacyLedger(tmp_path / "ledger.json", 100.0, 0.5).spend(0.1, 1e-9, model="m2")
    lowered = PrivacyLedger(tmp_path / "other.json", 1.0, 1e-5)
    lowered.spend(0.4, 1e-6, model="m")
    with pytest.raises(BudgetExceeded):
        PrivacyLedger(tmp_path / "other.json", 0.5, 1e-5).spend(0.2, 1e-6, model="m")


def test_an_unreadable_ledger_refuses_everything(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{truncated")
    with pytest.raises(BudgetExceeded, match="unreadable"):
        PrivacyLedger(path, 1.0, 1e-5).spend(0.1, 1e-7, model="m")
    path.write_text(json.dumps({"format": "other", "budget": {"epsilon": 1, "delta": 1e-5}, "entries": []}))
    with pytest.raises(BudgetExceeded, match="not a privacy ledger"):
        PrivacyLedger(path, 1.0, 1e-5).spend(0.1, 1e-7, model="m")
    with pytest.raises(ValueError):
        PrivacyLedger(path, math.inf, 1e-5)
    with pytest.raises(BudgetExceeded, match="without noise"):
        PrivacyLedger(tmp_path / "x.json", 1.0, 1e-5).spend(math.inf, 1e-7, model="m")


def _clipped_report(rng, counts=(6, 9, 12, 8), channels=(3, 5), bound=1.0):
    counts = np.asarray(counts, dtype=np.int64)
    sums = {f"conv{i}": rng.uniform(0, bound, size=(len(counts), c)) * counts[:, None] for i, c in enumerate(channels)}
    return ClassActivationReport(sums=sums, counts=counts, hook_point="conv")


def test_privatize_report_swap_within_class_keeps_counts_add_remove_noises_them(tmp_path):
    rng = np.random.default_rng(0)
    rep = _clipped_report(rng)
    swap = {"clip_bound": 1.0, "dp_epsilon": 2.0, "dp_delta": 1e-5, "min_count": 7}
    out, sigma = privatize_report(rep, swap, 2, np.random.default_rng(1))
    assert out.counts.tolist() == [0, 9, 12, 8]  # min-count on the exact counts, which are released as they are
    eps, delta = split_budget(2.0, 1e-5, 2)
    assert sigma == pytest.approx(gaussian_sigma(eps, delta, sensitivity(8, 1.0)))
    addrm = {**swap, "dp_unit": "add_remove_image", "min_count": 0}
    out, sigma = privatize_report(rep, addrm, 1, np.random.default_rng(2))
    assert out.counts.tolist() != rep.counts.tolist()
    assert sigma == pytest.approx(gaussian_sigma(2.0, 1e-5, sensitivity(8, 1.0, noise_counts=True)))
    ledger = site_ledger(swap, tmp_path / "l.json")
    privatize_report(rep, swap, 2, np.random.default_rng(3), ledger=ledger, model="m")
    privatize_report(rep, swap, 2, np.random.default_rng(4), ledger=ledger, model="m")  # both passes of a request
    with pytest.raises(BudgetExceeded):  # a third pass: beyond the default budget of one request
        privatize_report(rep, swap, 2, np.random.default_rng(5), ledger=ledger, model="m")
    clean, sigma = privatize_report(rep, {"min_count": 0}, 1, np.random.default_rng(6))
    assert sigma == 0.0 and site_ledger({}, tmp_path / "none.json") is None


def test_client_api_applies_the_same_privacy_and_needs_a_ledger(tmp_path):
    from nvflare.app_common.abstract.fl_model import FLModel

    from nvflare_unlearn.fl.client_api import activation_result
    from nvflare_unlearn.fl.defs import META_DP_SIGMA
    from nvflare_unlearn.models import build_model

    net = build_model("small_cnn", 10).eval()
    batch = [(torch.rand(30, 1, 8, 8), torch.arange(30) % 10)]
    dp = {"clip_bound": 0.5, "dp_epsilon": 1.0, "dp_delta": 1e-5}
    with pytest.raises(ValueError, match="ledger_path"):
        activation_result(net, batch, 10, privacy=dp)
    task = FLModel(params={}, meta={"forget_classes": [3]})
    out = activation_result(net, batch, 10, fl_model=task, privacy=dp, ledger_path=str(tmp_path / "l.json"))
    assert out.meta[META_DP_SIGMA] > 0 and out.params["counts"].tolist() == [3] * 10
    with pytest.raises(BudgetExceeded):
        activation_result(net, batch, 10, fl_model=task, privacy=dp, ledger_path=str(tmp_path / "l.json"))
