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
