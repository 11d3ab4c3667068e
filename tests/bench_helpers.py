"""What the benchmark tests share: running a benchmark as its users do (``python -m benchmarks.<name>`` from the
repository root) and checking that a docs renderer notices a hand-edited table and puts it right."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<name> args...`` in the repository root, output captured."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_renderer_restores_an_edited_table(renderer: str, page: str, block: str, old: str, new: str, tmp: Path):
    """Edit ``old`` into ``new`` inside the generated block ``block`` of docs/``page``: ``--check`` must fail and say
    the page is out of date, a rewrite must remove the edit, and the rewritten page must pass ``--check``."""
    doc = tmp / page
    text = (REPO / "docs" / page).read_text()
    start = text.index(f"<!-- generated:{block} -->")
    doc.write_text(text[:start] + text[start:].replace(old, new, 1))
    assert new in doc.read_text()
    proc = run_benchmark(renderer, "--check", "--doc", str(doc))
    assert proc.returncode == 1 and "out of date" in proc.stdout, proc.stdout + proc.stderr
    assert run_benchmark(renderer, "--doc", str(doc)).returncode == 0
    assert new not in doc.read_text()
    assert run_benchmark(renderer, "--check", "--doc", str(doc)).returncode == 0


def renderer_tests(renderer: str, page: str, block: str, old: str, new: str) -> tuple[Callable, Callable]:
    """The two tests of a docs renderer: the committed page matches the committed JSON (``--check``), and a table
    edited by hand in block ``block`` (``old`` -> ``new``) is caught and put right."""

    def test_page_matches_the_committed_json() -> None:
        proc = run_benchmark(renderer, "--check")
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_renderer_restores_a_hand_edited_table(tmp_path: Path) -> None:
        assert_renderer_restores_an_edited_table(renderer, page, block, old, new, tmp_path)

    return test_page_matches_the_committed_json, test_renderer_restores_a_hand_edited_table
