"""The forgetting benchmark's tables (``benchmarks.forgetting_benchmark``): its results page and, nested deeper, its
blocks of docs/benchmarks.md (``render_docs``), written once for both."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks import render
from benchmarks.forgetting_eval import METRICS, metrics_of
from benchmarks.harness import REPO_ROOT
from benchmarks.render import ci as _ci
from benchmarks.render import fixed as _f
from benchmarks.render import table

HEADLINE = (
    ("r_acc", 4, True),
    ("u_acc", 4, True),
    ("rounds_to_quality", 1, False),
    ("probe_auc", 3, False),
    ("probe_gap", 3, False),
    ("relearn_steps", 1, False),
    ("mia_forget_auc", 3, False),
    ("lira_auc", 3, False),
    ("lira_tpr", 3, False),
    ("feat_forget_auc", 3, False),
    ("kl_to_retrain", 4, False),
)


def _project_path(path: Path) -> str:
    """``path`` relative to the project folder holding it (a worktree writing into another checkout names the file as
    that checkout will), else to this one."""
    path = path.resolve()
    root = next((p for p in path.parents if (p / "pyproject.toml").is_file()), REPO_ROOT)
    return os.path.relpath(path, root)


def provenance(report: dict[str, Any], path: str) -> list[str]:
    m = report["machine"]
    machine = (
        f"CPU ({m['cpu_count']} cores, shared with other jobs: the CPU seconds in the Budget table are the steadier "
        f"cost), {m['platform']}, {m['threads']} torch thread(s), torch {m['torch']}"
    )
    return render.provenance(report, machine, f"`{path}` (+ `.md`, per-example arrays under `arrays/`).")


def models_table(report: dict[str, Any]) -> list[str]:
    """The original and the retrained references: what every method is measured against."""
    header = ["model", "test acc (all classes)", "R acc", "U acc", "train-subset acc", "training rounds"]
    rows = []
    for name, m in report["models"].items():
        a, cost = m["tests"]["accuracy"], m["training_cost"]
        accs = [_f(v, 4, True) for v in (m["test_acc"], a["r_acc"], a["u_acc"], m["train_subset_acc"])]
        rows.append(
            [name, *accs, str(cost["rounds"]), f"{cost['wall_s_total']:.0f}", f"`{m['checkpoint']['sha256'][:12]}…`"]
        )
    return table(header + ["training wall s", "checkpoint SHA-256"], rows)


def headline_table(report: dict[str, Any]) -> list[str]:
    """Every model's metrics with t-intervals over seeds, the retrain-vs-retrain floor as the last row."""
    labels = [METRICS[k][0] for k, _, _ in HEADLINE]
    lines = ["| model | n | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for name, m in report["models"].items():
        mt = metrics_of(m["tests"])
        lines.append(f"| {name} | 1 | " + " | ".join(_f(mt[k], d, p) for k, d, p in HEADLINE) + " |")
    ref = report.get("reference_summary")
    if ref:
        lines.append(
            f"| *retrain (references)* | {ref['r_acc']['n']} | "
            + " | ".join(_ci(ref[k], d, p) for k, d, p in HEADLINE)
            + " |"
        )
    for method, e in report.get("summary", {}).items():
        lines.append(
            f"| **{method}** | {len(e['seeds'])} | " + " | ".join(_ci(e[k], d, p) for k, d, p in HEADLINE) + " |"
        )
    fl = report.get("noise_floor", {})
    lines.append(
        "| *noise floor: max \\|Δ\\| retrain vs retrain* | "
        + str(fl.get("r_acc", {}).get("n", 0))
        + " | "
        + " | ".join(_f(fl.get(k, {}).get("max_abs_diff"), d, p) for k, d, p in HEADLINE)
        + " |"
    )
    return lines + [""]


def versus_table(report: dict[str, Any]) -> list[str]:
    """Per metric: each method minus the retrained references' mean against the noise floor; then each method minus
    fine-tune-only, paired by seed."""
    keys = [k for k, _, _ in HEADLINE if k != "rounds_to_quality"]
    summary = report.get("summary", {})
    methods = list(summary)
    fl = report.get("noise_floor", {})
    lines = [
        "| metric | noise floor (max \\|Δ\\| retrain vs retrain) | "
        + " | ".join(f"{m} − retrain" for m in methods)
        + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for k in keys:
        cells = []
        for m in methods:
            e = summary[m][k]
            d = e.get("minus_retrain") if METRICS[k][1] == "level" else e.get("mean")
            mark = "" if e.get("within_floor") is None else (" ✓" if e["within_floor"] else " ✗")
            cells.append(f"{_f(d, 4)}{mark}")
        lines.append(f"| {METRICS[k][0]} | {_f(fl.get(k, {}).get('max_abs_diff'), 4)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "✓ = within the noise floor (for KL and class gap, which are distances already: the method's mean distance "
        "to the references is no larger than the references' distance to each other), ✗ = outside it.",
        "",
    ]
    others = [m for m in methods if m != "finetune"]
    if "finetune" in summary and others:
        lines += [
            "| metric | " + " | ".join(f"{m} − finetune (paired, mean [95 % t-interval])" for m in others) + " |",
            "|---|" + "---|" * len(others),
        ]
        for k in keys:
            cells = [_ci(summary[m][k].get("minus_finetune") or {}, 4) for m in others]
            lines.append(f"| {METRICS[k][0]} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def attacks_table(report: dict[str, Any]) -> list[str]:
    """Attack power on retained members and each attack on the forget class, with bootstrap intervals."""
    lines = [
        "| model | loss attack power on R (acc) | loss attack AUC on R [95 % CI] | feature attack AUC on R "
        "| loss attack AUC on U | loss TPR@1%FPR on U | LiRA AUC on U [95 % CI] | LiRA TPR@1%FPR on U "
        "| feature attack AUC on U [95 % CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(n, m["tests"]) for n, m in report["models"].items()] + [(n, r["tests"]) for n, r in report["runs"].items()]
    for name, t in rows:
        la, fa, li = t["loss_attack"], t["feature_attack"], t.get("lira") or {}
        rp = la["retained_power"]

        def ci(d: dict[str, Any]) -> str:
            return "n/a" if not d else f"{d['auc']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

        lines.append(
            f"| {name} | {rp['accuracy']:.3f} | {ci(rp)} | {ci(fa['retained_power'])} | {ci(la['forget'])} "
            f"| {la['forget']['tpr_at_fpr']:.3f} | {ci(li)} | {_f(li.get('tpr_at_fpr'))} | {ci(fa['forget'])} |"
        )
    return lines + [""]


def relearn_table(report: dict[str, Any], steps: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 20, 50)) -> list[str]:
    """Forget-class accuracy on held-out images after k relearn steps (from the stored 1-step curves)."""
    lines = [
        "| model | steps to target | " + " | ".join(f"acc after {k}" for k in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    rows = [(n, m["tests"]) for n, m in report["models"].items()] + [(n, r["tests"]) for n, r in report["runs"].items()]
    for name, t in rows:
        rl = t["relearn"]
        curve = dict((int(s), a) for s, a in rl["curve"])
        last = max(curve)
        cells = [
            _f(curve[k], 3) if k in curve else ("(reached)" if rl["reached"] and k > last else "n/a") for k in steps
        ]
        lines.append(f"| {name} | {'' if rl['reached'] else '>'}{rl['steps']} | " + " | ".join(cells) + " |")
    return lines + [""]


def fisher_table(report: dict[str, Any]) -> list[str]:
    """Fisher's alpha sweep on retained data (per seed) and the alpha it chose."""
    lines = ["| run | base R (sites' retained images) | alpha → R after noise | chosen alpha | within budget |"]
    lines.append("|---|---|---|---|---|")
    for name, r in report["runs"].items():
        tune = (r.get("prepare") or {}).get("alpha_tuning")
        if not tune:
            continue
        sweep = ", ".join(f"{e['alpha']:.0e}: {100 * e['r_acc']:.1f}" for e in tune["sweep"])
        lines.append(
            f"| {name} | {100 * tune['base_r_acc']:.1f} | {sweep} | {tune['alpha']:.0e} | {tune['within_budget']} |"
        )
    return lines + [""]


def budget_table(report: dict[str, Any]) -> list[str]:
    """Every method's fine-tune budget (equal by construction) and what it cost."""
    lines = [
        "| run | fine-tune rounds | lr | MB moved | wall s (charged) | after prepare R / U |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        c, ft, ap = r["cost"], r["finetune_config"], r["after_prepare"]
        lines.append(
            f"| {name} | {len(r['history'])} | {ft['lr']} | {c['bytes_total'] / 1e6:.2f} | {c['wall_s_total']:.1f} "
            f"| {_f(ap['r_acc'], 4, True)} / {_f(ap['u_acc'], 4, True)} |"
        )
    return lines + [""]


def markdown(report: dict[str, Any], path: str | None = None, level: int = 2) -> list[str]:
    """The report's tables under headings of ``level`` (the docs page nests them deeper), without a title."""
    path = path or f"benchmarks/results/forgetting/{report['setting']}_f{'+'.join(map(str, report['forget']))}.json"
    h = "#" * level
    return [
        *provenance(report, path),
        f"{h} Original and retrained references",
        "",
        *models_table(report),
        f"{h} Headline (mean [95 % t-interval] over seeds; one row per reference model)",
        "",
        *headline_table(report),
        f"{h} Distance to retraining (against the noise floor) and to fine-tune-only (paired)",
        "",
        *versus_table(report),
        f"{h} Membership attacks: power on retained members, signal on the forget class",
        "",
        *attacks_table(report),
        f"{h} Relearn curves (forget-class test accuracy after every step)",
        "",
        *relearn_table(report),
        f"{h} Fisher's alpha (tuned on retained data only)",
        "",
        *fisher_table(report),
        f"{h} Budget (every method: the same fine-tune rounds and lr)",
        "",
        *budget_table(report),
    ]
