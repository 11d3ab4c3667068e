"""Checkpoints: weights + plan JSON rebuild from the model factory alone; safe loading; clear errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nvflare_unlearn.method.checkpoint import load_checkpoint, save_checkpoint
from nvflare_unlearn.method.graph import conv_channels
from nvflare_unlearn.method.prune import apply_pruning_plan, masked_plan
from nvflare_unlearn.method.selection import build_pruning_plan
from nvflare_unlearn.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pruned(name="resnet20", mode="remove", seed=0):
    model = build_model(name, 10)
    rng = np.random.default_rng(seed)
    plan = build_pruning_plan(model, {n: rng.random(c) for n, c in conv_channels(model).items()}, 0.1, forget_class=2)
    with torch.no_grad():  # non-default weights so a bad load would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return apply_pruning_plan(model, plan, mode=mode).eval(), plan


def test_round_trip_rebuilds_from_factory_and_plan(tmp_path):
    model, plan = _pruned()
    path = save_checkpoint(tmp_path / "m.pt", model, plan, "resnet20", 10, extra={"rounds": 3, "note": "x"})
    raw = torch.load(path, weights_only=True)  # plain data only: safe to load
    assert isinstance(raw["plan"], str) and raw["prune_mode"] == "remove"
    loaded, plan2, meta = load_checkpoint(path)
    assert plan2 == plan
    assert meta == {
        "model_name": "resnet20",
        "num_classes": 10,
        "in_channels": 3,
        "prune_mode": "remove",
        "extra": {"rounds": 3, "note": "x"},
    }
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_mask_mode_and_unpruned_checkpoints(tmp_path):
    masked, plan = _pruned("small_cnn", mode="mask")
    save_checkpoint(tmp_path / "masked.pt", masked, plan, "small_cnn", 10)
    loaded, plan2, meta = load_checkpoint(tmp_path / "masked.pt")
    assert meta["prune_mode"] == "mask" and masked_plan(loaded) == plan
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), masked(x))
    plain = build_model("small_cnn", 10).eval()
    save_checkpoint(tmp_path / "plain.pt", plain, None, "small_cnn", 10)
    loaded, plan3, meta = load_checkpoint(tmp_path / "plain.pt")
    assert plan3 is None and meta["prune_mode"] == "none"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), plain(x))


def test_plain_state_dict_and_nvflare_layout(tmp_path):
    model = build_model("small_cnn", 10).eval()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save({"model": model.state_dict(), "train_conf": {"train": {"model": "x"}}}, tmp_path / "fl.pt")
    for f in ("sd.pt", "fl.pt"):
        with pytest.raises(ValueError, match="pass model_name and num_classes"):
            load_checkpoint(tmp_path / f)
        loaded, plan, meta = load_checkpoint(tmp_path / f, model_name="small_cnn", num_classes=10)
        assert plan is None and meta["prune_mode"] == "none"
        x = torch.rand(2, 1, 8, 8)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), model(x))
    with pytest.raises(ValueError, match="do not fit 'resnet20'"):
        load_checkpoint(tmp_path / "sd.pt", model_name="resnet20", num_classes=10)


def test_refuses_to_overwrite(tmp_path):
    model, plan = _pruned("small_cnn")
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, plan, "small_cnn", 10)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_checkpoint(path, model, plan, "small_cnn", 10)
    assert path.read_bytes() == before


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    model, plan = _pruned("small_cnn")
    good = save_checkpoint(tmp_path / "good.pt", model, plan, "small_cnn", 10)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
    # a plan that does not match the weights: swap in another plan's JSON
    data = torch.load(good, weights_only=True)
    other = build_pruning_plan(
        build_model("small_cnn", 10), {n: -np.arange(c, dtype=float) for n, c in plan.convs.items()}, 0.3
    )
    data["plan"] = other.to_json()
    torch.save(data, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="weights do not fit 'small_cnn' pruned by the stored plan"):
        load_checkpoint(tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="num_classes=10, but 5 was requested"):
        load_checkpoint(good, num_classes=5)
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="neither an nvflare_unlearn checkpoint nor a state_dict"):
        load_checkpoint(tmp_path / "dict.pt")


def test_save_errors(tmp_path):
    model, plan = _pruned("small_cnn")
    with pytest.raises(ValueError, match="model_name must be one of"):
        save_checkpoint(tmp_path / "a.pt", model, plan, "resnet18", 10)
    with pytest.raises(ValueError, match="num_classes"):
        save_checkpoint(tmp_path / "a.pt", model, plan, "small_cnn", 0)
    with pytest.raises(ValueError, match="plain data"):
        save_checkpoint(tmp_path / "a.pt", model, plan, "small_cnn", 10, extra={"obj": object()})
    with pytest.raises(ValueError, match="apply the whole plan"):
        save_checkpoint(tmp_path / "a.pt", build_model("small_cnn", 10), plan, "small_cnn", 10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "a.pt", model, plan, "small_cnn", 10)
    assert not (tmp_path / "a.pt").exists()
    masked, mplan = _pruned("small_cnn", mode="mask")
    with pytest.raises(ValueError, match="masked"):
        save_checkpoint(tmp_path / "b.pt", copy.deepcopy(masked), None, "small_cnn", 10)


# ----------------------------------------------------------------------------------------------- safe loading
PLANTED = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")  # a module that runs code at import

import torch.nn as nn


def build(num_classes=10):
    layers = [nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)]
    return nn.Sequential(*layers)


build.input_shape = (1, 8, 8)
"""


def _planted_checkpoint(tmp_path, monkeypatch, name: str = "planted_mod"):
    """A checkpoint whose model_name is an import path to a module that writes a file when imported."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / f"{name}.py").write_text(PLANTED.format(marker=str(marker)))
    good = save_checkpoint(tmp_path / "good.pt", build_model("small_cnn", 10), None, "small_cnn", 10)
    data = torch.load(good, weights_only=True)
    data["model_name"] = f"{name}:build"
    torch.save(data, tmp_path / "evil.pt")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "evil.pt", marker


def test_a_checkpoint_cannot_choose_a_module_to_import(tmp_path, monkeypatch):
    evil, marker = _planted_checkpoint(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="would import and run module 'planted_mod'") as exc:
        load_checkpoint(evil)
    assert "allow_import=['planted_mod']" in str(exc.value) and len(str(exc.value)) < 400
    assert not marker.exists(), "the planted module was imported"
    from nvflare_unlearn.cli import main

    assert main(["evaluate", "--ckpt", str(evil)]) == 2 and not marker.exists()
    # the caller may name it or allow-list it; then it is imported (and fails to load these weights)
    with pytest.raises(ValueError, match="weights do not fit"):
        load_checkpoint(evil, allow_import=["planted_mod"])
    assert marker.exists()


def test_verify_record_never_imports_a_module_named_by_the_file(tmp_path, monkeypatch):
    from nvflare_unlearn.protect.verify import verify_record

    evil, marker = _planted_checkpoint(tmp_path, monkeypatch, "planted_two")
    record = tmp_path / "r.json"
    record.write_text(
        '{"schema": "nvflare_unlearn.unlearning_record/1", "models": {"original": {"sha256": "0"}, '
        '"final": {"sha256": "0"}}, "plan": {"sha256": "0", "pruned_channels": {}}}'
    )
    result = verify_record(record, evil)
    assert not result.ok and any("would import and run module" in m for m in result.mismatches)
    assert not marker.exists()


def test_sizes_read_from_a_file_are_bounded(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", build_model("small_cnn", 10), None, "small_cnn", 10)
    for field, value, match in (
        ("num_classes", 10**9, "num_classes must be an integer in"),
        ("in_channels", 10**7, "in_channels must be an integer in"),
        ("in_channels", "3", "in_channels must be an integer in"),
        (
            "plan",
            '{"format": "nvflare_unlearn.pruning_plan", "version": 1, "convs": [], "groups": [], "steps": []}',
            "stored pruning plan is invalid",
        ),
        ("model_name", "x" * 100_000, "unknown model name"),
        ("model_name", "pkg.mod:build@1x60000x60000", "too large"),
    ):
        data = torch.load(good, weights_only=True)
        data[field] = value
        torch.save(data, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=match) as exc:
            load_checkpoint(tmp_path / "bad.pt", allow_import=["pkg"])
        assert len(str(exc.value)) < 600, field
    with pytest.raises(ValueError, match="allow_import"):
        load_checkpoint(good, allow_import="pkg")
