"""The NVFlare controller applies exactly the protections the benchmark measures (protect.robust), and they hold
against the attacks of issue 11: a site claiming 10^12 training steps or boosting its update, a site reporting
``total[3] = 10^9, correct = 0`` in the federated evaluation. No simulator: the controller's two methods are called
with the FLModels NVFlare would hand them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from nvflare_unlearn.evaluation import train_epochs
from nvflare_unlearn.fl.defs import METRIC_CORRECT, METRIC_TOTAL
from nvflare_unlearn.fl.fedavg_eval_controller import FedAvgEvalController
from nvflare_unlearn.fl.model_state import state_to_numpy
from nvflare_unlearn.models import build_model
from nvflare_unlearn.options import SecurityOptions
from nvflare_unlearn.protect.robust import aggregate_updates, robust_evaluation, size_caps
from nvflare_unlearn.runtime.batches import TensorBatches

pytestmark = pytest.mark.usefixtures("one_torch_thread")
K = 10


def _controller(**security) -> FedAvgEvalController:
    ctrl = FedAvgEvalController("small_cnn", K, forget_classes=[3], security=security or None)
    ctrl.track = lambda *a, **k: None  # experiment tracking needs a running job
    ctrl.quorum = lambda phase: 1  # no engine here: the quorum rule has its own tests (test_fl_runtime)
    return ctrl


def _site_models(n: int = 10, seed: int = 0):
    """(global weights, [each site's weights after a few local steps on its own random batch])."""
    torch.manual_seed(seed)
    net = build_model("small_cnn", K)
    base = state_to_numpy(net)
    out = []
    for s in range(n):
        local = copy.deepcopy(net)
        g = torch.Generator().manual_seed(100 + s)
        x, y = torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, K, (32,), generator=g)
        train_epochs(local, TensorBatches(x, y, 16), 1, 0.05)
        out.append(state_to_numpy(local))
    return base, out


def _result(params, site, steps):
    return FLModel(
        params_type=ParamsType.FULL,
        params=params,
        meta={"client_name": site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps},
    )


def _dist(a, b) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(a[k], float) - np.asarray(b[k], float)) ** 2) for k in a)))


def test_fedavg_applies_aggregate_updates_with_capped_weights():
    base, sites = _site_models()
    boosted = {
        k: (base[k] + 100 * (v - base[k])).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in sites[0].items()
    }
    claimed = [1e12] + [32.0] * 9  # site-1 claims 10^12 steps and boosts its update x100
    results = [_result(boosted if i == 0 else p, f"site-{i + 1}", w) for i, (p, w) in enumerate(zip(sites, claimed))]
    for security in ({}, {"update_aggregation": "mean"}, {"update_aggregation": "trimmed_mean", "update_trim": 0.2}):
        ctrl = _controller(**security)
        ctrl._round_base = base
        got = ctrl._fedavg(results).params
        sec = SecurityOptions.from_dict(security)
        caps = size_caps({f"site-{i + 1}": w for i, w in enumerate(claimed)}, None, sec.size_cap_factor)
        weights = [min(w, caps[f"site-{i + 1}"]) for i, w in enumerate(claimed)]
        want, info = aggregate_updates(
            base,
            [boosted] + sites[1:],
            weights,
            sec.update_aggregation,
            sec.update_trim,
            sec.update_clip,
            sec.update_outlier,
        )
        for k in want:  # the NVFlare path is the measured function, exactly
            np.testing.assert_array_equal(got[k], want[k])
        assert weights[0] == 64.0 and ctrl._last_aggregation["capped"] == ["site-1"]
        assert "site-1" in ctrl._last_aggregation["clipped"] and "site-1" in ctrl._last_aggregation["left_out"]
        honest, _ = aggregate_updates(base, sites[1:], [32.0] * 9, sec.update_aggregation, sec.update_trim, None, None)
        # the attacker moved the model no further than the honest sites' own spread
        assert _dist(got, honest) < max(_dist(s, honest) for s in sites[1:])
    # what NVFlare's weighted average did before: the global model became the attacker's
    plain, _ = aggregate_updates(base, [boosted] + sites[1:], claimed, "mean", 0.0, None, None)
    assert _dist(plain, boosted) < 1e-3 * _dist(boosted, base)


def test_fedavg_leaves_out_malformed_and_zero_weight_sites():
    base, sites = _site_models(4)
    bad_shape = dict(sites[1])
    bad_shape["fc.weight"] = np.zeros((3, 3), dtype=np.float32)
    nan = {k: v.copy() for k, v in sites[2].items()}
    nan["fc.bias"][0] = np.nan
    ctrl = _controller()
    ctrl._round_base = base
    results = [_result(sites[0], "site-1", 32), _result(bad_shape, "site-2", 32), _result(nan, "site-3", 32)]
    results.append(_result(sites[3], "site-4", 0))  # trained on nothing
    out = ctrl._fedavg(results)
    assert out.meta["nr_aggregated"] == 1
    assert sorted(ctrl._last_aggregation["dropped"]) == ["site-2", "site-3"]
    assert (
        "shape" in ctrl._last_aggregation["dropped"]["site-2"] and "NaN" in ctrl._last_aggregation["dropped"]["site-3"]
    )


def _eval_results(per_site: dict[str, tuple[list, list]]):
    return [
        FLModel(metrics={METRIC_CORRECT: c, METRIC_TOTAL: t}, meta={"client_name": s}) for s, (c, t) in per_site.items()
    ]


def _honest_counts(rng, n_sites=10, u_correct=True):
    out = {}
    for s in range(n_sites):
        total = rng.integers(3, 7, size=K)
        correct = np.where(np.arange(K) == 3, total if u_correct else 0, np.maximum(total - rng.integers(0, 2, K), 0))
        out[f"site-{s + 1}"] = (correct.tolist(), total.tolist())
    return out


def test_evaluation_resists_an_inflated_total_and_keeps_every_sites_result():
    rng = np.random.default_rng(0)
    honest = _honest_counts(rng)
    ctrl = _controller()
    ctrl.send_to_sites = lambda task, model: _eval_results(honest)
    clean = ctrl.evaluate(None, "original", 0)
    assert clean["u_acc"] == 1.0 and clean["flagged"] == {}
    assert sorted(clean["per_site"]) == sorted(honest) and clean["per_site"]["site-1"]["u_acc"] == 1.0
    correct = sum(np.asarray(c) for c, _ in honest.values())
    total = sum(np.asarray(t) for _, t in honest.values())
    r = np.arange(K) != 3
    # honest sites under their caps, none flagged: exactly the plain pooled accuracy (no cost on an honest run)
    assert clean["r_acc"] == pytest.approx(correct[r].sum() / total[r].sum(), abs=1e-12)
    attacked = dict(honest)
    c, t = (list(v) for v in honest["site-3"])
    c[3], t[3] = 0, 10**9  # the attack
    attacked["site-3"] = (c, t)
    ctrl.send_to_sites = lambda task, model: _eval_results(attacked)
    got = ctrl.evaluate(None, "original", 0)
    assert got["u_acc"] == 1.0, got  # was 4e-7
    assert list(got["flagged"]) == ["site-3"] and got["per_site"]["site-3"]["capped"]
    assert got["per_site"]["site-3"]["u_acc"] == 0.0 and "site-3" not in got["sites"]
    # the controller's numbers are the measured function's
    ref = robust_evaluation(
        {s: np.asarray(v[0], float) for s, v in attacked.items()},
        {s: np.asarray(v[1], float) for s, v in attacked.items()},
        [3],
        size_caps({s: float(np.sum(v[1])) for s, v in attacked.items()}, None, 2.0),
        SecurityOptions().eval_outlier_tol,
    )
    assert got["u_acc"] == ref["u_acc"] and got["r_acc"] == pytest.approx(ref["r_acc"])


def test_declared_test_sizes_cap_a_site():
    rng = np.random.default_rng(1)
    counts = _honest_counts(rng, 3)
    c, t = counts["site-2"]
    counts["site-2"] = ([v * 1000 for v in c], [v * 1000 for v in t])  # same accuracy, 1000x the images
    ctrl = _controller(site_test_sizes={"site-1": 60, "site-2": 60, "site-3": 60})
    ctrl.send_to_sites = lambda task, model: _eval_results(counts)
    got = ctrl.evaluate(None, "pruned", 0)
    assert got["per_site"]["site-2"]["capped"] and got["per_site"]["site-2"]["weight"] == pytest.approx(60)
    assert sum(got["total"]) <= 3 * 60 + 1e-6


def test_malformed_evaluation_counts_are_ignored():
    rng = np.random.default_rng(2)
    counts = _honest_counts(rng, 3)
    results = _eval_results(counts)
    results.append(FLModel(metrics={METRIC_CORRECT: [5] * K, METRIC_TOTAL: [1] * K}, meta={"client_name": "site-9"}))
    results.append(FLModel(metrics={METRIC_CORRECT: "x", METRIC_TOTAL: None}, meta={"client_name": "site-8"}))
    results.append(FLModel(metrics={METRIC_CORRECT: [0.5] * K, METRIC_TOTAL: [1] * K}, meta={"client_name": "site-7"}))
    ctrl = _controller()
    ctrl.send_to_sites = lambda task, model: results
    got = ctrl.evaluate(None, "pruned", 0)
    assert sorted(got["malformed"]) == ["site-7", "site-8", "site-9"] and len(got["sites"]) == 3


# ----------------------------------------------------------------------------------------------- activation phase
def _crafted(report, forget: int, clip: float, count_factor: int):
    """Issue 11's attack: class means inside [0, clip], the forget-class row set to the bound on the half of each
    layer this site scores lowest (0 elsewhere), counts x ``count_factor``."""
    from nvflare_unlearn.method.activations import ClassActivationReport
    from nvflare_unlearn.method.tfidf import tfidf_scores

    means = report.means()
    counts = np.asarray(report.counts, dtype=np.int64) * count_factor
    sums = {}
    for name, sc in tfidf_scores(means, forget).items():
        m = np.array(means[name], dtype=np.float64)
        order = np.argsort(sc, kind="stable")
        m[forget, order[: len(sc) // 2]], m[forget, order[len(sc) // 2 :]] = clip, 0.0
        sums[name] = m * counts[:, None]
    return ClassActivationReport(sums, counts, report.hook_point, list(report.layer_order))


@pytest.mark.parametrize("n_bad", [1, 2])
def test_activation_aggregator_defaults_hold_against_crafted_reports_with_inflated_counts(n_bad):
    from core_helpers import digits_tensors, trained_digits_cnn

    from nvflare_unlearn.data import partition_iid
    from nvflare_unlearn.fl.aggregator import ActivationAggregator
    from nvflare_unlearn.method.activations import collect_class_activations
    from nvflare_unlearn.method.graph import conv_channels
    from nvflare_unlearn.method.selection import build_pruning_plan
    from nvflare_unlearn.method.tfidf import tfidf_scores

    clip, ratio = 2.0, 0.3
    model = trained_digits_cnn()
    xtr, ytr, _, _ = digits_tensors()
    parts = partition_iid(ytr.numpy(), 10, seed=0)
    reports = [collect_class_activations(model, [(xtr[p], ytr[p])], K, clip=clip) for p in parts]

    def plan_units(agg_kwargs, sent, forget):
        agg = ActivationAggregator(K, clip_bound=clip, **agg_kwargs)
        agg.set_expected_layers(conv_channels(model))
        for i, rep in enumerate(sent):
            assert agg.accept_model(FLModel(params=rep.to_dict(), meta={"client_name": f"site-{i + 1}"}))
        plan = build_pruning_plan(model, tfidf_scores(agg.aggregate_model().params, forget), ratio)
        return {(k, i) for k, v in plan.pruned_units().items() for i in v}

    def jaccard(a, b):
        return len(a & b) / len(a | b)

    for forget in (3,):  # (the benchmark runs all ten classes)
        honest = plan_units({"aggregation": "mean"}, reports, forget)
        sent = [_crafted(r, forget, clip, 10**6) if i < n_bad else r for i, r in enumerate(reports)]
        default = plan_units({}, sent, forget)  # median of capped reports: passes the clip screen, steers nothing
        assert jaccard(default, honest) >= 0.9, (forget, jaccard(default, honest))
        before = plan_units({"aggregation": "mean", "size_cap_factor": 1e9}, sent, forget)  # exact mean, no cap
        assert jaccard(before, honest) < 0.5  # what the attack did to the old default
