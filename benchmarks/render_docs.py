"""Regenerate the result tables of docs/benchmarks.md from the committed benchmark JSON.

Every table of measured numbers on that page sits between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` and is rebuilt here from a file under ``benchmarks/results/``; the prose around
the blocks is hand-written and quotes these tables. ``--check`` exits 1 when the page is out of date, so a test
keeps the docs and the JSON in step.

    python -m benchmarks.render_docs           # rewrite the generated blocks in place
    python -m benchmarks.render_docs --check   # fail if a block differs from what the JSON gives

Commands recorded by runs made when the benchmarks were scripts (``python benchmarks/X.py``) are shown in today's
form (``python -m benchmarks.X``, ``harness.command_now``), the one that runs them again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import fedsim_faithfulness as ff
from benchmarks import forgetting_goals, forgetting_tables
from benchmarks import unlearning_tables as ub  # the benchmark's own table writers: one definition of a table
from benchmarks.harness import REPO_ROOT, RESULTS, parser
from benchmarks.render import block_names, check_or_write, has_block, pct, replace_block
from benchmarks.render import provenance as provenance_lines
from nvflare_unlearn.unlearning import all_methods, defaults

DOC = REPO_ROOT / "docs" / "benchmarks.md"
METHOD_DOC = REPO_ROOT / "docs" / "method.md"  # its table of methods comes from the registry

FULL_CPU = RESULTS / "unlearning_full_cifar10_resnet20_f9_cpu.json"
SEED_FILES = [
    FULL_CPU,
    RESULTS / "unlearning_full_cifar10_resnet20_f9_cpu_s1.json",
    RESULTS / "unlearning_full_cifar10_resnet20_f9_cpu_s2.json",
]
EQUAL_QUALITY = RESULTS / "unlearning_full_cifar10_resnet20_f9_cpu_equalq.json"
H100 = RESULTS / "unlearning_full_h100" / "unlearning_full_cifar10_resnet20_f9.json"
H100_SWEEP = RESULTS / "unlearning_full_h100" / "unlearning_full_cifar10_resnet20_f9_sweep.json"
CPU_RATIO02 = RESULTS / "unlearning_full_cifar10_resnet20_f9_cpu_ratio0.2.json"
QUICK_SEEDS = RESULTS / "unlearning_quick_digits_small_cnn_f9_seeds012.json"
FAITHFULNESS = RESULTS / "fedsim_faithfulness.json"
FORGETTING = RESULTS / "forgetting"  # forgetting_benchmark.py: one <setting>_f<forget>[_tag].json per run


def prune_ratio(options: dict) -> float:
    """R from a result's options: grouped ({"plan": {"prune_ratio": R}}) since 0.2, flat ({"ratio": R}) before."""
    return options["plan"]["prune_ratio"] if "plan" in options else options["ratio"]


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def provenance(report: dict[str, Any], path: Path) -> list[str]:
    """Command, machine, date and wall time of one benchmark report, as bullet points."""
    m = report["machine"]
    machine = f"{m['device_name']}, {m['threads']} torch thread(s), torch {m['torch']}"
    return provenance_lines(report, machine, f"`{_rel(path)}` and the `.md` / `.png` beside it.", " inside the script")


def paper_vs_ours(report: dict[str, Any]) -> list[str]:
    """The paper's Table 2 row beside our `prune` and `finetune` rows (first run of the report)."""
    p = report["paper_reference"]
    run = report["runs"][0]
    res = run["results"]
    orig = res["original"]["tests"]["accuracy"]
    re_ = res["retrain"]["tests"]["accuracy"]
    lines = [
        "| | raw U | raw R | after-pruned U | after-pruned R | fine-tuned U | fine-tuned R | retrained U "
        "| retrained R | rounds to quality (speedup) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| paper, Table 2 / Fig. 3 | {pct(p['raw']['u'])} | {pct(p['raw']['r'])} | "
        f"{pct(p['after_pruned']['u'])} | {pct(p['after_pruned']['r'])} | {pct(p['fine_tuned']['u'])} | "
        f"{pct(p['fine_tuned']['r'])} | {pct(p['retrained']['u'])} | {pct(p['retrained']['r'])} | "
        f"({p['speedup']}x) |",
    ]
    re_rounds = res["retrain"].get("rounds_to_quality")
    for name in ("prune", "finetune"):
        if name not in res:
            continue
        r = res[name]
        a, ap = r["tests"]["accuracy"], r.get("after_prepare", {})
        rq = r.get("rounds_to_quality")
        ratio = f"{rq} vs {re_rounds} ({r['speedup']}x)" if rq else "not reached"
        label = f"ours, `{name}`" + (f" (R = {prune_ratio(r['options'])})" if "options" in r else " (no pruning)")
        lines.append(
            f"| {label} | {pct(orig['u_acc'])} | {pct(orig['r_acc'])} | {pct(ap.get('u_acc'))} | "
            f"{pct(ap.get('r_acc'))} | {pct(a['u_acc'])} | {pct(a['r_acc'])} | {pct(re_['u_acc'])} | "
            f"{pct(re_['r_acc'])} | {ratio} |"
        )
    return lines + [""]


def wall_breakdown(report: dict[str, Any]) -> list[str]:
    """Where the wall time went: charged training / statistics seconds and forgetting-test seconds per phase."""
    lines = ["| phase | training + statistics s (charged) | forgetting tests s |", "|---|---|---|"]
    charged = tests = 0.0
    for run in report["runs"]:
        pre = run["pretrain"]
        c = 0.0 if pre.get("cached") else pre["cost"]["wall_s_total"]
        t = run["results"]["original"]["tests"].get("test_seconds", 0.0)
        lines.append(
            f"| pretrain (seed {run['seed']}){' (cached)' if pre.get('cached') else ''} | {c:.0f} "
            f"| {t:.0f} (original) |"
        )
        charged, tests = charged + c, tests + t
        for name, r in run["results"].items():
            if name == "original":
                continue
            c = 0.0 if r.get("cached") else r["cost"]["wall_s_total"]
            t = r["tests"].get("test_seconds", 0.0)
            lines.append(f"| {name}{' (cached)' if r.get('cached') else ''} | {c:.0f} | {t:.0f} |")
            charged, tests = charged + c, tests + t
    other = report["wall_s"] - charged - tests
    lines += [
        f"| per-round evaluation curves, data loading, plots | {other:.0f} | |",
        f"| **total** | **{report['wall_s']:.0f} s = {report['wall_s'] / 60:.1f} min** | |",
        "",
    ]
    return lines


def run_tables(report: dict[str, Any]) -> list[str]:
    """The benchmark's own per-run tables (Table 2 shape and forgetting tests), without the plot line."""
    out: list[str] = []
    for run in report["runs"]:
        out += [
            ("##### " + ln[3:]) if ln.startswith("## ") else ln
            for ln in ub.run_markdown(run, report["config"])
            if not ln.startswith("Curves:")
        ]
    return out


def _metric(r: dict[str, Any], key: str) -> float | None:
    t = r["tests"]
    v = {
        "R": t["accuracy"]["r_acc"],
        "U": t["accuracy"]["u_acc"],
        "probe": t["probe"]["auc"],
        "probe_gap": t["probe"].get("auc_minus_control"),
        "relearn": t["relearn"]["steps"],
        "rounds_q": r.get("rounds_to_quality"),
    }[key]
    return None if v is None else float(v)


def seeds_table(paths: list[Path], methods: tuple[str, ...] = ("retrain", "finetune", "prune")) -> list[str]:
    """Mean ± sd over independent seeds (each its own partition, pretraining and retraining), and the paired
    difference prune − finetune per seed: the comparison the issue asks about, with its spread."""
    reports = [(p, _load(p)) for p in paths if p.is_file()]
    runs = [run for _, rep in reports for run in rep["runs"]]
    seeds = [run["seed"] for run in runs]
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; files: " + ", ".join(f"`{_rel(p)}`" for p, _ in reports) + ".",
        "",
        "| method | n | R acc (%) | U acc (%) | rounds to quality | probe AUC | probe AUC minus retained "
        "| relearn steps |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ms(vals: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
        v = [scale * x for x in vals if x is not None]
        miss = len(vals) - len(v)
        if not v:
            return f"not reached ({miss} of {miss})" if miss else "n/a"
        s = f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}"
        return s + (f" ({miss} not reached)" if miss else "")

    for name in ("original", *methods):
        rs = [run["results"][name] for run in runs if name in run["results"]]
        if not rs:
            continue
        rq = "" if name in ("original",) else ms([_metric(r, "rounds_q") for r in rs], digits=1)
        lines.append(
            f"| {name} | {len(rs)} | {ms([_metric(r, 'R') for r in rs], 100)} | "
            f"{ms([_metric(r, 'U') for r in rs], 100)} | {rq} | {ms([_metric(r, 'probe') for r in rs], digits=3)} | "
            f"{ms([_metric(r, 'probe_gap') for r in rs], digits=3)} | "
            f"{ms([_metric(r, 'relearn') for r in rs], digits=1)} |"
        )
    lines += [
        "",
        "Paired difference `prune` − `finetune` (same seed, same pretrained model):",
        "",
        "| seed | Δ R acc (points) | Δ rounds to quality | Δ probe AUC | Δ probe AUC minus retained "
        "| Δ relearn steps |",
        "|---|---|---|---|---|---|",
    ]
    diffs: dict[str, list[float]] = {}
    for run in runs:
        res = run["results"]
        if "prune" not in res or "finetune" not in res:
            continue
        row = [str(run["seed"])]
        for key, scale, digits in (
            ("R", 100, 2),
            ("rounds_q", 1, 0),
            ("probe", 1, 3),
            ("probe_gap", 1, 3),
            ("relearn", 1, 0),
        ):
            a, b = _metric(res["prune"], key), _metric(res["finetune"], key)
            if a is None or b is None:
                row.append(
                    "n/a"
                    if key != "rounds_q"
                    else f"prune {int(a) if a else 'not reached'}, finetune {int(b) if b else 'not reached'}"
                )
                continue
            diffs.setdefault(key, []).append(scale * (a - b))
            row.append(f"{scale * (a - b):+.{digits}f}")
        lines.append("| " + " | ".join(row) + " |")
    if diffs:
        lines.append(
            "| mean ± sd | "
            + " | ".join(
                f"{np.mean(diffs[k]):+.3f} ± {np.std(diffs[k]):.3f}" if k in diffs else "n/a"
                for k in ("R", "rounds_q", "probe", "probe_gap", "relearn")
            )
            + " |"
        )
    return lines + [""]


def quick_block() -> list[str]:
    rep = _load(QUICK_SEEDS)
    return provenance(rep, QUICK_SEEDS) + ub.aggregate_markdown(rep)[2:]


def full_cpu_block() -> list[str]:
    rep = _load(FULL_CPU)
    return (
        provenance(rep, FULL_CPU)
        + ["Where the time went:", ""]
        + wall_breakdown(rep)
        + ["The paper's Table 2 beside ours:", ""]
        + paper_vs_ours(rep)
        + run_tables(rep)
    )


def seeds_block() -> list[str]:
    return seeds_table(SEED_FILES)


def equal_quality_block() -> list[str]:
    rep = _load(EQUAL_QUALITY)
    lines = provenance(rep, EQUAL_QUALITY) + [
        "Fine-tune rounds each method ran before it stopped (the first round at retrain quality, or the cap):",
        "",
        "| method | rounds run | stopped at quality |",
        "|---|---|---|",
    ]
    for run in rep["runs"]:
        for name, r in run["results"].items():
            if name in ("original", "retrain"):
                continue
            n = len(r.get("history") or [])
            lines.append(f"| {name} | {n} | {'yes' if r.get('rounds_to_quality') == n else 'no (cap)'} |")
    return lines + [""] + run_tables(rep)


def h100_block() -> list[str]:
    rep = _load(H100)
    return provenance(rep, H100) + ["The paper's Table 2 beside ours:", ""] + paper_vs_ours(rep) + run_tables(rep)


def h100_sweep_block() -> list[str]:
    rep = _load(H100_SWEEP)
    return provenance(rep, H100_SWEEP) + run_tables(rep)


def cpu_ratio02_block() -> list[str]:
    rep = _load(CPU_RATIO02)
    return provenance(rep, CPU_RATIO02) + run_tables(rep)


def faithfulness_block() -> list[str]:
    return ff.markdown(_load(FAITHFULNESS), _rel(FAITHFULNESS))


def goal_sources(key: str) -> list[Path]:
    """The runs of one forget set: ``<setting>_f<forget>`` and every ``<setting>_f<forget>_<tag>``."""
    return sorted(p for p in FORGETTING.glob("*.json") if p.stem == key or p.stem.startswith(key + "_"))


def finished_runs(key: str) -> dict[str, dict[str, Any]]:
    """``{run name: report}`` of one forget set's finished runs (a run still going, or killed, is left out until
    ``--resume`` completes it)."""
    return {p.stem: report for p in goal_sources(key) if (report := _load(p)).get("complete")}


#: the forget sets the job's default method is chosen on (``unlearning.defaults``): CIFAR-10, every set
DEFAULT_RULE_SETS = {"cat": "c10_f3", "truck": "c10_f9", "0+5+9": "c10_f0+5+9"}


def evidence_text() -> str:
    """The job's default-method evidence (``unlearning.defaults.EVIDENCE_PATH``) from the CIFAR-10 runs: what the
    package's rule reads at run time, regenerated with the docs so the two cannot disagree."""
    sets = {label: finished_runs(key) for label, key in DEFAULT_RULE_SETS.items()}
    doc = {
        "generated_by": "python -m benchmarks.render_docs",
        "sources": {label: sorted(f"{_rel(FORGETTING)}/{name}.json" for name in runs) for label, runs in sets.items()},
        "sets": defaults.evidence_from_runs(sets),
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def methods_block() -> list[str]:
    """docs/method.md's table of the registered methods, from their declarations (``unlearning.all_methods()``)."""
    lines = [
        "| `method` | before fine-tuning | needs at the site | what a site minimises |",
        "|---|---|---|---|",
    ]
    for m in all_methods().values():
        needs = ["retained data"] + (["its forget-class images"] if m.uses_forget_data else [])
        needs.append("the teacher" if m.always_distils else 'the teacher with `recovery="kd"`')
        before = "the TF-IDF pruning plan from the sites' activation statistics" if m.prunes else "nothing"
        minimises = " ".join((type(m).__doc__ or m.summary).split())
        lines.append(f"| `{m.name}` | {before} | {', '.join(needs)} | {minimises} |")
    return lines + [""]


def default_rule_block() -> list[str]:
    """Which method the rule of ``unlearning.defaults.measured_defaults`` picks from the CIFAR-10 runs, and why."""
    return forgetting_goals.default_rule({label: finished_runs(key) for label, key in DEFAULT_RULE_SETS.items()})[0]


BLOCKS: dict[str, tuple[Callable[[], list[str]], list[Path]]] = {
    "faithfulness": (faithfulness_block, [FAITHFULNESS]),
    "full-cpu": (full_cpu_block, [FULL_CPU]),
    "seeds": (seeds_block, SEED_FILES),
    "equal-quality": (equal_quality_block, [EQUAL_QUALITY]),
    "h100": (h100_block, [H100]),
    "h100-sweep": (h100_sweep_block, [H100_SWEEP]),
    "cpu-ratio0.2": (cpu_ratio02_block, [CPU_RATIO02]),
    "quick": (quick_block, [QUICK_SEEDS]),
    "default-rule": (default_rule_block, [p for key in DEFAULT_RULE_SETS.values() for p in goal_sources(key)]),
}


def forgetting_block(stem: str) -> list[str]:
    """Every table of one forgetting_benchmark.py run (``<!-- generated:forgetting:<stem> -->``)."""
    path = FORGETTING / f"{stem}.json"
    return forgetting_tables.markdown(_load(path), _rel(path), level=4)


def forgetting_blocks(text: str) -> dict[str, tuple[Callable[[], list[str]], list[Path]]]:
    """A block per ``generated:forgetting:<stem>`` marker on the page: a new run's tables need only its marker."""
    stems = [n.split(":", 1)[1] for n in block_names(text) if n.startswith("forgetting:")]
    return {f"forgetting:{s}": (lambda s=s: forgetting_block(s), [FORGETTING / f"{s}.json"]) for s in stems}


def goal_block(key: str) -> list[str]:
    """Every method of the finished runs on one forget set against the goal."""
    return forgetting_goals.goal_table(finished_runs(key))


def goal_blocks(text: str) -> dict[str, tuple[Callable[[], list[str]], list[Path]]]:
    """A block per ``generated:goal:<setting>_f<forget>`` marker: every method run on that forget set, one table."""
    keys = [n.split(":", 1)[1] for n in block_names(text) if n.startswith("goal:")]
    return {f"goal:{k}": (lambda k=k: goal_block(k), goal_sources(k) or [FORGETTING / f"{k}.json"]) for k in keys}


def render(text: str) -> str:
    """`text` with every generated block present in it rebuilt from its JSON."""
    for name, (fn, sources) in {**BLOCKS, **forgetting_blocks(text), **goal_blocks(text)}.items():
        if not has_block(text, name):
            continue
        missing = [_rel(p) for p in sources if not p.is_file()]
        if missing and name != "seeds":
            raise SystemExit(f"docs block {name!r} needs {missing}; run the benchmark that writes it first")
        text = replace_block(text, name, fn())
    return text


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, full_help=False)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is out of date")
    ap.add_argument("--doc", default=str(DOC))
    args = ap.parse_args(argv)
    doc = Path(args.doc)
    old = doc.read_text()
    command = "python -m benchmarks.render_docs"
    evidence = defaults.EVIDENCE_PATH
    rc = check_or_write(evidence, evidence.read_text(), evidence_text(), args.check, command)
    page = METHOD_DOC.read_text()
    rc |= check_or_write(METHOD_DOC, page, replace_block(page, "methods", methods_block()), args.check, command)
    return check_or_write(doc, old, render(old), args.check, command) or rc


if __name__ == "__main__":
    raise SystemExit(main())
