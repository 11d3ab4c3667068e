"""End-to-end smoke run of the unlearning benchmark (quick mode, tiny rounds): the CI smoke step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_helpers import run_benchmark


@pytest.mark.slow
@pytest.mark.timeout(2400)  # two subprocess runs of up to 1100 s each; pytest's limit stays above them
def test_quick_benchmark_end_to_end(tmp_path: Path) -> None:
    args = ["--mode", "quick", "--pretrain-rounds", "6", "--retrain-rounds", "6", "--ft-rounds", "2", "--threads", "1"]
    args += ["--out", str(tmp_path)]
    proc = run_benchmark("unlearning_benchmark", *args, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "unlearning_quick_digits_small_cnn_f9.json"
    report = json.loads(out.read_text())
    assert report["complete"] is True
    run = report["runs"][0]
    res = run["results"]
    assert set(res) == {"original", "retrain", "finetune", "row_reset", "fisher", "prune", "prune_reinit", "prune_deep"}
    assert res["retrain"]["tests"]["accuracy"]["u_acc"] == 0.0  # never saw the class
    assert len(res["retrain"]["history"]) == 6 and len(res["prune"]["history"]) == 2
    assert res["prune"]["params_after_prepare"] < res["finetune"]["params_after_prepare"]
    for name, r in res.items():
        t = r["tests"]
        assert 0.0 <= t["probe"]["auc"] <= 1.0 and 0.0 <= t["mia"]["loss"]["power_accuracy"] <= 1.0
        if name not in ("original", "retrain"):
            assert set(r["quality"]) == {
                "r_acc_within_1pt",
                "u_acc_le_1pct",
                "relearn_no_faster",
                "probe_no_more_separable",
            }
            assert r["cost"]["bytes_total"] > 0 and r["cost"]["wall_s_total"] > 0
    assert res["prune"]["cost"]["wall_s"]["activation"] > 0
    md = (tmp_path / "unlearning_quick_digits_small_cnn_f9.md").read_text()
    assert "| prune |" in md and "probe AUC" in md
    assert (tmp_path / "unlearning_quick_digits_small_cnn_f9_q0.1_s0.png").stat().st_size > 0
    # second run reuses the cached pretrained model
    proc2 = run_benchmark("unlearning_benchmark", *args, "--methods", "finetune", timeout=1100)
    assert proc2.returncode == 0 and "loaded from cache" in proc2.stdout
