"""Applying plans: physical removal of coupled groups, exact replay on fresh models, and mask mode."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from core_helpers import randomize_bn

from nvflare_unlearn.method.graph import conv_channels, coupled_groups
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.method.prune import apply_pruning_plan, enforce_masks, masked_plan, plan_summary
from nvflare_unlearn.method.selection import build_pruning_plan
from nvflare_unlearn.models import build_model, example_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plan_targeting(model, group_key, channels, ratio_units):
    """Scores that make ``channels`` of the group keyed ``group_key`` the top units, on purpose."""
    scores = {n: np.zeros(c) for n, c in conv_channels(model).items()}
    for c in channels:
        scores[group_key][c] = 1.0
    total = sum(conv_channels(model)[g[0]] for g in coupled_groups(model))
    return build_pruning_plan(model, scores, ratio_units / total)


@pytest.mark.parametrize("name, key", [("resnet20", "layer2.0.conv2"), ("resnet56", "layer3.0.conv2")])
def test_coupled_group_of_a_resnet_is_pruned_on_purpose(name, key):
    model = randomize_bn(build_model(name, 10))
    params_before = sum(p.numel() for p in model.parameters())
    plan = _plan_targeting(model, key, [1, 4, 9], 3)
    assert plan.steps[0]["pruned"] == {key: [1, 4, 9]}
    group = next(g for g in plan.groups if g[0] == key)
    assert len(group) == 1 + (3 if name == "resnet20" else 9)  # every conv2 of the stage + the 1x1 downsample
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in group}
    apply_pruning_plan(model, plan)
    modules = dict(model.named_modules())
    keep = [c for c in range(plan.convs[key]) if c not in (1, 4, 9)]
    for n in group:  # all members lost the same ORIGINAL channels, the survivors are untouched
        assert modules[n].out_channels == plan.convs[key] - 3
        assert torch.equal(modules[n].weight, original[n][keep])
    stage = key.split(".")[0]
    for i, block in enumerate(getattr(model, stage)):  # BNs and next-block inputs follow
        assert block.bn2.num_features == plan.convs[key] - 3
        if i + 1 < len(getattr(model, stage)):
            assert getattr(model, stage)[i + 1].conv1.in_channels == plan.convs[key] - 3
    with torch.no_grad():
        assert model(example_input(model, 2)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert model.fc.out_features == 10  # the classifier keeps every class


def test_vgg11_pruning_drops_params_and_flops():
    model = randomize_bn(build_model("vgg11", 10))
    rng = np.random.default_rng(0)
    plan = build_pruning_plan(model, {n: rng.random(c) for n, c in conv_channels(model).items()}, 0.15)
    summary = plan_summary(plan, model)
    apply_pruning_plan(model, plan)
    assert conv_channels(model) == plan.widths()
    assert model.classifier.in_features == plan.widths()["features.25"]
    assert summary["params_after"] == sum(p.numel() for p in model.parameters()) < summary["params_before"]
    assert summary["flops_after"] < summary["flops_before"]
    with torch.no_grad():
        assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("name", ["resnet20", "vgg11", "small_cnn"])
def test_replay_on_fresh_model_gives_identical_architecture_and_outputs(name):
    model = randomize_bn(build_model(name, 10), seed=1)
    rng = np.random.default_rng(5)
    plan = build_pruning_plan(model, {n: rng.random(c) for n, c in conv_channels(model).items()}, 0.2)
    apply_pruning_plan(model, plan)
    text = plan.to_json()

    fresh = build_model(name, 10)
    returned = apply_pruning_plan(fresh, PruningPlan.from_json(text))
    assert returned is fresh  # in place
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    x = torch.rand(4, *example_input(name).shape[1:])
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    apply_pruning_plan(fresh, plan)  # already fully applied: a no-op
    assert conv_channels(fresh) == conv_channels(model)


def test_applying_a_composed_plan_after_its_first_step():
    model = build_model("resnet20", 10)
    rng = np.random.default_rng(6)
    p1 = build_pruning_plan(model, {n: rng.random(c) for n, c in conv_channels(model).items()}, 0.1, forget_class=0)
    stepwise = apply_pruning_plan(copy.deepcopy(model), p1)
    p2 = build_pruning_plan(
        stepwise, {n: rng.random(c) for n, c in conv_channels(stepwise).items()}, 0.1, forget_class=1, base_plan=p1
    )
    apply_pruning_plan(stepwise, p2)  # detects that step 1 is done and applies step 2 only
    at_once = apply_pruning_plan(copy.deepcopy(model), p2)
    assert conv_channels(stepwise) == conv_channels(at_once) == p2.widths()
    for (k, a), (_, b) in zip(stepwise.state_dict().items(), at_once.state_dict().items()):
        assert torch.equal(a, b), k


def test_bad_plans_raise_clear_errors():
    model = build_model("small_cnn", 10)
    plan = build_pruning_plan(model, {n: np.arange(c, dtype=float) for n, c in conv_channels(model).items()}, 0.1)
    data = json.loads(plan.to_json())

    renamed = copy.deepcopy(data)
    renamed["convs"]["features.99"] = renamed["convs"].pop("features.3")
    renamed["groups"] = [["features.99"] if g == ["features.3"] else g for g in renamed["groups"]]
    renamed["steps"][0]["pruned"] = {
        ("features.99" if k == "features.3" else k): v for k, v in renamed["steps"][0]["pruned"].items()
    }
    with pytest.raises(ValueError, match=r"names layer\(s\) \['features.99'\]"):
        apply_pruning_plan(build_model("small_cnn", 10), PruningPlan.from_json(json.dumps(renamed)))

    wider = copy.deepcopy(data)
    wider["convs"]["features.0"] = 20
    with pytest.raises(ValueError, match="match neither the plan's original architecture"):
        apply_pruning_plan(build_model("small_cnn", 10), PruningPlan.from_json(json.dumps(wider)))

    emptying = copy.deepcopy(data)
    emptying["steps"].append(
        {
            "forget_class": 1,
            "pruned": {"features.0": [c for c in range(16) if c not in plan.pruned_units()["features.0"]]},
        }
    )
    with pytest.raises(ValueError, match="would empty layer"):
        apply_pruning_plan(build_model("small_cnn", 10), PruningPlan.from_json(json.dumps(emptying)))

    with pytest.raises(ValueError, match="mode"):
        apply_pruning_plan(build_model("small_cnn", 10), plan, mode="zero")
    with pytest.raises(ValueError, match="must be a PruningPlan"):
        apply_pruning_plan(build_model("small_cnn", 10), {"steps": []})
    with pytest.raises(ValueError, match="must be a PruningPlan, got str"):  # text is parsed where it enters, once
        apply_pruning_plan(build_model("small_cnn", 10), plan.to_json())
    with pytest.raises(ValueError, match="must be a PruningPlan"):
        plan_summary(plan.to_json(), build_model("small_cnn", 10))
    pruned = apply_pruning_plan(build_model("small_cnn", 10), plan)
    with pytest.raises(ValueError, match="mask mode needs the unpruned model"):
        apply_pruning_plan(pruned, plan, mode="mask")
    # a plan for another architecture with the same layer names but other coupling
    r20 = build_model("resnet20", 10)
    r20_plan = build_pruning_plan(r20, {n: np.arange(c, dtype=float) for n, c in conv_channels(r20).items()}, 0.1)
    fake = json.loads(r20_plan.to_json())
    fake["groups"] = [[n] for g in fake["groups"] for n in g]  # claims every conv is independent
    fake["steps"][0]["pruned"] = {"conv1": [0]}
    with pytest.raises(ValueError, match="couples layer 'conv1'"):
        apply_pruning_plan(build_model("resnet20", 10), PruningPlan.from_json(json.dumps(fake)))


def _masked_setup(name="resnet20", ratio=0.15, seed=7):
    model = randomize_bn(build_model(name, 10), seed=seed)
    rng = np.random.default_rng(seed)
    plan = build_pruning_plan(model, {n: rng.random(c) for n, c in conv_channels(model).items()}, ratio)
    removed = apply_pruning_plan(copy.deepcopy(model), plan).eval()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    masked = apply_pruning_plan(model, plan, mode="mask")
    assert {k: v.shape for k, v in masked.state_dict().items()} == keys  # FedAvg exchange unaffected
    return masked, removed, plan


def _masked_slices_are_zero(model) -> bool:
    record = model._nvflare_unlearn_masks
    modules = dict(model.named_modules())
    return all(
        getattr(modules[m], p).index_select(d, torch.tensor(i)).abs().sum().item() == 0.0
        for m, p, d, i in record["entries"]
    )


def test_mask_zeroes_every_coupled_slice_and_matches_removal():
    masked, removed, plan = _masked_setup()
    assert _masked_slices_are_zero(masked)
    entries = {(m, p, d) for m, p, d, _ in masked._nvflare_unlearn_masks["entries"]}
    assert ("conv1", "weight", 0) in entries or ("layer1.0.conv1", "weight", 0) in entries
    assert any(p == "weight" and d == 1 for _, p, d in entries)  # consumers' input slices
    assert any(m.endswith("bn1") or m.endswith("bn2") for m, _, _ in entries)  # BatchNorm weight and bias
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(x), removed(x), rtol=1e-4, atol=1e-5)
    assert masked_plan(masked) == plan


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
    ],
)
def test_masks_stay_zero_through_training(make_opt):
    masked, _, _ = _masked_setup(seed=8)
    masked.train()
    opt = make_opt(masked.parameters())
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        opt.zero_grad()
        x = torch.rand(8, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        nn.functional.cross_entropy(masked(x), y).backward()
        opt.step()
        assert _masked_slices_are_zero(masked)  # right after the step, before any forward re-zeroes


def test_masked_outputs_ignore_masked_channels_and_enforce_after_load():
    masked, removed, _ = _masked_setup(name="small_cnn", ratio=0.2, seed=9)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        reference = masked.eval()(x)
        torch.testing.assert_close(reference, removed(x), rtol=1e-5, atol=1e-6)
        # write garbage into the masked slices: outputs must not change (the forward pre-hook re-zeroes)
        for m, p, d, i in masked._nvflare_unlearn_masks["entries"]:
            getattr(dict(masked.named_modules())[m], p).index_fill_(d, torch.tensor(i), 3.0)
        assert torch.equal(masked(x), reference)
    # loading unmasked weights (e.g. a FedAvg result) then enforce_masks re-zeroes them
    masked.load_state_dict(build_model("small_cnn", 10).state_dict())
    assert not _masked_slices_are_zero(masked)
    enforce_masks(masked)
    assert _masked_slices_are_zero(masked)
    # deep copies stay masked through training (gradient hooks are re-attached to the copy's parameters)
    clone = copy.deepcopy(masked).train()
    opt = torch.optim.SGD(clone.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        clone(x).pow(2).sum().backward()
        opt.step()
        assert _masked_slices_are_zero(clone)
    assert enforce_masks(build_model("small_cnn", 10)) is not None  # no masks: a no-op


def test_mask_only_grows():
    model = build_model("small_cnn", 10)
    rng = np.random.default_rng(10)
    p1 = build_pruning_plan(model, {n: rng.random(c) for n, c in conv_channels(model).items()}, 0.1)
    apply_pruning_plan(model, p1, mode="mask")
    other = build_pruning_plan(
        build_model("small_cnn", 10), {n: -rng.random(c) for n, c in conv_channels(model).items()}, 0.1
    )
    if other.pruned_units() != p1.pruned_units():
        with pytest.raises(ValueError, match="already masked"):
            apply_pruning_plan(model, other, mode="mask")


def test_masked_model_can_be_summarised_and_converted_to_removal():
    masked, removed, plan = _masked_setup(name="resnet20", ratio=0.1, seed=11)
    summary = plan_summary(plan, masked)  # works on a deep copy; the masked model is untouched
    assert summary["params_after"] == sum(p.numel() for p in removed.parameters())
    assert masked_plan(masked) == plan
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = masked.eval()(x)
    apply_pruning_plan(masked, plan)  # mask -> physical removal, masks switched off
    assert masked_plan(masked) is None and conv_channels(masked) == plan.widths()
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(x), expected, rtol=1e-4, atol=1e-5)
    masked.train()
    nn.functional.cross_entropy(masked(x), torch.tensor([1, 2])).backward()  # no stale hook touches new shapes
