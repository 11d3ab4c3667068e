"""Issue 13's goal and the rule behind the job's default method, read from the forgetting benchmark's runs.

``goal_table`` puts every method of every comparable run on one forget set against the goal; ``default_rule``
picks, over the CIFAR-10 forget sets, the method the job runs when a request names none
(``options.measured_defaults``). ``render_docs`` writes both into docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.forgetting_eval import metrics_of
from benchmarks.render import fixed as _f
from nvflare_unlearn.unlearning import defaults

# Issue 13's goal: U <= 1 %, R >= retrain - 0.5 points, probe / relearn / attack within retraining's noise floor, at
# <= 1/8 of retraining's rounds. One definition, read by the goal table.
GOAL_U_AT_MOST = defaults.GOAL_U_AT_MOST
GOAL_R_MINUS_RETRAIN_AT_LEAST = -0.005
GOAL_ROUNDS_FRACTION = 1 / 8
GOAL_FLOOR_METRICS = (
    ("probe_auc", "probe AUC"),
    ("relearn_steps", "relearn steps"),
    ("mia_forget_auc", "loss attack AUC (U)"),
)


# Config keys that make two runs' numbers comparable (the rest say which methods and seeds ran, and where).
_COMPARABLE = (
    "original_seed", "ft_rounds", "ft_lr", "prune_ratio", "r_sample_n", "probe_train_n", "relearn_forget_n",
    "relearn_retain_n", "relearn_lr", "relearn_batch", "relearn_max_steps", "relearn_eval_n", "relearn_target",
)  # fmt: skip


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    shas = {n: m["checkpoint"]["sha256"] for n, m in report["models"].items()}
    return {
        "setting": report["setting"],
        "forget": report["forget"],
        "models": shas,
        **{k: report["config"].get(k) for k in _COMPARABLE},
    }


def goal_table(reports: dict[str, dict[str, Any]]) -> list[str]:
    """Every method of every run on one forget set (``{run name: report}``) against issue 13's goal, best first.

    Runs are pooled only when they share the original, the references (by SHA-256) and the budget; otherwise the
    comparison would be unfair, so ``ValueError``. Each verdict reads the run's own summary against its own floor.
    """
    if not reports:
        raise ValueError("goal_table needs at least one forgetting_benchmark.py report")
    first_name, first = next(iter(reports.items()))
    want = _comparable(first)
    for name, rep in reports.items():
        got = _comparable(rep)
        diff = sorted(k for k in want if got[k] != want[k])
        if diff:
            raise ValueError(f"runs {first_name!r} and {name!r} are not comparable: they differ in {diff}")
    ref = first["reference_summary"]
    fl = {k: first["noise_floor"].get(k, {}).get("max_abs_diff") for k, _ in GOAL_FLOOR_METRICS}
    orig = metrics_of(first["models"]["original"]["tests"])
    refs = [n for n, m in first["models"].items() if m["kind"] == "retrain"]
    budget = first["models"][refs[0]]["training_cost"]["rounds"] * GOAL_ROUNDS_FRACTION
    rows = []
    for run, rep in reports.items():
        for method, e in rep["summary"].items():
            marks: list[bool | None] = []

            def cell(ok: bool | None, text: str, marks: list[bool | None] = marks) -> str:
                marks.append(ok)
                return text + {True: " ✓", False: " ✗", None: " (no floor)"}[ok]

            u = e["u_acc"]["mean"]
            dr = e["r_acc"].get("minus_retrain")
            cells = [
                cell(u is not None and u <= GOAL_U_AT_MOST, _f(u, 4, True)),
                cell(
                    dr is not None and dr >= GOAL_R_MINUS_RETRAIN_AT_LEAST, "n/a" if dr is None else f"{100 * dr:+.2f}"
                ),
            ]
            closed = []
            for key, _ in GOAL_FLOOR_METRICS:
                d = e[key].get("minus_retrain")
                digits = 1 if key == "relearn_steps" else 3
                cells.append(cell(e[key].get("within_floor"), f"{_f(e[key]['mean'], digits)} ({d:+.{digits}f})"))
                gap = ref[key]["mean"] - orig[key]
                closed.append((e[key]["mean"] - orig[key]) / gap if abs(gap) > (fl[key] or 0.0) else None)  # else none
            rq = e["rounds_to_quality"]
            reached = [v for v in rq["values"] if v is not None]
            if len(reached) == len(rq["values"]):
                cells.append(cell(max(reached) <= budget, _f(rq["mean"], 1)))
            else:
                cells.append(cell(False, f"not reached in {len(rq['values']) - len(reached)} of {len(rq['values'])}"))
            met = sum(m is True for m in marks)
            shares = [c for c in closed if c is not None]
            mean_closed = float(np.mean(shares)) if shares else float("-inf")
            rows.append(
                (
                    -met,
                    -mean_closed,
                    len(rows),
                    f"| **{method}** | {run} | {len(e['seeds'])} | "
                    + " | ".join(cells)
                    + " | "
                    + " / ".join("n/a" if c is None else f"{100 * c:.0f} %" for c in closed)
                    + f" | {met} of {len(marks)} |",
                )
            )
    fmt = {k: 1 if k == "relearn_steps" else 3 for k in fl}
    lines = [
        f"Original: {', '.join(f'{label} {_f(orig[k], fmt[k])}' for k, label in GOAL_FLOOR_METRICS)}. "
        f"Retraining ({len(refs)} reference{'s' if len(refs) != 1 else ''}): R {_f(ref['r_acc']['mean'], 4, True)} %, "
        + ", ".join(f"{label} {_f(ref[k]['mean'], fmt[k])}" for k, label in GOAL_FLOOR_METRICS)
        + ". Noise floor (max |Δ| retrain vs retrain): "
        + ", ".join(f"{label} {_f(fl[k], fmt[k])}" for k, label in GOAL_FLOOR_METRICS)
        + f". Goal (✓ met, ✗ not): U ≤ {100 * GOAL_U_AT_MOST:.0f} %, R ≥ retrain − "
        f"{-100 * GOAL_R_MINUS_RETRAIN_AT_LEAST:.1f} points, each test within the floor of retraining (cell: the "
        f"method's mean, then minus retrain), and R ≥ retrain − 1 point with U ≤ 1 % within {budget:g} rounds (1/8 of "
        "retraining's). *Gap closed*: how far each test moved from the original toward retraining (100 % = there, "
        "above = past it, below 0 = away; n/a where the original is within the floor of retraining, so that test "
        "has nothing to close). Every run here shares the original, the references and the fine-tune budget.",
        "",
        "| method | run | seeds | U acc % | R − retrain (points) | "
        + " | ".join(label for _, label in GOAL_FLOOR_METRICS)
        + " | rounds to quality | gap closed (probe / relearn / attack) | goals met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return lines + [r for *_, r in sorted(rows)] + [""]


def default_rule(sets: dict[str, dict[str, dict[str, Any]]]) -> tuple[list[str], str | None]:
    """The rule behind the job's default method (``unlearning.defaults.default_rule``) over the runs, as markdown.

    ``sets``: ``{forget-set label: {run name: report}}``. Returns (markdown table, winner or None); the rule itself,
    and the evidence file the job reads it from, live in the package.
    """
    rows, winner = defaults.default_rule(defaults.evidence_from_runs(sets))
    labels = list(sets)

    def u_cell(r: defaults.RuleRow, lb: str) -> str:
        if lb not in r.u_acc:
            return "not run"
        u = r.u_acc[lb]
        return f"{'✓' if u <= defaults.GOAL_U_AT_MOST else '✗'} {_f(u, 4, True)}"

    def r_cell(r: defaults.RuleRow, lb: str) -> str:
        d = r.r_minus_retrain.get(lb)
        return "not run" if d is None else f"{100 * d:+.2f}"

    lines = [
        f"Sets: {', '.join(labels)} (goal tables above; each cell a mean over seeds). Eligible: U ≤ "
        f"{100 * defaults.GOAL_U_AT_MOST:.0f} % on every set; the default is the eligible method with the least mean "
        f"R lost against retraining: **{winner or 'none'}**.",
        "",
        f"| method | U acc % ({' / '.join(labels)}) | R − retrain, points ({' / '.join(labels)}) | mean R − retrain "
        "| eligible |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mean = "n/a" if r.mean_r_minus_retrain is None else f"{100 * r.mean_r_minus_retrain:+.2f}"
        u = " / ".join(u_cell(r, lb) for lb in labels)
        d = " / ".join(r_cell(r, lb) for lb in labels)
        lines.append(f"| **{r.method}** | {u} | {d} | {mean} | {'yes' if r.eligible else 'no'} |")
    return lines + [""], winner
