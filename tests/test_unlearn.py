"""Centralized unlearning on a really trained model: evidence that statistics -> TF-IDF -> pruning is wired right."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from core_helpers import class_accuracy, digits_tensors, loader, trained_digits_cnn

from nvflare_unlearn import PruningPlan, apply_pruning_plan, build_model, unlearn_centralized
from nvflare_unlearn.method.graph import conv_channels
from nvflare_unlearn.method.prune import plan_summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORGET = (0, 3, 7)


def test_pruning_a_class_top_tfidf_channels_hurts_that_class_most():
    """On the pinned model (init seed 0). Across init seeds 0-4 the first two claims held every time; the
    'lowest' control held for 4 of 5: on this 112-channel CNN the lowest-scoring 8 % sometimes also holds a
    channel a class cannot do without, so 'lowest barely hurts' is a tendency here, not a law."""
    model = trained_digits_cnn()
    xtr, ytr, xte, yte = digits_tensors()
    base = class_accuracy(model, xte, yte)
    assert base.mean() > 0.9
    forget_drop, other_drop, low_drop = [], [], []
    for k in FORGET:
        pruned, plan = unlearn_centralized(
            copy.deepcopy(model), "small_cnn", loader(xtr, ytr), 10, k, 0.08, tf_norm="width"
        )
        drop = base - class_accuracy(pruned, xte, yte)
        forget_drop.append(drop[k])
        other_drop.append(np.delete(drop, k).mean())
        assert drop[k] > np.delete(drop, k).mean(), f"class {k}: {drop.round(2)}"
        # control: the released code's direction (lowest scores) removes as many channels but barely hurts k
        low, _ = unlearn_centralized(
            copy.deepcopy(model), "small_cnn", loader(xtr, ytr), 10, k, 0.08, tf_norm="width", direction="lowest"
        )
        low_drop.append((base - class_accuracy(low, xte, yte))[k])
    print(
        f"forget-class drop {np.round(forget_drop, 2)}, other classes {np.round(other_drop, 2)}, "
        f"forget-class drop with direction='lowest' {np.round(low_drop, 2)}"
    )
    assert np.mean(forget_drop) > 0.5
    assert np.mean(forget_drop) > np.mean(other_drop) + 0.3
    assert np.mean(forget_drop) > np.mean(low_drop) + 0.3


def test_multi_class_plan_composes_and_replays():
    model = trained_digits_cnn()
    xtr, ytr, xte, yte = digits_tensors()
    pruned, plan = unlearn_centralized(copy.deepcopy(model), "small_cnn", loader(xtr, ytr), 10, [3, 5], 0.1)
    assert plan.forget_classes == [3, 5] and plan.model_name == "small_cnn"
    units = [sum(len(v) for v in s["pruned"].values()) for s in plan.steps]
    assert units == [round(0.1 * 112)] * 2
    for key in plan.group_keys:
        assert not set(plan.steps[0]["pruned"].get(key, [])) & set(plan.steps[1]["pruned"].get(key, []))
    assert plan.steps[1]["scoring"]["tf_norm"] == "share"
    assert sum(plan.steps[0]["scoring"]["class_counts"]) == len(ytr)
    fresh = apply_pruning_plan(build_model("small_cnn", 10), PruningPlan.from_json(plan.to_json()))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(xte), pruned(xte))
    # mask mode picks the same channels and gives the same function
    masked, mplan = unlearn_centralized(
        copy.deepcopy(model), "small_cnn", loader(xtr, ytr), 10, [3, 5], 0.1, mode="mask"
    )
    assert mplan.pruned_units() == plan.pruned_units()
    assert conv_channels(masked) == plan.convs
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(xte), pruned(xte), rtol=1e-4, atol=1e-5)


def test_resnet20_with_bn_hook_point_and_per_layer_scope():
    model = build_model("resnet20", 10)
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(20, 3, 32, 32, generator=g), torch.arange(20) % 10) for _ in range(2)]
    pruned, plan = unlearn_centralized(
        model, "resnet20", data, 10, [1, 2], 0.05, hook_point="bn", scope="per_layer", idf="reference", max_batches=1
    )
    assert pruned is model and conv_channels(model) == plan.widths()
    assert plan.steps[0]["scoring"]["class_counts"] == [2] * 10  # max_batches=1: one batch of 20
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "forget, ratio, match",
    [
        (10, 0.1, "not a class id"),
        ([-1], 0.1, "not a class id"),
        ([3, 3], 0.1, "duplicates"),
        (list(range(10)), 0.1, "cannot forget all"),
        ([], 0.1, "empty"),
        ("3", 0.1, "class id or a list"),
        (3, 0.0, "ratio"),
        (3, 1.0, "ratio"),
    ],
)
def test_bad_requests(forget, ratio, match):
    model = build_model("small_cnn", 10)
    with pytest.raises(ValueError, match=match):
        unlearn_centralized(model, "small_cnn", [], 10, forget, ratio)


def test_forget_class_absent_from_data():
    xtr, ytr, _, _ = digits_tensors()
    keep = ytr != 4
    with pytest.raises(ValueError, match="no sample of forget class 4"):
        unlearn_centralized(build_model("small_cnn", 10), "small_cnn", loader(xtr[keep], ytr[keep]), 10, 4, 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_end_to_end(tmp_path):
    """Statistics, planning, removal, masks under training and checkpoints on a CUDA model (CPU data loader)."""
    from nvflare_unlearn import load_checkpoint, save_checkpoint
    from nvflare_unlearn.method.prune import enforce_masks

    dev = torch.device("cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convs differ by ~1e-4 between differently shaped layers
    try:
        _cuda_end_to_end(tmp_path, dev, load_checkpoint, save_checkpoint, enforce_masks)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _cuda_end_to_end(tmp_path, dev, load_checkpoint, save_checkpoint, enforce_masks):
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(32, 3, 32, 32, generator=g), torch.arange(32) % 10) for _ in range(2)]
    base = build_model("resnet20", 10).to(dev)
    pruned, plan = unlearn_centralized(copy.deepcopy(base), "resnet20", data, 10, [1, 4], 0.05)
    assert next(pruned.parameters()).is_cuda and conv_channels(pruned) == plan.widths()
    assert plan_summary(plan, pruned)["params_after"] == sum(p.numel() for p in pruned.parameters())
    x = torch.rand(4, 3, 32, 32, device=dev)
    masked, mplan = unlearn_centralized(copy.deepcopy(base), "resnet20", data, 10, [1, 4], 0.05, mode="mask")
    assert mplan.pruned_units() == plan.pruned_units()
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(x), pruned.eval()(x), rtol=1e-4, atol=1e-5)
    masked.train()
    opt = torch.optim.SGD(masked.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(masked(x), torch.tensor([0, 1, 2, 3], device=dev)).backward()
        opt.step()
    snapshot = {k: v.clone() for k, v in masked.state_dict().items()}
    enforce_masks(masked)
    for k, v in masked.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"{k} had drifted away from zero"
    path = save_checkpoint(tmp_path / "cuda.pt", pruned, plan, "resnet20", 10)
    loaded, plan2, _ = load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.to(dev).eval()(x), pruned.eval()(x))
