"""Per-class activation statistics: exact values, streaming, merging, serialisation and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from nvflare_unlearn.method.activations import (
    ClassActivationReport,
    collect_class_activations,
    merge_reports,
    validate_report,
)
from nvflare_unlearn.method.graph import conv_channels
from nvflare_unlearn.models import build_model, example_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TwoConv(nn.Module):
    """conv_a: 1x1 conv with weights [+1, -1] (outputs x and -x), optionally followed by a BN; conv_b feeds a BN."""

    def __init__(self, bn_a: bool = False) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 2, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(2) if bn_a else nn.Identity()
        self.conv_b = nn.Conv2d(2, 3, 1)
        self.bn_b = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 4)
        with torch.no_grad():
            self.conv_a.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_b(self.conv_b(self.bn_a(self.conv_a(x))))
        return self.head(y.mean(dim=(2, 3)))


def _data(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 3, 3, generator=g)
    y = torch.arange(n) % 3  # classes 0..2 present, class 3 absent
    return x, y


def test_exact_sums_counts_and_means():
    torch.manual_seed(0)
    model = TwoConv()
    x, y = _data()
    report = collect_class_activations(model, DataLoader(TensorDataset(x, y), batch_size=7), num_classes=4)
    assert report.layer_names == ["conv_a", "conv_b"]
    assert report.counts.dtype == np.int64 and report.counts.tolist() == [14, 13, 13, 0]
    # conv_a channel 0 = x, channel 1 = -x: ReLU then spatial mean, summed per class
    xn = x.numpy()[:, 0]
    pos = np.maximum(xn, 0).mean(axis=(1, 2))
    neg = np.maximum(-xn, 0).mean(axis=(1, 2))
    for k in range(3):
        np.testing.assert_allclose(report.sums["conv_a"][k], [pos[y == k].sum(), neg[y == k].sum()], rtol=1e-6)
    means = report.means()
    assert report.sums["conv_a"].dtype == np.float64
    np.testing.assert_array_equal(means["conv_a"][3], 0.0)  # no samples: zeros, not NaN
    np.testing.assert_allclose(means["conv_a"][0], report.sums["conv_a"][0] / 14)
    assert report.hook_point == "conv"


def test_bn_hook_point_uses_the_batchnorm_that_consumes_the_conv():
    torch.manual_seed(0)
    model = TwoConv(bn_a=True)
    with torch.no_grad():  # non-trivial BN so conv and bn outputs differ
        model.bn_b.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
        model.bn_b.bias.copy_(torch.tensor([0.3, 0.1, -0.2]))
    model.eval()
    x, y = _data()
    report = collect_class_activations(model, [(x, y)], num_classes=4, hook_point="bn")
    with torch.no_grad():
        bn_out = model.bn_b(model.conv_b(model.bn_a(model.conv_a(x))))
    expected = torch.relu(bn_out).mean(dim=(2, 3)).double()
    for k in range(3):
        np.testing.assert_allclose(report.sums["conv_b"][k], expected[y == k].sum(0).numpy(), rtol=1e-6)
    conv_report = collect_class_activations(model, [(x, y)], num_classes=4, hook_point="conv")
    assert not np.allclose(conv_report.sums["conv_b"], report.sums["conv_b"])


def test_bn_hook_point_rejects_a_conv_without_batchnorm():
    model = TwoConv()  # conv_a feeds conv_b directly, no BN
    x, y = _data()
    with pytest.raises(ValueError, match="conv_a.*not directly consumed by a BatchNorm2d"):
        collect_class_activations(model, [(x, y)], num_classes=4, hook_point="bn")


def test_streaming_batch_size_does_not_matter_and_merge_is_exact():
    model = build_model("small_cnn", 5)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(60, 1, 8, 8, generator=g)
    y = torch.randint(0, 5, (60,), generator=g)
    whole = collect_class_activations(model, DataLoader(TensorDataset(x, y), batch_size=60), 5)
    small = collect_class_activations(model, DataLoader(TensorDataset(x, y), batch_size=1), 5)
    for name in whole.sums:
        np.testing.assert_allclose(small.sums[name], whole.sums[name], rtol=1e-5, atol=1e-6)
    # two "sites" with unequal sizes: merged means equal the pooled means (count-weighted, not a mean of means)
    a = collect_class_activations(model, [(x[:10], y[:10])], 5)
    b = collect_class_activations(model, [(x[10:], y[10:])], 5)
    merged = merge_reports([a, b])
    np.testing.assert_array_equal(merged.counts, whole.counts)
    for name in whole.sums:
        np.testing.assert_allclose(merged.means()[name], whole.means()[name], rtol=1e-5, atol=1e-6)


def test_max_batches_and_model_state_restored():
    model = build_model("small_cnn", 3)
    model.train()
    model.features[1].eval()  # a mixed train/eval state must come back exactly
    x = torch.rand(30, 1, 8, 8)
    y = torch.randint(0, 3, (30,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = collect_class_activations(model, DataLoader(TensorDataset(x, y), batch_size=10), 3, max_batches=2)
    assert int(report.counts.sum()) == 20
    assert model.training and not model.features[1].training and model.features[4].training
    for k, v in model.state_dict().items():  # eval mode: BN running stats untouched
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_removed_and_mode_restored_on_error():
    model = build_model("small_cnn", 3).train()

    def bad_loader():
        yield torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        collect_class_activations(model, bad_loader(), 3)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_dict_round_trip_uses_plain_types_and_is_small():
    model = build_model("resnet20", 10)
    x = example_input(model, 8)
    report = collect_class_activations(model, [(x, torch.arange(8))], 10)
    d = report.to_dict()
    assert isinstance(d["counts"], np.ndarray) and isinstance(d["hook_point"], str)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in d["sums"].values())
    back = ClassActivationReport.from_dict(d)
    assert back.layer_names == report.layer_names
    for name in report.sums:
        np.testing.assert_array_equal(back.sums[name], report.sums[name])
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.nbytes < 0.07 * model_bytes  # float64 sums: ~5.8 % of ResNet20's float32 weights
    d32 = report.to_dict(sums_dtype="float32")
    payload = sum(v.nbytes for v in d32["sums"].values()) + d32["counts"].nbytes
    assert payload < 0.05 * model_bytes
    back32 = ClassActivationReport.from_dict(d32)
    assert back32.sums["conv1"].dtype == np.float64
    np.testing.assert_allclose(back32.sums["conv1"], report.sums["conv1"], rtol=1e-6)


def test_validate_report_accepts_good_and_names_each_problem():
    model = build_model("small_cnn", 4)
    expected = conv_channels(model)
    report = collect_class_activations(model, [(torch.rand(8, 1, 8, 8), torch.arange(8) % 4)], 4)
    assert validate_report(report.to_dict(), expected, 4).layer_names == report.layer_names

    def variant(**changes):
        d = report.to_dict()
        d["sums"] = dict(d["sums"])
        for k, v in changes.items():
            if k.startswith("sum:"):
                if v is None:
                    d["sums"].pop(k[4:])
                else:
                    d["sums"][k[4:]] = v
            else:
                d[k] = v
        if "layers" not in changes:
            d["layers"] = list(d["sums"])
        return d

    first = report.layer_names[0]
    cases = [
        (variant(**{f"sum:{first}": None}), "missing"),
        (variant(**{"sum:extra.conv": np.zeros((4, 3))}), "unexpected"),
        (variant(**{f"sum:{first}": np.zeros((4, 5))}), "expected sums of shape"),
        (variant(**{f"sum:{first}": np.full((4, 16), np.nan)}), "NaN"),
        (variant(**{f"sum:{first}": np.full((4, 16), -1.0)}), "non-negative"),
        (variant(counts=np.array([1, -1, 2, 3])), "non-negative"),
        (variant(counts=np.array([1.5, 1, 2, 3])), "integers"),
        (variant(counts=np.array([1, 2, 3])), "shape"),
        (variant(hook_point="relu"), "hook_point"),
        ({"sums": {}}, "missing key"),
        ("not a dict", "must be a dict"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            validate_report(bad, expected, 4)
    with pytest.raises(ValueError, match="shape"):
        validate_report(report, expected, 5)  # wrong number of classes


def test_bad_model_and_labels():
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        collect_class_activations(
            nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), [(torch.rand(2, 4), torch.tensor([0, 1]))], 2
        )
    model = build_model("small_cnn", 3)
    with pytest.raises(ValueError, match=r"label 3 is outside \[0, 3\)"):
        collect_class_activations(model, [(torch.rand(2, 1, 8, 8), torch.tensor([0, 3]))], 3)
    with pytest.raises(ValueError, match="label -1"):
        collect_class_activations(model, [(torch.rand(2, 1, 8, 8), torch.tensor([-1, 0]))], 3)
    with pytest.raises(ValueError, match="integer class ids"):
        collect_class_activations(model, [(torch.rand(2, 1, 8, 8), torch.tensor([0.0, 1.0]))], 3)
    with pytest.raises(ValueError, match="hook_point"):
        collect_class_activations(model, [], 3, hook_point="relu")
    with pytest.raises(ValueError, match="num_classes"):
        collect_class_activations(model, [], 1)


def test_merge_rejects_mismatched_reports():
    a = ClassActivationReport({"c": np.ones((3, 2))}, np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="at least one"):
        merge_reports([])
    with pytest.raises(ValueError, match="different layers"):
        merge_reports([a, ClassActivationReport({"d": np.ones((3, 2))}, np.array([1, 1, 1]))])
    with pytest.raises(ValueError, match="hook_point"):
        merge_reports([a, ClassActivationReport({"c": np.ones((3, 2))}, np.array([1, 1, 1]), hook_point="bn")])
    with pytest.raises(ValueError, match="shape"):
        merge_reports([a, ClassActivationReport({"c": np.ones((3, 4))}, np.array([1, 1, 1]))])


def test_clip_bounds_each_image_before_summing():
    """clip=B caps every image's pooled activation at B before the sum (the DP sensitivity needs per-image clipping)."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 4)
    x, y = torch.rand(12, 1, 8, 8) * 5, torch.arange(12) % 4
    plain = collect_class_activations(model, [(x, y)], 4)
    bound = float(np.median(np.concatenate([s.ravel() / 3 for s in plain.sums.values()])))
    clipped = collect_class_activations(model, [(x, y)], 4, clip=bound)
    # The per-image reference: clip each image's pooled vector, then sum (clipping a sum would differ).
    for i in range(12):
        one = collect_class_activations(model, [(x[i : i + 1], y[i : i + 1])], 4)
        for name, s in one.sums.items():
            one.sums[name] = np.minimum(s, bound)
        if i == 0:
            ref = {n: s.copy() for n, s in one.sums.items()}
        else:
            for n in ref:
                ref[n] += one.sums[n]
    for name in plain.sums:
        # batch vs single-image float32 conv kernels round differently
        np.testing.assert_allclose(clipped.sums[name], ref[name], rtol=1e-5, atol=1e-7)
        assert np.all(clipped.sums[name] <= bound * clipped.counts[:, None] + 1e-9)
    assert any(np.any(plain.sums[n] > clipped.sums[n] + 1e-9) for n in plain.sums), "the bound must bite somewhere"
    np.testing.assert_array_equal(plain.counts, clipped.counts)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="clip"):
            collect_class_activations(model, [(x, y)], 4, clip=bad)
