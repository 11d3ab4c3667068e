"""The job's default method, defined once: the rule, and the committed evidence it reads.

``evidence.json`` (beside this file) is the per-forget-set summary of the committed CIFAR-10 forgetting runs
(benchmarks/results/forgetting/; written by ``python -m benchmarks.render_docs``, checked by its ``--check``):
for every method variant, its forget-class accuracy U and its R-set accuracy minus retraining's, means over seeds.
``default_rule`` picks from it: a variant is eligible when it reaches U <= 1 % on every set (a model that still
answers the class has not forgotten it), and the default is the eligible one with the least R lost against
retraining, averaged over the sets. ``measured_defaults`` turns that winner into the options of a request that
named no method; the recipe, the CLI, the Python API and the exported job templates all resolve through it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvflare_unlearn.options import PlanOptions, PrivacyOptions, ScoringOptions
from nvflare_unlearn.unlearning.registry import parse_variant

__all__ = [
    "EVIDENCE_PATH",
    "GOAL_U_AT_MOST",
    "PRUNING_FIELDS",
    "MethodDefault",
    "RuleRow",
    "default_rule",
    "evidence_from_runs",
    "measured_defaults",
]

EVIDENCE_PATH = Path(__file__).with_name("evidence.json")
#: the forget-class accuracy a method must reach on every set to be eligible (issue 13's goal)
GOAL_U_AT_MOST = 0.01
#: fields only the paper's pruning reads: a request that sets one asks for pruning
PRUNING_FIELDS = frozenset(PlanOptions.names() + ScoringOptions.names() + PrivacyOptions.names())

Evidence = Mapping[str, Mapping[str, Mapping[str, Any]]]


@dataclass(frozen=True)
class MethodDefault:
    """The options the job sets for a request that left them unset, and why (the CLI prints it, errors name it)."""

    values: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class RuleRow:
    """One method variant against the rule: its U and R - retrain per set (None: not run there)."""

    method: str
    eligible: bool
    u_acc: dict[str, float | None]
    r_minus_retrain: dict[str, float | None]
    mean_r_minus_retrain: float | None


def evidence_from_runs(sets: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, dict]]:
    """``{set label: {variant: {"u_acc", "r_minus_retrain"}}}`` from ``{set label: {run name: report}}`` (a
    forgetting_benchmark report's ``summary``; a later run of the same variant on a set replaces an earlier one)."""
    out: dict[str, dict[str, dict]] = {}
    for label, reports in sets.items():
        cells = out.setdefault(str(label), {})
        for rep in reports.values():
            for method, e in rep["summary"].items():
                cells[method] = {"u_acc": e["u_acc"]["mean"], "r_minus_retrain": e["r_acc"].get("minus_retrain")}
    return out


def default_rule(evidence: Evidence) -> tuple[list[RuleRow], str | None]:
    """Every variant against the rule, best first, and the winner (None when no variant is eligible)."""
    labels = list(evidence)
    variants = list(dict.fromkeys(m for cells in evidence.values() for m in cells))
    rows = []
    for method in variants:
        u = {lb: evidence[lb][method]["u_acc"] for lb in labels if method in evidence[lb]}
        d = {lb: evidence[lb][method]["r_minus_retrain"] for lb in labels if method in evidence[lb]}
        complete = len(u) == len(labels) and all(v is not None for v in d.values())
        ok = complete and all(v <= GOAL_U_AT_MOST for v in u.values())
        mean = sum(d[lb] for lb in labels) / len(labels) if complete else None  # type: ignore[misc]
        rows.append(RuleRow(method, ok, u, d, mean))
    rows.sort(key=lambda r: (not r.eligible, -(r.mean_r_minus_retrain if r.mean_r_minus_retrain is not None
                                                 else -1e9), r.method))  # fmt: skip
    winner = rows[0].method if rows and rows[0].eligible else None
    return rows, winner


@functools.lru_cache(maxsize=1)
def _committed_winner() -> str:
    try:
        evidence = json.loads(EVIDENCE_PATH.read_text())["sets"]
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"the default method's evidence {EVIDENCE_PATH} is unreadable ({e}); reinstall") from e
    _rows, winner = default_rule(evidence)
    if winner is None:
        raise RuntimeError(f"no method in {EVIDENCE_PATH} meets the default's rule; name a method")
    return winner


def measured_defaults(given: Collection[str]) -> MethodDefault:
    """The unlearning job's method for the options not in ``given``: the committed evidence's winner.

    A request that names its method, or sets any pruning option (``PRUNING_FIELDS``), gets what it asked for:
    ``method="prune"`` is the paper's method. An unset recovery is ``ce`` unless the default method brings its own.
    """
    pruning = sorted(PRUNING_FIELDS & set(given))
    if "method" in given:
        values, reason = {}, ""
    elif pruning:
        values, reason = {"method": "prune"}, f"a pruning option is set ({', '.join(pruning)})"
    else:
        values = {k: v for k, v in parse_variant(_committed_winner()).items() if k not in given}
        reason = (
            "the default: U 0 % on every CIFAR-10 forget set measured, at the least mean cost in R "
            "(docs/benchmarks.md); --method prune runs the paper's"
        )
    if "recovery" not in given:
        values.setdefault("recovery", "ce")
    return MethodDefault(values, reason)
