"""benchmarks.nvflare_overhead: the docs table comes from the committed JSON, and the script runs end to end
(tiny digits mode, slow)."""

from __future__ import annotations

import json

import pytest
from bench_helpers import REPO, run_benchmark

from benchmarks import nvflare_overhead


def test_core_benchmark_doc_block_is_generated_from_the_committed_json():
    rep = json.loads((REPO / "benchmarks" / "results" / "nvflare_overhead.json").read_text())
    text = (REPO / "docs" / "core-benchmark.md").read_text()
    block = text.split(f"<!-- generated:{nvflare_overhead.BLOCK} -->\n", 1)[1].split("<!-- /generated:", 1)[0]
    assert block == "\n".join(nvflare_overhead.table(rep)) + "\n", (
        "docs/core-benchmark.md differs from the JSON: python -m benchmarks.nvflare_overhead --render-only"
    )
    for run in rep["runs"]:
        assert run["nvflare"]["seconds"] > 0 and run["in_process"]["seconds"] > 0
        # the two sides did the same work: the same model before and after, the same accuracy to a sample or two
        assert run["nvflare"]["original"]["r_acc"] == pytest.approx(run["in_process"]["original"]["r_acc"], abs=0.01)


@pytest.mark.slow
@pytest.mark.sim
@pytest.mark.timeout(1200)
def test_the_benchmark_runs_both_sides_and_writes_json_and_markdown(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        f"x\n<!-- generated:{nvflare_overhead.BLOCK} -->\nold\n<!-- /generated:{nvflare_overhead.BLOCK} -->\n"
    )
    args = ["--dataset", "digits", "--model", "small_cnn", "--train-subset", "400", "--rounds", "1", "--repeats", "1"]
    proc = run_benchmark("nvflare_overhead", *args, "--out", str(tmp_path), "--doc", str(doc), timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "nvflare_overhead.json").read_text())
    (run,) = rep["runs"]
    assert run["nvflare"]["tasks"] == 5 and run["in_process"]["phases"]["train"] > 0
    assert run["nvflare"]["original"] == pytest.approx(
        {k: run["in_process"]["original"][k] for k in ("u_acc", "r_acc")}, abs=0.01
    )
    assert "| **best / best** |" in (tmp_path / "nvflare_overhead.md").read_text()
    assert "old" not in doc.read_text() and "| **best / best** |" in doc.read_text()
