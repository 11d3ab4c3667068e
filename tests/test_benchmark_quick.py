"""End-to-end smoke run of the unlearning benchmark (quick mode, tiny rounds): the CI smoke step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_end_to_end(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "unlearning_benchmark.py"), "--mode", "quick",
           "--pretrain-rounds", "6", "--retrain-rounds", "6", "--ft-rounds", "2", "--threads", "1",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "unlearning_quick_digits_small_cnn_f9.json"
    report = json.loads(out.read_text())
    assert report["complete"] is True
    run = report["runs"][0]
    res = run["results"]
    assert set(res) == {"original", "retrain", "finetune", "row_reset", "fisher", "prune", "prune_reinit",
                        "prune_deep"}
    assert res["retrain"]["tests"]["accuracy"]["u_acc"] == 0.0  # never saw the class
    assert len(res["retrain"]["history"]) == 6 and len(res["prune"]["history"]) == 2
    assert res["prune"]["params_after_prepare"] < res["finetune"]["params_after_prepare"]
    for name, r in res.items():
        t = r["tests"]
        assert 0.0 <= t["probe"]["auc"] <= 1.0 and 0.0 <= t["mia"]["loss"]["power_accuracy"] <= 1.0
        if name not in ("original", "retrain"):
            assert set(r["quality"]) == {"r_acc_within_1pt", "u_acc_le_1pct", "relearn_no_faster",
                                         "probe_no_more_separable"}
            assert r["cost"]["bytes_total"] > 0 and r["cost"]["wall_s_total"] > 0
    assert res["prune"]["cost"]["wall_s"]["activation"] > 0
    md = (tmp_path / "unlearning_quick_digits_small_cnn_f9.md").read_text()
    assert "| prune |" in md and "probe AUC" in md
    assert (tmp_path / "unlearning_quick_digits_small_cnn_f9_q0.1_s0.png").stat().st_size > 0
    # second run reuses the cached pretrained model
    proc2 = subprocess.run(cmd + ["--methods", "finetune"], capture_output=True, text=True, timeout=900)
    assert proc2.returncode == 0 and "loaded from cache" in proc2.stdout


@pytest.mark.slow
@pytest.mark.data
def test_variant_flags_run_end_to_end_at_tiny_size(cifar_root: Path, tmp_path: Path) -> None:
    """VGG11 on the CIFAR-100 subset, three forget classes in sequence and two bias values, in one tiny call:
    every variant flag of the issue runs through pretraining, pruning, fine-tuning and the forgetting tests."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "unlearning_benchmark.py"), "--mode", "full",
           "--dataset", "cifar100", "--model", "vgg11", "--forget", "0,5,9", "--q", "0.45,1.0",
           "--data-root", str(cifar_root), "--train-images", "1500", "--sites", "4", "--clients-per-round", "2",
           "--pretrain-rounds", "1", "--retrain-rounds", "1", "--ft-rounds", "1", "--eval-n", "300",
           "--mia-n", "100", "--probe-train-n", "1000", "--relearn-max-steps", "4", "--relearn-eval-every", "2",
           "--fisher-images", "20", "--methods", "retrain,finetune,prune", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "unlearning_full_cifar100_vgg11_f0+5+9.json").read_text())
    assert report["complete"] is True and [r["q"] for r in report["runs"]] == [0.45, 1.0]
    for run in report["runs"]:
        prune = run["results"]["prune"]
        assert [s["forget_class"] for s in prune["prepare_info"]["steps"]] == [0, 5, 9]
        assert prune["params_after_prepare"] < run["results"]["finetune"]["params_after_prepare"]
        assert set(prune["tests"]["probe"]["control_auc"]) and prune["tests"]["probe"]["n_test"] == 10000
