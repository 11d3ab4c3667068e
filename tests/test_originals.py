"""The originals worth forgetting from (benchmarks.originals): committed records, fixture checkpoints that load and
match their SHA-256, and a headline original that really reaches 80 % on CIFAR-10's test set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.harness import command_now
from nvflare_unlearn import load_checkpoint

ORIGINALS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "originals"
RECORDS = sorted(ORIGINALS.glob("*.json"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_records_name_their_command_seed_and_checkpoint_digest():
    if not RECORDS:
        pytest.skip(f"no originals recorded in {ORIGINALS} yet")
    for path in RECORDS:
        rec = json.loads(path.read_text())
        # runs made when the benchmarks were scripts recorded "python benchmarks/originals.py": the same command
        assert rec["name"] == path.stem and command_now(rec["command"]).startswith(
            "python -m benchmarks.originals --only "
        )
        assert len(rec["checkpoint"]["sha256"]) == 64 and rec["history"], path.name
        if rec["kind"] == "retrain":
            assert rec["test"]["u_acc"] == 0.0, f"{path.name}: a model retrained without the class predicts it"


def test_the_headline_original_is_worth_forgetting_from():
    path = ORIGINALS / "c10_original_f-_s0.json"
    if not path.is_file():
        pytest.skip("the c10 original is not recorded yet")
    rec = json.loads(path.read_text())
    assert rec["test"]["acc"] >= 0.80 and rec["config"]["dataset"] == "cifar10"
    assert rec["config"]["model"] == "resnet20" and len(rec["test"]["class_acc"]) == 10


def _with_checkpoint(path: Path) -> bool:
    return (ORIGINALS / json.loads(path.read_text())["checkpoint"]["file"]).is_file()


@pytest.mark.parametrize("path", [p for p in RECORDS if _with_checkpoint(p)], ids=lambda p: p.stem)
def test_fixture_checkpoints_match_their_digest_and_load(path):
    """Checkpoints kept in the repository load with this version's loader (the on-disk format is stable)."""
    rec = json.loads(path.read_text())
    ckpt = ORIGINALS / rec["checkpoint"]["file"]
    assert _sha256(ckpt) == rec["checkpoint"]["sha256"]
    model, plan, meta = load_checkpoint(ckpt)
    assert plan is None and meta["num_classes"] == len(rec["test"]["class_acc"])


@pytest.mark.data
def test_the_headline_original_scores_its_recorded_accuracy(cifar_root):
    ckpt = ORIGINALS / "c10_original_f-_s0.pt"
    if not ckpt.is_file():
        pytest.skip("the c10 original checkpoint is not in the repository")
    from nvflare_unlearn.data import load_dataset
    from nvflare_unlearn.evaluation import as_tensors

    rec = json.loads((ORIGINALS / "c10_original_f-_s0.json").read_text())
    model, _, _ = load_checkpoint(ckpt)
    x, y = as_tensors(load_dataset("cifar10", root=str(cifar_root / "cifar10"), split="test"))
    with torch.no_grad():
        pred = torch.cat([model.eval()(x[i : i + 1000]).argmax(1) for i in range(0, len(y), 1000)])
    acc = float((pred == y).float().mean())
    assert acc == pytest.approx(rec["test"]["acc"], abs=2e-3) and acc >= 0.80
    assert np.isfinite(acc)


def test_a_killed_job_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Hours-long retrains survive a killed process: the job restarts from its last finished round and ends with
    the weights an uninterrupted run gives; a saved state from another configuration is refused, not continued."""
    from benchmarks import originals

    monkeypatch.setitem(originals.SETTINGS["digits"], "fed", {**originals.SETTINGS["digits"]["fed"], "rounds": 3})
    job = ("digits", "retrain", (9,), 0)
    straight = originals.run_job(*job, out=tmp_path / "straight", data_root=None)

    def killed_after_round_2(msg: str) -> None:
        if "round 2/3" in msg:
            raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(originals, "log", killed_after_round_2)
        with pytest.raises(KeyboardInterrupt):
            originals.run_job(*job, out=tmp_path / "killed", data_root=None)
    partial = tmp_path / "killed" / f"{originals.job_name(*job)}.partial.pt"
    assert partial.is_file() and not (tmp_path / "killed" / f"{originals.job_name(*job)}.json").exists()
    resumed = originals.run_job(*job, out=tmp_path / "killed", data_root=None)
    assert resumed["resumed_after_round"] == 2 and not partial.exists()
    assert [h["acc"] for h in resumed["history"]] == [h["acc"] for h in straight["history"]]
    a = torch.load(tmp_path / "straight" / straight["checkpoint"]["file"], weights_only=False)
    b = torch.load(tmp_path / "killed" / resumed["checkpoint"]["file"], weights_only=False)
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    torch.save({"fed": {"rounds": 99}, "state_dict": {}, "meter": {}, "history": []}, partial)
    with pytest.raises(ValueError, match="remove it to start over"):
        originals.load_partial(
            partial, originals.build_model("small_cnn", 10), originals.FedConfig(rounds=3, clients_per_round=4)
        )
