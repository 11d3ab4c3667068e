"""Array-level membership attacks (loss AUC and power, offline LiRA, feature shadow classifier), the per-example
arrays they read, and the Fisher alpha sweep: each must find membership where there is some and nothing where there
is none. The memorising setting is a small CNN overfit on 1,000 real CIFAR-10 images (skipped without the data)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from nvflare_unlearn.data import digits_dataset, load_dataset, stratified_subset_indices
from nvflare_unlearn.evaluation import TensorBatches, as_tensors, relearn_steps, train_epochs
from nvflare_unlearn.evaluation.artifacts import load_arrays, per_example_arrays, save_arrays, write_json
from nvflare_unlearn.evaluation.baselines import (
    federated_fisher,
    reset_classifier_rows,
    tune_fisher_alpha,
)
from nvflare_unlearn.evaluation.fedsim import Federation
from nvflare_unlearn.evaluation.membership import (
    feature_membership_attack,
    lira_offline,
    logit_confidence,
    loss_attack_power,
    membership_auc,
)
from nvflare_unlearn.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FORGET = 9


# ------------------------------------------------------------------------------------------ synthetic inputs
def test_logit_confidence_is_the_logit_of_the_true_class_probability():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (50, 7))
    y = rng.integers(0, 7, 50)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    py = p[np.arange(50), y]
    np.testing.assert_allclose(logit_confidence(z, y), np.log(py / (1 - py)), rtol=1e-9, atol=1e-9)
    big = np.array([[1000.0, 0.0, -1000.0]])  # stable where the naive formula overflows
    assert np.isfinite(logit_confidence(big, [0])).all() and logit_confidence(big, [0])[0] == pytest.approx(1000.0)
    with pytest.raises(ValueError):
        logit_confidence(z, np.full(50, 7))


def test_membership_auc_sees_lower_member_losses_and_nothing_else():
    rng = np.random.default_rng(1)
    strong = membership_auc(rng.exponential(0.2, 500), rng.exponential(1.0, 500), n_boot=200)
    null = membership_auc(rng.exponential(1.0, 500), rng.exponential(1.0, 500), n_boot=200)
    assert strong["auc"] > 0.8 and strong["low"] > 0.75 and strong["tpr_at_fpr"] > 0.01
    assert null["low"] < 0.5 < null["high"]
    p = loss_attack_power(rng.exponential(0.2, 400), rng.exponential(1.0, 400), n_boot=200)
    assert p["accuracy"] > 0.7 and p["n_eval"] == 400


def test_lira_calibrates_each_image_by_the_out_references():
    """Images differ wildly in difficulty; only the target's excess over the references reveals membership."""
    rng = np.random.default_rng(2)
    difficulty_in, difficulty_out = rng.normal(0, 4, 300), rng.normal(0, 4, 300)
    refs_in = difficulty_in + rng.normal(0, 0.5, (3, 300))
    refs_out = difficulty_out + rng.normal(0, 0.5, (3, 300))
    member = lira_offline(
        difficulty_in + 1.0 + rng.normal(0, 0.5, 300), difficulty_out + rng.normal(0, 0.5, 300), refs_in, refs_out
    )
    assert member["auc"] > 0.85 and member["n_refs"] == 3
    # raw confidence alone is swamped by difficulty: the calibration is what gives the power
    raw = membership_auc(-(difficulty_in + 1.0), -difficulty_out)
    assert raw["auc"] < member["auc"] - 0.2
    never_seen = lira_offline(
        difficulty_in + rng.normal(0, 0.5, 300),
        difficulty_out + rng.normal(0, 0.5, 300),
        refs_in,
        refs_out,
        per_example_variance=True,
    )
    assert never_seen["low"] < 0.5 < never_seen["high"]
    one_ref = lira_offline(difficulty_in + 1.0, difficulty_out, refs_in[:1], refs_out[:1])
    assert one_ref["auc"] > 0.85 and one_ref["variance"] == "global"
    with pytest.raises(ValueError, match="per_example_variance"):
        lira_offline(difficulty_in, difficulty_out, refs_in[:1], refs_out[:1], per_example_variance=True)
    with pytest.raises(ValueError, match="refs_in"):
        lira_offline(difficulty_in, difficulty_out, refs_in[:, :10], refs_out)


def test_feature_attack_finds_a_shift_in_features_and_not_noise():
    rng = np.random.default_rng(3)
    shifted = feature_membership_attack(rng.normal(0.4, 1, (300, 16)), rng.normal(0, 1, (300, 16)), n_boot=200)
    null = feature_membership_attack(rng.normal(0, 1, (300, 16)), rng.normal(0, 1, (300, 16)), n_boot=200)
    assert shifted["auc"] > 0.8 and shifted["folds"] == 5
    assert null["low"] < 0.55 and abs(null["auc"] - 0.5) < 0.1
    with pytest.raises(ValueError, match="equal D"):
        feature_membership_attack(np.zeros((10, 3)), np.zeros((10, 4)))


# -------------------------------------------------------------------------------------- arrays on digits
@pytest.fixture(scope="module")
def digits_model():
    torch.manual_seed(0)
    x, y = as_tensors(digits_dataset("train"))
    model = build_model("small_cnn", 10)
    train_epochs(model, TensorBatches(x, y, 64, shuffle=True, seed=0), 3, 0.05)
    return model, x, y


def test_per_example_arrays_round_trip(digits_model, tmp_path):
    model, x, y = digits_model
    arr = per_example_arrays(model, (x[:100], y[:100]))
    assert arr["features"].shape == (100, model.fc.in_features) and arr["logits"].shape == (100, 10)
    with torch.no_grad():
        model.eval()
        ref = nn.functional.cross_entropy(model(x[:100]), y[:100], reduction="none").numpy()
    np.testing.assert_allclose(arr["loss"], ref, rtol=1e-4, atol=1e-5)
    path = save_arrays(
        tmp_path / "m.npz", {"u_train": arr, "u_test": per_example_arrays(model, (x[100:150], y[100:150]))}
    )
    back = load_arrays(path)
    assert set(back) == {"u_train", "u_test"} and back["u_test"]["labels"].shape == (50,)
    np.testing.assert_array_equal(back["u_train"]["loss"], arr["loss"])
    np.testing.assert_allclose(back["u_train"]["features"], arr["features"], rtol=1e-2, atol=1e-3)  # float16
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary file left behind
    with pytest.raises(ValueError, match="unknown array"):
        save_arrays(tmp_path / "bad.npz", {"u_train": {"probs": arr["loss"]}})
    write_json(tmp_path / "r.json", {"a": np.float32(0.5), "b": np.arange(3)})
    assert (tmp_path / "r.json").read_text().replace(" ", "").replace("\n", "") == '{"a":0.5,"b":[0,1,2]}'


def test_relearn_curve_has_one_step_resolution(digits_model):
    model, x, y = digits_model
    hidden = reset_classifier_rows(copy.deepcopy(model), [FORGET], seed=1)
    with torch.no_grad():
        hidden.fc.bias[FORGET] = -20.0
    u, r = (y == FORGET).nonzero().squeeze(1), (y != FORGET).nonzero().squeeze(1)
    res = relearn_steps(
        hidden, (x[u[:20]], y[u[:20]]), (x[r[:200]], y[r[:200]]), 0.5, max_steps=60, eval_ds=(x[u[20:]], y[u[20:]])
    )
    steps = [s for s, _ in res["curve"]]
    assert steps == list(range(len(steps)))  # every step checked, from step 0
    assert res["reached"] and res["steps"] == steps[-1] and res["curve"][-2][1] < 0.5 <= res["curve"][-1][1]


def test_fisher_alpha_is_tuned_on_retained_data_only(digits_model):
    model, x, y = digits_model
    parts = [np.arange(0, 600), np.arange(600, x.shape[0])]
    fed = Federation(x, y, parts, 10)
    fisher = federated_fisher(model, fed, [0, 1], [FORGET], images_per_site=150)
    keep = y != FORGET
    xr, yr = x[keep][:400], y[keep][:400]
    alphas = (1e-8, 1e-6, 1e-4, 1e-2)
    tight = tune_fisher_alpha(model, fisher, xr, yr, [FORGET], alphas, max_r_drop=0.02)
    loose = tune_fisher_alpha(model, fisher, xr, yr, [FORGET], alphas, max_r_drop=0.9)
    assert [e["alpha"] for e in tight["sweep"]] == list(alphas)
    assert tight["sweep"][-1]["r_acc"] < tight["base_r_acc"] - 0.02  # the largest alpha breaks the model
    assert tight["alpha"] < alphas[-1] and loose["alpha"] >= tight["alpha"]
    chosen = next(e for e in tight["sweep"] if e["alpha"] == tight["alpha"])
    assert chosen["r_acc"] >= tight["base_r_acc"] - 0.02 and tight["within_budget"]
    with pytest.raises(ValueError, match="forget-class"):
        tune_fisher_alpha(model, fisher, x[:400], y[:400], [FORGET], alphas)


# ------------------------------------------------------------------------------- a memorising CIFAR model
def _memoriser() -> nn.Module:
    """A strided conv + wide MLP head: memorises 1,000 CIFAR images within a few epochs on one CPU thread."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4096, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


@pytest.fixture(scope="module")
def memorising(request):
    """Target trained on 1,000 images (100 per class); two references retrained on the 900 without class 9."""
    from conftest import real_data_root

    root = real_data_root()
    if not (root / "cifar10").is_dir():
        pytest.skip(f"real CIFAR data not found at {root}")
    tr, te = load_dataset("cifar10", root=root, split="train"), load_dataset("cifar10", root=root, split="test")
    x, y = as_tensors(tr.subset(stratified_subset_indices(tr.targets, 1000, seed=0)))
    xt, yt = as_tensors(te.subset(stratified_subset_indices(te.targets, 1000, seed=0)))

    def fit(xs, ys, seed):
        torch.manual_seed(seed)
        m = _memoriser()
        train_epochs(m, TensorBatches(xs, ys, 32, shuffle=True, seed=seed), 8, 0.02)
        return m.eval()

    keep = y != FORGET
    target = fit(x, y, 0)
    refs = [fit(x[keep], y[keep], s) for s in (1, 2)]
    return {"x": x, "y": y, "xt": xt, "yt": yt, "target": target, "refs": refs}


def _arrays(model, data, forget_mask_train, forget_mask_test):
    x, y, xt, yt = data["x"], data["y"], data["xt"], data["yt"]
    return {
        "u_train": per_example_arrays(model, (x[forget_mask_train], y[forget_mask_train])),
        "u_test": per_example_arrays(model, (xt[forget_mask_test], yt[forget_mask_test])),
        "r_train": per_example_arrays(model, (x[~forget_mask_train], y[~forget_mask_train])),
        "r_test": per_example_arrays(model, (xt[~forget_mask_test], yt[~forget_mask_test])),
    }


@pytest.mark.data
def test_attacks_have_power_on_a_memorising_model_and_none_on_a_retrained_one(memorising):
    d = memorising
    fu, fe = d["y"] == FORGET, d["yt"] == FORGET
    arrays = {name: _arrays(m, d, fu, fe) for name, m in [("target", d["target"])] + list(enumerate(d["refs"]))}
    t = arrays["target"]
    power = loss_attack_power(t["r_train"]["loss"], t["r_test"]["loss"])
    assert power["accuracy"] >= 0.6 and power["low"] > 0.6  # the bar for an attack with power

    def phi(a, part):
        return logit_confidence(a[part]["logits"], a[part]["labels"])

    refs = [arrays[i] for i in range(2)]
    lira_target = lira_offline(
        phi(t, "u_train"),
        phi(t, "u_test"),
        np.stack([phi(r, "u_train") for r in refs]),
        np.stack([phi(r, "u_test") for r in refs]),
    )
    assert lira_target["auc"] > 0.75 and lira_target["low"] > 0.6 and lira_target["tpr_at_fpr"] > 0.05
    # a retrained model as the target, the two others as references: no membership to find
    lira_retrain = lira_offline(
        phi(refs[0], "u_train"),
        phi(refs[0], "u_test"),
        np.stack([phi(r, "u_train") for r in refs[1:]]),
        np.stack([phi(r, "u_test") for r in refs[1:]]),
    )
    assert lira_retrain["low"] < 0.5 + 0.05 and abs(lira_retrain["auc"] - 0.5) < 0.12
    feat_target = feature_membership_attack(t["u_train"]["features"], t["u_test"]["features"], n_boot=200)
    feat_retrain = feature_membership_attack(refs[0]["u_train"]["features"], refs[0]["u_test"]["features"], n_boot=200)
    assert feat_target["auc"] > 0.65 and feat_target["auc"] > feat_retrain["high"]


@pytest.mark.data
def test_output_level_hiding_does_not_pass_the_feature_attack(memorising):
    """Re-drawing the forget class's output row changes the outputs, not the features the shadow classifier reads."""
    d = memorising
    fu, fe = d["y"] == FORGET, d["yt"] == FORGET
    hidden = copy.deepcopy(d["target"])
    with torch.no_grad():
        hidden[-1].weight[FORGET].normal_(0, 0.01)
        hidden[-1].bias[FORGET] = -30.0  # the class is never predicted any more
    a, b = _arrays(d["target"], d, fu, fe), _arrays(hidden, d, fu, fe)
    assert (b["u_test"]["logits"].argmax(1) == FORGET).mean() == 0.0
    fa = feature_membership_attack(a["u_train"]["features"], a["u_test"]["features"], n_boot=100)
    fb = feature_membership_attack(b["u_train"]["features"], b["u_test"]["features"], n_boot=100)
    assert fa["auc"] == pytest.approx(fb["auc"], abs=1e-9) and fb["auc"] > 0.65


def test_arrays_and_json_create_their_folder(tmp_path):
    """A benchmark writes a run's arrays into a folder of their own: the first write creates it."""
    folder = tmp_path / "arrays" / "run"
    save_arrays(folder / "m.npz", {"u_test": {"labels": np.arange(3), "loss": np.ones(3, np.float32)}})
    write_json(tmp_path / "new" / "r.json", {"a": np.float32(1.5)})
    assert load_arrays(folder / "m.npz")["u_test"]["labels"].tolist() == [0, 1, 2]
    assert (tmp_path / "new" / "r.json").read_text().strip().endswith("}")
