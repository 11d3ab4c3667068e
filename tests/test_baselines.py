"""Baselines and the in-process FedAvg simulator on digits + the small CNN: each changes what it should."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from nvflare_unlearn.data import digits_dataset, partition_biased
from nvflare_unlearn.evaluation import TensorBatches, accuracy_report, as_tensors
from nvflare_unlearn.evaluation.baselines import (
    PruneOptions,
    federated_fisher,
    fisher_noise,
    prepare_method,
    reset_classifier_rows,
    site_fisher_diagonal,
)
from nvflare_unlearn.evaluation.fedsim import (
    CostMeter,
    FedConfig,
    Federation,
    federated_activation_report,
    run_fedavg,
    state_bytes,
)
from nvflare_unlearn.method.activations import collect_class_activations
from nvflare_unlearn.method.unlearning import deep_layers
from nvflare_unlearn.models import build_model
from nvflare_unlearn.options import PlanOptions

FORGET = 9


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    """4 biased sites over digits, and a model pretrained on them with FedAvg (shared, never modified)."""
    torch.manual_seed(0)
    train, test = digits_dataset("train"), digits_dataset("test")
    x, y = as_tensors(train)
    fed = Federation(x, y, partition_biased(y.numpy(), 4, 0.3, seed=0), 10)
    model = build_model("small_cnn", 10)
    run_fedavg(model, fed, FedConfig(rounds=12, clients_per_round=4, lr=0.05, batch_size=32))
    return fed, model, test


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ fedsim
def test_fedavg_learns_and_counts_bytes(setup):
    fed, model, test = setup
    assert accuracy_report(model, test, 10, [FORGET])["r_acc"] > 0.85
    m = build_model("small_cnn", 10)
    meter = CostMeter()
    hist = run_fedavg(m, fed, FedConfig(rounds=2, clients_per_round=3, lr=0.05), meter=meter)
    assert [h["round"] for h in hist] == [1, 2] and meter.rounds == 2
    assert meter.bytes_down == meter.bytes_up == 2 * 3 * state_bytes(m)
    assert meter.wall_s["train"] > 0


def test_fedavg_stops_when_told_and_keeps_the_full_schedule(setup):
    """stop_fn ends training after the round it accepts; the lr of the rounds run follows cfg.rounds' cosine."""
    fed, _, test = setup
    cfg = FedConfig(rounds=6, clients_per_round=2, lr=0.05)
    full = run_fedavg(build_model("small_cnn", 10), fed, cfg)
    seen: list[int] = []

    def stop(rec):
        seen.append(rec["round"])
        return rec["r_acc"] >= 0.0 and rec["round"] == 2

    hist = run_fedavg(
        build_model("small_cnn", 10),
        fed,
        cfg,
        stop_fn=stop,
        eval_fn=lambda m, r: accuracy_report(m, test, 10, [FORGET]),
    )
    assert [h["round"] for h in hist] == [1, 2] and seen == [1, 2]
    assert [h["lr"] for h in hist] == [h["lr"] for h in full[:2]]


def test_client_sampling_depends_only_on_seed_and_round(setup):
    fed, _, _ = setup
    a = [fed.sample_sites(r, 2, seed=3) for r in range(5)]
    assert a == [fed.sample_sites(r, 2, seed=3) for r in range(5)]
    assert all(len(set(s)) == 2 and all(0 <= i < 4 for i in s) for s in a)
    assert len({tuple(s) for s in a}) > 1  # rounds differ


def test_sites_drop_forget_classes(setup):
    fed, _, _ = setup
    for s in range(fed.num_sites):
        _, ys = fed.site_tensors(s, [FORGET])
        assert FORGET not in ys.tolist()
    total = sum(fed.site_indices(s).size for s in range(fed.num_sites))
    assert total == fed.x.shape[0]


def test_federated_activation_report_equals_pooled_statistics(setup):
    """Per-site sums + counts merged on the server = statistics over the sites' pooled data (exact mean)."""
    fed, model, _ = setup
    sites = [0, 2, 3]
    meter = CostMeter()
    merged = federated_activation_report(model, fed, sites, meter=meter)
    idx = np.concatenate([fed.site_indices(s) for s in sites])
    pooled = collect_class_activations(model, TensorBatches(fed.x[idx], fed.y[idx], 97), 10)
    for name in pooled.sums:  # sites upload float32 sums: equal up to single precision
        np.testing.assert_allclose(merged.means()[name], pooled.means()[name], rtol=1e-6, atol=1e-9)
    wire_bytes = sum(4 * a.size for a in merged.sums.values()) + merged.counts.nbytes
    assert meter.bytes_up == 3 * wire_bytes


# --------------------------------------------------------------------------------------------- baselines
def test_finetune_only_starts_from_an_untouched_copy(setup):
    fed, model, _ = setup
    before = _state(model)
    prep = prepare_method("finetune", model, fed, [FORGET], [0, 1], CostMeter())
    assert prep.model is not model and _same(_state(prep.model), before)
    run_fedavg(prep.model, fed, FedConfig(rounds=1, clients_per_round=2, lr=0.02), drop_classes=[FORGET])
    assert not _same(_state(prep.model), before) and _same(_state(model), before)


def test_row_reset_changes_only_the_forget_rows(setup):
    fed, model, test = setup
    reset = reset_classifier_rows(copy.deepcopy(model), [FORGET], seed=0)
    a, b = _state(model), _state(reset)
    for k in a:
        if k in ("fc.weight", "fc.bias"):
            keep = [c for c in range(10) if c != FORGET]
            assert torch.equal(a[k][keep], b[k][keep]) and not torch.equal(a[k][FORGET], b[k][FORGET])
        else:
            assert torch.equal(a[k], b[k])
    assert accuracy_report(reset, test, 10, [FORGET])["u_acc"] < accuracy_report(model, test, 10, [FORGET])["u_acc"]


def test_fisher_is_additive_across_sites(setup):
    """Summing per-site Fisher sums is the Fisher of the pooled data (the federated estimate is exact)."""
    fed, model, _ = setup
    x0, y0 = fed.site_tensors(0, [FORGET])
    x1, y1 = fed.site_tensors(1, [FORGET])
    s0, n0 = site_fisher_diagonal(model, x0, y0)
    s1, n1 = site_fisher_diagonal(model, x1, y1)
    sp, npool = site_fisher_diagonal(model, torch.cat([x0, x1]), torch.cat([y0, y1]))
    assert n0 + n1 == npool
    for k in sp:
        torch.testing.assert_close(s0[k] + s1[k], sp[k], rtol=1e-4, atol=1e-7)
        assert (sp[k] >= 0).all()


def test_federated_fisher_and_noise_move_weights_where_fisher_is_small(setup):
    fed, model, _ = setup
    meter = CostMeter()
    fisher = federated_fisher(model, fed, [0, 1], [FORGET], images_per_site=40, meter=meter)
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in fisher.values())
    assert meter.bytes_up > 0 and meter.wall_s["fisher"] > 0
    # a synthetic Fisher: huge for fc.weight (keep it), tiny elsewhere (move it)
    fake = {n: torch.full_like(p, 1e6 if n == "fc.weight" else 0.0) for n, p in model.named_parameters()}
    noised = fisher_noise(copy.deepcopy(model), fake, alpha=1e-4, seed=0)
    d = {n: (p - q).abs().max().item() for (n, p), (_, q) in zip(noised.named_parameters(), model.named_parameters())}
    assert d["fc.weight"] < 1e-4 and d["features.0.weight"] > 1e-2
    with pytest.raises(ValueError, match="alpha"):
        fisher_noise(model, fisher, alpha=0.0)


def test_prune_removes_channels_with_federated_statistics(setup):
    fed, model, test = setup
    before = _state(model)
    meter = CostMeter()
    prep = prepare_method(
        "prune", model, fed, [FORGET], [0, 1, 2], meter, prune_opts=PruneOptions(plan=PlanOptions(prune_ratio=0.1))
    )
    n0 = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in prep.model.parameters()) < n0
    assert _same(_state(model), before)
    assert prep.info["plan"]["steps"][0]["forget_class"] == FORGET
    assert meter.wall_s["activation"] > 0 and meter.bytes_up > 0
    acc = accuracy_report(prep.model, test, 10, [FORGET])
    assert acc["u_acc"] < accuracy_report(model, test, 10, [FORGET])["u_acc"]


def _prepare_pruning(setup, method: str, ratio: float):
    """``method``'s preparation of the shared model at prune ratio ``ratio``, statistics from sites 0-2."""
    fed, model, _ = setup
    opts = PruneOptions(plan=PlanOptions(prune_ratio=ratio))
    return prepare_method(method, model, fed, [FORGET], [0, 1, 2], CostMeter(), prune_opts=opts)


def test_prune_reinit_keeps_shapes_and_redraws_the_chosen_filters(setup):
    fed, model, _ = setup
    prep = _prepare_pruning(setup, "prune_reinit", 0.1)
    a, b = _state(model), _state(prep.model)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    pruned = {}
    for key, idx in prep.info["plan"]["steps"][0]["pruned"].items():
        pruned[key] = idx
    assert pruned
    for conv, idx in pruned.items():
        w_old, w_new = a[conv + ".weight"], b[conv + ".weight"]
        assert not torch.equal(w_old[idx], w_new[idx])
        keep = [c for c in range(w_old.shape[0]) if c not in idx]
        changed = w_old[keep] != w_new[keep]  # kept filters change only where a pruned input was silenced
        assert (w_new[keep][changed] == 0).all()


def test_prune_deep_only_touches_deep_layers(setup):
    fed, model, _ = setup
    prep = _prepare_pruning(setup, "prune_deep", 0.05)
    deep = set(deep_layers(model, 1.0 / 3.0))
    touched = set(prep.info["plan"]["steps"][0]["pruned"])
    assert touched and touched <= deep


def test_retrain_needs_a_fresh_model(setup):
    fed, model, _ = setup
    with pytest.raises(ValueError, match="fresh_model"):
        prepare_method("retrain", model, fed, [FORGET], [0], CostMeter())
    with pytest.raises(ValueError, match="unknown method"):
        prepare_method("magic", model, fed, [FORGET], [0], CostMeter())


def test_fisher_method_runs_end_to_end(setup):
    fed, model, test = setup
    meter = CostMeter()
    prep = prepare_method("fisher", model, fed, [FORGET], [0, 1], meter, fisher_alpha=1e-5, fisher_images_per_site=50)
    assert not _same(_state(prep.model), _state(model))
    run_fedavg(prep.model, fed, FedConfig(rounds=1, clients_per_round=2, lr=0.02), drop_classes=[FORGET], meter=meter)
    assert meter.rounds == 1 and "fisher" in meter.wall_s
    assert isinstance(prep.model, nn.Module) and accuracy_report(prep.model, test, 10, [FORGET])["r_acc"] > 0.5
