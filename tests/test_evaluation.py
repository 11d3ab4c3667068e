"""Forgetting tests (nvflare_unlearn.evaluation) on digits + the small CNN: seconds each."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nvflare_unlearn.data import LabelledDataset, digits_dataset, split_forget_retain
from nvflare_unlearn.data.transforms import CifarTransform
from nvflare_unlearn.evaluation import (
    TensorBatches,
    accuracy_report,
    as_tensors,
    linear_probe,
    membership_inference,
    penultimate_features,
    random_crop_flip,
    relearn_steps,
    train_epochs,
)
from nvflare_unlearn.evaluation.baselines import reset_classifier_rows
from nvflare_unlearn.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORGET = 9


@pytest.fixture(scope="module")
def digits():
    return digits_dataset("train"), digits_dataset("test")


@pytest.fixture(scope="module")
def trained(digits):
    """A small CNN trained centrally on digits (~97 % test accuracy)."""
    torch.manual_seed(0)
    train, _ = digits
    x, y = as_tensors(train)
    model = build_model("small_cnn", 10)
    train_epochs(model, TensorBatches(x, y, 64, shuffle=True, seed=0), 10, 0.05)
    return model


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_as_tensors_accepts_pairs_and_datasets(digits):
    train, _ = digits
    x, y = as_tensors(train)
    assert x.shape == (len(train), 1, 8, 8) and y.dtype == torch.int64
    x2, y2 = as_tensors((x[:5], y[:5]))
    assert torch.equal(x2, x[:5]) and torch.equal(y2, y[:5])


def test_as_tensors_refuses_random_augmentation():
    ds = LabelledDataset(
        np.zeros((4, 3, 32, 32), np.uint8),
        np.arange(4) % 2,
        ["a", "b"],
        CifarTransform((0.5,) * 3, (0.25,) * 3, augment=True),
    )
    with pytest.raises(ValueError, match="augmentation"):
        as_tensors(ds)


def test_random_crop_flip_keeps_shape_and_content_scale():
    x = torch.randn(6, 3, 32, 32)
    out = random_crop_flip(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    flipped_only = random_crop_flip(x, 0, torch.Generator().manual_seed(0))
    for i in range(6):  # without padding every image is either itself or its mirror
        assert torch.equal(flipped_only[i], x[i]) or torch.equal(flipped_only[i], x[i].flip(-1))


def test_penultimate_features_are_the_classifier_input(trained, digits):
    _, test = digits
    feats, labels = penultimate_features(trained, test)
    assert feats.shape == (len(test), trained.fc.in_features)
    x, _ = as_tensors(test)
    with torch.no_grad():
        trained.eval()
        logits = trained(x).numpy()
    np.testing.assert_allclose(
        feats @ trained.fc.weight.detach().numpy().T + trained.fc.bias.detach().numpy(), logits, rtol=1e-4, atol=1e-4
    )


def test_probe_separability_high_for_trained_model(trained, digits):
    train, test = digits
    res = linear_probe(trained, train, test, [FORGET])
    assert res["auc"] > 0.95 and res["balanced_accuracy"] > 0.9
    assert res["feature_dim"] == 64 and res["n_test"] == len(test)


def test_probe_is_blind_to_output_level_hiding(trained, digits):
    """Row reset hides the class at the output; the features (and so the probe) are unchanged."""
    train, test = digits
    hidden = reset_classifier_rows(copy.deepcopy(trained), [FORGET], seed=1)
    assert accuracy_report(hidden, test, 10, [FORGET])["u_acc"] < 0.5
    a = linear_probe(trained, train, test, [FORGET])
    b = linear_probe(hidden, train, test, [FORGET])
    assert a["auc"] == pytest.approx(b["auc"], abs=1e-9)


def test_probe_needs_both_groups(trained, digits):
    train, test = digits
    u, _ = split_forget_retain(test, [FORGET])
    with pytest.raises(ValueError, match="both"):
        linear_probe(trained, train, u, [FORGET])


def test_membership_inference_values_are_bounded(trained, digits):
    train, test = digits
    u_tr, r_tr = split_forget_retain(train, [FORGET])
    u_te, r_te = split_forget_retain(test, [FORGET])
    res = membership_inference(trained, r_tr, r_te, u_tr, u_te)
    for attack in ("loss", "mlp"):
        for key in (
            "power_accuracy",
            "power_auc",
            "forget_accuracy",
            "forget_auc",
            "forget_train_member_rate",
            "forget_test_member_rate",
        ):
            assert 0.0 <= res[attack][key] <= 1.0, (attack, key)
    assert 0.0 <= res["loss"]["forget_selfcal_accuracy"] <= 1.0
    assert res["n_power_eval"] > 0 and res["n_forget_eval"] > 0


def test_membership_attack_has_power_on_a_memorising_model(digits):
    """Random labels can only be fitted by memorising: the loss attack must then separate members clearly."""
    torch.manual_seed(0)
    x, _ = as_tensors(digits[0])
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    model = build_model("small_cnn", 10)
    train_epochs(model, TensorBatches(x[:96], y[:96], 32, shuffle=True), 80, 0.05)
    res = membership_inference(
        model,
        (x[:64], y[:64]),
        (x[200:264], y[200:264]),
        (x[64:96], y[64:96]),
        (x[300:332], y[300:332]),
        attacks=("loss",),
    )
    assert res["loss"]["power_accuracy"] >= 0.8
    assert res["loss"]["forget_auc"] >= 0.8  # the "forget" members were trained on too: control detects them


def test_membership_attack_is_at_chance_without_membership(digits):
    torch.manual_seed(0)
    _, test = digits
    x, y = as_tensors(test)
    untrained = build_model("small_cnn", 10)
    res = membership_inference(
        untrained,
        (x[:200], y[:200]),
        (x[200:400], y[200:400]),
        (x[:100], y[:100]),
        (x[300:400], y[300:400]),
        attacks=("loss",),
    )
    assert abs(res["loss"]["power_accuracy"] - 0.5) < 0.15


def test_relearn_zero_steps_when_class_is_known(trained, digits):
    train, test = digits
    u_tr, r_tr = split_forget_retain(train, [FORGET])
    u_te, _ = split_forget_retain(test, [FORGET])
    res = relearn_steps(trained, u_tr.subset(range(20)), r_tr.subset(range(100)), 0.5, eval_ds=u_te)
    assert res["steps"] == 0 and res["reached"]


def _hidden(trained, digits, bias: float):
    """A copy of the model with the forget class's row reset and its bias at ``bias`` (far from predicted), and the
    forget-class training images, the retained ones and the forget-class test images."""
    train, test = digits
    u_tr, r_tr = split_forget_retain(train, [FORGET])
    u_te, _ = split_forget_retain(test, [FORGET])
    hidden = reset_classifier_rows(copy.deepcopy(trained), [FORGET], seed=1)
    with torch.no_grad():
        hidden.fc.bias[FORGET] = bias
    return hidden, u_tr, r_tr, u_te


def test_relearn_counts_steps_on_a_copy(trained, digits):
    hidden, u_tr, r_tr, u_te = _hidden(trained, digits, -20.0)  # the class starts far from predicted
    before = _params(hidden)
    res = relearn_steps(
        hidden,
        u_tr.subset(range(20)),
        r_tr.subset(range(200)),
        0.5,
        lr=0.01,
        batch_size=32,
        max_steps=300,
        eval_ds=u_te,
        eval_every=2,
    )
    assert res["reached"] and 0 < res["steps"] <= 300 and res["steps"] % 2 == 0
    assert res["curve"][-1][1] >= 0.5
    assert all(torch.equal(a, b) for a, b in zip(before, _params(hidden)))


def test_relearn_reports_censored_count(trained, digits):
    hidden, u_tr, r_tr, u_te = _hidden(trained, digits, -50.0)
    res = relearn_steps(
        hidden, u_tr.subset(range(10)), r_tr.subset(range(50)), 0.9, lr=1e-6, max_steps=10, eval_ds=u_te
    )
    assert not res["reached"] and res["steps"] == 10


def test_relearn_rejects_bad_target(trained, digits):
    train, _ = digits
    with pytest.raises(ValueError, match="target_acc"):
        relearn_steps(trained, train, train, 1.5)


def test_accuracy_report_distance_to_itself_is_zero(trained, digits):
    _, test = digits
    rep = accuracy_report(trained, test, 10, [FORGET])
    again = accuracy_report(trained, test, 10, [FORGET], reference_class_acc=rep["class_acc"])
    assert again["kl_to_reference"] == pytest.approx(0.0, abs=1e-12)
    assert again["max_class_acc_diff"] == 0.0
    assert rep["u_acc"] == rep["class_acc"][FORGET]


def _cluster_data(n_per_class: int, seed: int):
    """10 Gaussian clusters in R^10; class 9 sits on class 0's centre plus an offset along dimension 9 only."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.eye(10)
    centres[9] = centres[0] + 3.0 * torch.eye(10)[9]
    y = torch.arange(10).repeat_interleave(n_per_class)
    x = centres[y] + 0.5 * torch.randn(y.numel(), 10, generator=g)
    return x, y


def _feature_model(drop_dim: int | None) -> torch.nn.Module:
    """Identity features (optionally with one dimension zeroed) followed by a classifier: the probe reads them."""
    feat = torch.nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        w = torch.eye(10)
        if drop_dim is not None:
            w[drop_dim, drop_dim] = 0.0
        feat.weight.copy_(w)
    return torch.nn.Sequential(feat, torch.nn.Linear(10, 10))


def test_probe_control_tells_forgetting_from_a_weaker_extractor():
    """Removing the one feature that encodes class 9 lowers its AUC but not the retained classes' (the control)."""
    train, test = _cluster_data(200, 0), _cluster_data(100, 1)
    controls = list(range(1, 9))
    intact = linear_probe(_feature_model(None), train, test, [9], control_classes=controls)
    forgot = linear_probe(_feature_model(9), train, test, [9], control_classes=controls)
    assert intact["auc"] > 0.99 and forgot["auc"] < 0.97
    assert forgot["control_auc_mean"] > 0.99 and set(forgot["control_auc"]) == {str(c) for c in controls}
    assert forgot["auc_minus_control"] == pytest.approx(forgot["auc"] - forgot["control_auc_mean"])
    assert forgot["auc_minus_control"] < intact["auc_minus_control"] - 0.02
    with pytest.raises(ValueError, match="overlap"):
        linear_probe(_feature_model(None), train, test, [9], control_classes=[1, 9])
