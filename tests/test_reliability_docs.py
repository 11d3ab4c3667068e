"""docs/reliability.md's measured tables are generated from the committed JSON (benchmarks/render_reliability.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "render_reliability.py"


def test_reliability_docs_match_the_committed_json() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_render_detects_a_hand_edited_table(tmp_path: Path) -> None:
    doc = tmp_path / "reliability.md"
    text = (REPO / "docs" / "reliability.md").read_text()
    start = text.index("<!-- generated:finetune -->")
    doc.write_text(text[:start] + text[start:].replace("| median (default) |", "| median (edited) |", 1))
    check = [sys.executable, str(SCRIPT), "--check", "--doc", str(doc)]
    proc = subprocess.run(check, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "out of date" in proc.stdout
    assert subprocess.run([sys.executable, str(SCRIPT), "--doc", str(doc)], timeout=300).returncode == 0
    assert "(edited)" not in doc.read_text()
    assert subprocess.run(check, capture_output=True, timeout=300).returncode == 0
