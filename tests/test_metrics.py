"""nvflare_unlearn.evaluation: per-class counts, U/R accuracy, KL, the training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nvflare_unlearn.evaluation import (
    class_correct_total,
    class_distribution_kl,
    evaluate_accuracy,
    pick_device,
    train_epochs,
    u_r_accuracy,
)


class FixedPredictor(nn.Module):
    """Predicts the class stored in the input's first feature: lets tests hand-pick every prediction."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(1))
        self.bn = nn.BatchNorm1d(1)  # makes train/eval mode observable

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0].long(), self.k).float() + 0 * self.dummy


def _loader(preds, labels, batch_size=3):
    x = torch.tensor(preds, dtype=torch.float32).view(-1, 1)
    return DataLoader(TensorDataset(x, torch.tensor(labels)), batch_size=batch_size)


def test_class_correct_total_hand_checked():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    preds = [0, 1, 0, 1, 0, 2, 2, 0, 1]
    # class 0: 2 of 3 right; class 1: 1 of 2; class 2: 2 of 4; class 3: no samples
    model = FixedPredictor(4).train()
    correct, total = class_correct_total(model, _loader(preds, labels), 4)
    assert correct.tolist() == [2, 1, 2, 0] and total.tolist() == [3, 2, 4, 0]
    assert correct.dtype == np.int64 and total.dtype == np.int64
    assert model.training  # mode restored
    model.eval()
    class_correct_total(model, _loader(preds, labels), 4)
    assert not model.training


def test_class_correct_total_uses_eval_mode_and_no_grad():
    seen = {}

    class Probe(FixedPredictor):
        def forward(self, x):
            seen["training"], seen["grad"] = self.training, torch.is_grad_enabled()
            return super().forward(x)

    class_correct_total(Probe(2).train(), _loader([0], [0]), 2)
    assert seen == {"training": False, "grad": False}


def test_class_correct_total_rejects_bad_labels_and_k():
    with pytest.raises(ValueError, match="0..1"):
        class_correct_total(FixedPredictor(3), _loader([0], [2]), 2)
    with pytest.raises(ValueError, match="num_classes"):
        class_correct_total(FixedPredictor(3), _loader([0], [0]), 0)
    with pytest.raises(ValueError, match="does not cover"):
        class_correct_total(FixedPredictor(2), _loader([0], [0]), 3)


def test_u_r_accuracy_hand_checked():
    correct, total = [2, 1, 2, 0], [3, 2, 4, 0]
    out = u_r_accuracy(correct, total, [1, 2])
    assert out["u_acc"] == pytest.approx(3 / 6)
    assert out["r_acc"] == pytest.approx(2 / 3)  # class 3 has no samples, so R = class 0 only
    assert out["class_acc"][:3] == pytest.approx([2 / 3, 1 / 2, 2 / 4])
    assert out["class_acc"][3] is None
    single = u_r_accuracy(correct, total, 0)
    assert single["u_acc"] == pytest.approx(2 / 3) and single["r_acc"] == pytest.approx(3 / 6)


def test_u_r_accuracy_empty_sets_give_none_not_nan():
    out = u_r_accuracy([0, 5, 0], [0, 10, 0], [0, 2])
    assert out["u_acc"] is None and out["r_acc"] == 0.5
    everything = u_r_accuracy([1, 2], [2, 2], [0, 1])
    assert everything["r_acc"] is None and everything["u_acc"] == 0.75
    for v in [out["u_acc"], everything["r_acc"], *out["class_acc"]]:
        assert v is None or not math.isnan(v)


@pytest.mark.parametrize(
    "args",
    [
        ([1, 1], [2, 2], [2]),
        ([1, 1], [2, 2], [-1]),
        ([1, 1], [2], [0]),
        ([3, 1], [2, 2], [0]),
        ([1, 1], [2, 2], ["0"]),
    ],
)
def test_u_r_accuracy_bad_input(args):
    with pytest.raises(ValueError):
        u_r_accuracy(*args)


def test_class_distribution_kl():
    p = [0.9, 0.8, 0.0]
    assert class_distribution_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    q = [0.85, 0.85, 0.0]
    pn, qn = np.array([0.9, 0.8]) / 1.7, np.array([0.85, 0.85]) / 1.7
    assert class_distribution_kl(p, q) == pytest.approx(float(np.sum(pn * np.log(pn / qn))), rel=1e-6)
    assert class_distribution_kl(p, [0.9, 0.8, 0.5]) > class_distribution_kl(p, q) > 0
    assert math.isfinite(class_distribution_kl([1.0, 0.0], [0.0, 1.0]))
    with pytest.raises(ValueError, match="None"):
        class_distribution_kl([0.5, None], [0.5, 0.5])
    with pytest.raises(ValueError):
        class_distribution_kl([0.5], [0.5, 0.5])


def _separable(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


def test_train_epochs_learns_counts_steps_and_calls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    loader = _separable()
    before = evaluate_accuracy(model, loader)
    calls = []
    steps = train_epochs(model, loader, epochs=3, lr=0.1, after_step=lambda m: calls.append(m))
    assert steps == 3 * 8 and len(calls) == steps and calls[0] is model
    assert evaluate_accuracy(model, loader) > max(before, 0.9)
    assert train_epochs(model, loader, epochs=5, lr=0.1, max_steps=5) == 5
    assert train_epochs(model, loader, epochs=0, lr=0.1) == 0


def test_train_epochs_after_step_can_hold_weights_at_zero():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0].zero_()

    def enforce(m):
        with torch.no_grad():
            m.weight[0].zero_()

    train_epochs(model, _separable(), epochs=1, lr=0.1, after_step=enforce)
    assert torch.count_nonzero(model.weight[0]) == 0 and torch.count_nonzero(model.weight[1]) > 0


def test_train_epochs_restores_mode_and_validates():
    model = nn.Sequential(nn.Linear(2, 2)).eval()
    train_epochs(model, _separable(), epochs=1, lr=0.01)
    assert not model.training
    for kwargs in ({"epochs": -1, "lr": 0.1}, {"epochs": 1, "lr": 0.0}, {"epochs": 1, "lr": 0.1, "max_steps": -2}):
        with pytest.raises(ValueError):
            train_epochs(model, _separable(), **kwargs)


def test_train_epochs_diverging_loss_is_a_clear_error():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="learning rate"):
        train_epochs(model, _separable(), epochs=1, lr=0.1)


def test_evaluate_accuracy_empty_is_none_and_pick_device():
    model = FixedPredictor(2)
    assert evaluate_accuracy(model, []) is None
    assert evaluate_accuracy(model, _loader([0, 1, 1], [0, 1, 0])) == pytest.approx(2 / 3)
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA is used when present)")
def test_cuda_training_and_counts_match_cpu():
    from nvflare_unlearn.data import digits_dataset

    ds = digits_dataset("train")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).to("cuda")
    steps = train_epochs(model, DataLoader(ds, batch_size=64, shuffle=True), epochs=2, lr=0.05)
    assert steps == 2 * math.ceil(len(ds) / 64) and next(model.parameters()).is_cuda
    loader = DataLoader(ds, batch_size=256)
    correct_gpu, total_gpu = class_correct_total(model, loader, 10)
    assert next(model.parameters()).is_cuda  # evaluation does not move the model
    correct_cpu, total_cpu = class_correct_total(model.cpu(), loader, 10)
    assert np.array_equal(total_gpu, total_cpu) and np.abs(correct_gpu - correct_cpu).max() <= 1
    assert correct_gpu.sum() / total_gpu.sum() > 0.8
