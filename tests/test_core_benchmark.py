"""benchmarks.core_costs in a tiny mode on the real CIFAR-10 data (slow: end-to-end)."""

from __future__ import annotations

import json

import pytest
from bench_helpers import run_benchmark


@pytest.mark.slow
@pytest.mark.data
def test_core_costs_tiny_run_writes_consistent_outputs(cifar_root, tmp_path):
    out = tmp_path / "results"
    args = ["--data", str(cifar_root), "--images", "256", "--repeats", "1", "--prune-repeats", "1"]
    args += ["--stats-images", "128", "--out", str(out)]
    proc = run_benchmark("core_costs", *args, timeout=540)  # below pytest's 600 s
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "core_costs.json").read_text())
    a, b = r["resnet20"], r["resnet56"]
    assert r["settings"]["images"] == 256 and a["train_steps"] == 2  # 256 images / batch 128
    assert a["activation_pass_s"] > 0 and a["train_epoch_s"] > 0
    assert a["act_vs_epoch_ratio"] == pytest.approx(a["activation_pass_s"] / a["train_epoch_s"])
    # ResNet20 has 19 convs: the report holds [10, C] float64 per conv plus 10 int64 counts
    assert a["conv_layers"] >= 19 and a["report_bytes"] % 8 == 0 and a["report_bytes"] > 10 * 16 * 8
    assert a["report_vs_model_bytes"] == pytest.approx(a["report_bytes"] / a["model_bytes"])
    assert b["params_after"] < b["params_before"]
    assert b["total_s"] == pytest.approx(b["tfidf_s"] + b["plan_s"] + b["apply_s"], rel=1e-6)
    assert set(r["checks"]) == set(r["targets"])
    md = (out / "core_costs.md").read_text()
    assert "--images 256" in md and "activation pass / training epoch" in md
    assert (out / "core_costs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
