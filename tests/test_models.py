"""Model factory: every registered architecture builds, runs, is prunable, and small_cnn learns digits fast."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from core_helpers import class_accuracy, digits_tensors, train

from nvflare_unlearn.models import MODEL_NAMES, build_model, example_input, input_shape, model_name_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_and_runs(name):
    model = build_model(name, 7).eval()
    x = example_input(name, batch=2)
    assert tuple(x.shape[1:]) == input_shape(name)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    assert model_name_of(model) == name
    assert torch.equal(example_input(model, 2), x)  # deterministic, same shape from name or model


def test_paper_sizes_and_option_b_shortcuts():
    counts = {n: sum(p.numel() for p in build_model(n, 10).parameters()) for n in ("resnet20", "resnet56")}
    # He et al.: 0.27M and 0.85M parameters (option B adds two small 1x1 convs)
    assert 0.26e6 < counts["resnet20"] < 0.28e6 and 0.84e6 < counts["resnet56"] < 0.87e6
    m = build_model("resnet20", 10)
    for stage in (m.layer2, m.layer3):
        sc = stage[0].shortcut
        assert isinstance(sc[0], nn.Conv2d) and sc[0].kernel_size == (1, 1) and isinstance(sc[1], nn.BatchNorm2d)
    assert len(m.layer1[0].shortcut) == 0  # identity where shapes match
    n_convs = sum(isinstance(x, nn.Conv2d) for x in build_model("vgg11", 10).modules())
    assert n_convs == 8 and sum(isinstance(x, nn.BatchNorm2d) for x in build_model("vgg11", 10).modules()) == 8


def test_small_cnn_is_input_size_agnostic_and_takes_in_channels():
    m = build_model("small_cnn", 10, in_channels=3).eval()
    assert tuple(example_input(m).shape) == (1, 3, 32, 32)
    with torch.no_grad():
        assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
        assert m(torch.rand(2, 3, 8, 8)).shape == (2, 10)
    assert tuple(example_input(build_model("small_cnn", 10)).shape) == (1, 1, 8, 8)
    assert build_model("resnet20", 10, in_channels=1).conv1.in_channels == 1


def test_small_cnn_trains_to_over_90_percent_on_digits_in_seconds():
    xtr, ytr, xte, yte = digits_tensors()
    start = time.perf_counter()
    model = train(build_model("small_cnn", 10), xtr, ytr)
    elapsed = time.perf_counter() - start
    acc = class_accuracy(model, xte, yte).mean()
    print(f"small_cnn on digits: {acc:.3f} test accuracy after {elapsed:.1f}s of training")
    assert acc > 0.90


@pytest.mark.parametrize(
    "args, match",
    [
        (("resnet18", 10), "unknown model name 'resnet18'; known models: resnet20, resnet32"),
        ((None, 10), "unknown model name"),
        (("resnet20", 1), "num_classes"),
        (("resnet20", 2.5), "num_classes"),
        (("resnet20", 10, 0), "in_channels"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_model(*args)


def test_example_input_errors():
    with pytest.raises(ValueError, match="example_inputs"):
        example_input(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="unknown model name"):
        example_input("alexnet")
    with pytest.raises(ValueError, match="batch"):
        example_input("resnet20", 0)


def test_package_exports_and_import_stays_light():
    code = (
        "import sys, nvflare_unlearn as nu;"
        "names = ['collect_class_activations', 'ClassActivationReport', 'merge_reports', 'tfidf_scores',"
        " 'build_pruning_plan', 'PruningPlan', 'apply_pruning_plan', 'save_checkpoint', 'load_checkpoint',"
        " 'build_model', 'unlearn_centralized'];"
        "missing = [n for n in names if not hasattr(nu, n)];"
        "assert not missing, missing; assert nu.__version__ == '0.1.0';"
        "assert 'nvflare' not in sys.modules, 'importing nvflare_unlearn pulled in nvflare'"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "name",
    [
        "nvflare_unlearn.models.small_cnn:SmallCNN@1x60000x60000",  # 3.6e9 values: refused before anything is built
        "nvflare_unlearn.models.small_cnn:SmallCNN@5000x8x8",
        "nvflare_unlearn.models.small_cnn:SmallCNN@1x" + "9" * 5000 + "x8",
        "pkg.mod:f" + "x" * 100_000,
    ],
)
def test_input_shapes_and_names_are_bounded(name):
    start = time.perf_counter()
    with pytest.raises(ValueError) as exc:
        input_shape(name)
    assert len(str(exc.value)) < 400 and time.perf_counter() - start < 1.0
    with pytest.raises(ValueError):
        build_model("small_cnn", 10, in_channels=10**6)
