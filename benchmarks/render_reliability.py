"""Regenerate the measured tables of docs/reliability.md from the committed robustness benchmark JSON.

Every table of measured numbers on that page sits between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` and is rebuilt here from ``benchmarks/results/robustness_privacy.json`` with the
benchmark's own table writers (one definition of a table); the prose around the blocks is hand-written. ``--check``
exits 1 when the page is out of date, so a test keeps the docs and the JSON in step.

    python -m benchmarks.render_reliability           # rewrite the generated blocks in place
    python -m benchmarks.render_reliability --check   # fail if a block differs from what the JSON gives
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import robustness_tables as rp  # the benchmark's own table writers
from benchmarks.harness import REPO_ROOT, RESULTS, parser
from benchmarks.render import block_names, check_or_write, replace_block

RESULT = RESULTS / "robustness_privacy.json"
DOC = REPO_ROOT / "docs" / "reliability.md"


def _row(rows: list[dict], **match: Any) -> dict:
    return next(r for r in rows if all(r[k] == v for k, v in match.items()))


def headline(result: dict) -> list[str]:
    """The numbers the prose relies on, each from the JSON: worst cases of the defaults vs the old behaviour."""
    act, ft, ev = result["activation_attacks"], result["finetune_attacks"], result["evaluation_attacks"]
    attacked = [r for r in act if r["malicious"] > 0]
    worst_default = min(r["jaccard_vs_honest"]["min"] for r in attacked if r["aggregation"] == "median (default)")
    old = _row(act, malicious=1, attack="crafted_x1e6", aggregation="mean, no count cap")
    old2 = _row(act, malicious=2, attack="crafted_x1e6", aggregation="mean, no count cap")
    honest_median = _row(act, malicious=0, aggregation="median (default)")
    ft_attacked = [r for r in ft if r["malicious"] > 0]
    ft_default = max(r["u_acc"]["max"] for r in ft_attacked if r["aggregation"] == "median (default)")
    ft_default_mean = max(r["u_acc"]["mean"] for r in ft_attacked if r["aggregation"] == "median (default)")
    ft_nofilter = max(r["u_acc"]["max"] for r in ft_attacked if r["aggregation"] == "median, no outlier filter")
    ft_fedavg = max(r["u_acc"]["max"] for r in ft_attacked if r["aggregation"].startswith("FedAvg"))
    ft_honest = {r["aggregation"]: r for r in ft if r["malicious"] == 0}
    fedavg_honest = next(r for a, r in ft_honest.items() if a.startswith("FedAvg"))
    ev_attacked = [r for r in ev if r["malicious"] > 0 and r["u_acc"] is not None]
    ev_default = max(abs(r["u_acc"] - r["honest_u_acc"]) for r in ev_attacked if r["aggregation"] == "robust (default)")
    ev_old = max(abs(r["u_acc"] - r["honest_u_acc"]) for r in ev_attacked if r["aggregation"] == "pooled sums (before)")
    return [
        "| what | before issue 11 | defaults now |",
        "|---|---|---|",
        f"| activation phase, 1 / 2 crafted sites with counts x10^6: plan Jaccard vs the honest plan (mean over 10 "
        f"classes) | {old['jaccard_vs_honest']['mean']:.3f} / {old2['jaccard_vs_honest']['mean']:.3f} | worst "
        f"class of any attack row: {worst_default:.3f} |",
        f"| same attack, forget-class accuracy right after pruning (mean) | {old['u_acc_pruned']['mean']:.3f} / "
        f"{old2['u_acc_pruned']['mean']:.3f} | "
        f"{_row(act, malicious=2, attack='crafted_x1e6', aggregation='median (default)')['u_acc_pruned']['mean']:.3f} "
        f"(2 sites) |",
        f"| activation phase, no attack: plan Jaccard of the default vs the exact mean (cost of robustness) | 1.000 | "
        f"{honest_median['jaccard_vs_honest']['mean']:.3f} (min {honest_median['jaccard_vs_honest']['min']:.3f}) |",
        f"| fine-tuning, 1 or 2 of 10 sites boosting and/or relearning: worst U after fine-tuning (any class) | "
        f"{ft_fedavg:.3f} | {ft_default:.3f} (worst mean over classes {ft_default_mean:.3f}; without the outlier "
        f"filter {ft_nofilter:.3f}) |",
        f"| fine-tuning, no attack: R after fine-tuning (mean) | {fedavg_honest['r_acc']['mean']:.3f} | "
        f"{ft_honest['median (default)']['r_acc']['mean']:.3f} |",
        f"| federated evaluation, 1 or 2 of 10 sites lying: worst error in the reported U accuracy | {ev_old:.3f} | "
        f"{ev_default:.3f} |",
        "",
    ]


def _provenance(result: dict) -> list[str]:
    return [
        *rp.provenance(result),
        "Files: `benchmarks/results/robustness_privacy.json` (data), `.md` (every table), `robustness_attacks.png` "
        "and `robustness_privacy.png` (plots).",
        "",
    ]


BLOCKS: dict[str, Callable[[dict], list[str]]] = {
    "provenance": _provenance,
    "headline": headline,
    "screening": rp.screening_table,
    "activation": rp.activation_table,
    "finetune": rp.finetune_table,
    "evaluation": rp.evaluation_table,
    "privacy_setup": rp.privacy_setup_text,
    "privacy": rp.privacy_table,
}


def render(text: str, result: dict) -> str:
    """``text`` with every generated block rebuilt; unknown or unterminated blocks are an error."""
    names = block_names(text, r"\w+")
    unknown = sorted(set(names) - set(BLOCKS))
    if unknown:
        raise ValueError(f"unknown generated block(s) {unknown}; known: {sorted(BLOCKS)}")
    for name in names:
        text = replace_block(text, name, BLOCKS[name](result))
    return text


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, full_help=False)
    p.add_argument("--check", action="store_true", help="exit 1 if the page is out of date (writes nothing)")
    p.add_argument("--doc", default=str(DOC))
    p.add_argument("--results", default=str(RESULT))
    args = p.parse_args(argv)
    doc = Path(args.doc)
    old = doc.read_text()
    new = render(old, json.loads(Path(args.results).read_text()))
    return check_or_write(doc, old, new, args.check, "python -m benchmarks.render_reliability")


if __name__ == "__main__":
    sys.exit(main())
