"""The renderers every benchmark shares: number formats, markdown tables, generated docs blocks and plots.

A table of docs/*.md that holds measured numbers sits between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` and is rebuilt from a committed result file; the block syntax, how a block is
replaced and what ``--check`` prints are written here once for every page.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks.harness import command_now
from nvflare_unlearn import _io


# ------------------------------------------------------------------------------------------------ numbers
def pct(v: float | None) -> str:
    """A share as a percentage with two decimals (``n/a`` when not measured)."""
    return "n/a" if v is None else f"{100 * v:.2f}%"


def num(v: float | None, fmt: str) -> str:
    """n/a for a number this run did not measure (e.g. the probe control, added after the H100 run)."""
    return "n/a" if v is None else format(v, fmt)


def fixed(v: Any, digits: int = 3, as_pct: bool = False) -> str:
    """``v`` with ``digits`` decimals, or as a percentage with ``digits - 2`` decimals."""
    if v is None:
        return "n/a"
    return f"{100 * v:.{max(0, digits - 2)}f}" if as_pct else f"{v:.{digits}f}"


def ci(e: dict[str, Any], digits: int = 3, as_pct: bool = False) -> str:
    """mean [low, high] (t-interval over seeds), or the mean alone with one seed."""
    if e.get("mean") is None:
        return "n/a" + (f" ({e['missing']} not reached)" if e.get("missing") else "")
    s = fixed(e["mean"], digits, as_pct)
    if e.get("low") is not None:
        s += f" [{fixed(e['low'], digits, as_pct)}, {fixed(e['high'], digits, as_pct)}]"
    if e.get("missing"):
        s += f" ({e['missing']} n/a)"
    return s


# ------------------------------------------------------------------------------------------------ tables
def provenance(report: dict[str, Any], machine: str, files: str, wall_note: str = "") -> list[str]:
    """The bullet points a results block opens with: the command (in today's form, ``harness.command_now``), the
    machine with the date and wall time of the run, and its files."""
    run = "complete" if report.get("complete") else "INCOMPLETE"
    wall = f"{report['wall_s']:.0f} s wall ({report['wall_s'] / 60:.1f} min){wall_note}"
    return [
        f"- Command: `{command_now(report['command'])}`",
        f"- Machine: {machine}; generated {report['generated_utc']}; {run} run, {wall}.",
        f"- Files: {files}",
        "",
    ]


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    """A markdown table (header row, rule, one line per row) and the blank line after it."""
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def column_table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> list[str]:
    """A markdown table: one row per result row, one column per (header, cell writer)."""
    return table([h for h, _ in columns], ([cell(r) for _, cell in columns] for r in rows))


# ------------------------------------------------------------------------------------------------ docs blocks
def block_names(text: str, pattern: str = r"[A-Za-z0-9_+.:-]+") -> list[str]:
    """The names of the generated blocks opened in ``text``."""
    return re.findall(rf"<!-- generated:({pattern}) -->", text)


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated:{re.escape(name)} -->\n)(.*?)(<!-- /generated:{re.escape(name)} -->)", re.S)


def has_block(text: str, name: str) -> bool:
    """Whether ``text`` holds the block ``name``, opened and closed."""
    return _block(name).search(text) is not None


def replace_block(text: str, name: str, lines: list[str]) -> str:
    """``text`` with the body of block ``name`` replaced by ``lines``; a block not opened and closed is an error."""
    pattern = _block(name)
    if not pattern.search(text):
        raise ValueError(f"block {name!r} is not in the page, or has no closing <!-- /generated:{name} --> marker")
    body = "\n".join(lines).rstrip("\n") + "\n"
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text)


def check_or_write(doc: Path, old: str, new: str, check: bool, command: str) -> int:
    """``--check``: exit status 1 (and say how to fix it) when the page differs from what the JSON gives;
    otherwise rewrite the page (atomically) when it changed."""
    if check:
        if new != old:
            print(f"{doc} is out of date with benchmarks/results/: run {command}")
            return 1
        print(f"{doc}: generated blocks match the JSON")
        return 0
    if new != old:
        _io.write_text(doc, new)
    print(f"rewrote the generated blocks of {doc}" if new != old else f"{doc} was up to date")
    return 0


# ------------------------------------------------------------------------------------------------ plots
def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """The figure as a PNG at ``path``, written atomically, then closed."""
    fig.tight_layout()
    _io.write_with(path, lambda fh: fig.savefig(fh, dpi=dpi, format="png"))
    pyplot().close(fig)
