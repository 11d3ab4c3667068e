"""What a person reads after an unlearning job: ``report.json``, the U/R-by-round plot, and the console table."""

from __future__ import annotations

import os
from typing import Optional

from nvflare_unlearn import _io
from nvflare_unlearn.fl.defs import FINAL_MODEL_FILE, PLAN_FILE, PRUNED_MODEL_FILE, RECORD_FILE, RECORD_PUBLIC_KEY_FILE
from nvflare_unlearn.fl.results import sites_per_phase
from nvflare_unlearn.unlearning.objective import OBJECTIVE_HINT


def _acc(entry: Optional[dict]) -> dict:
    entry = entry or {}
    return {k: entry.get(k) for k in ("u_acc", "r_acc", "acc", "class_acc")}


def pct(v: Optional[float]) -> str:
    return "  n/a " if v is None else f"{100 * v:5.1f}%"


def build_report(metrics: dict) -> dict:
    """``report.json`` from an unlearning job's metrics record: the stages a person compares, and the costs."""
    return dict(
        forget_classes=metrics.get("forget_classes"),
        original=_acc(metrics.get("original")),
        pruned=_acc(metrics.get("pruned")),
        unlearned=_acc(metrics.get("unlearned")),
        params_before=metrics.get("params_before"),
        params_after=metrics.get("params_after"),
        rounds=metrics.get("rounds"),
        per_round=[dict(round=e.get("round"), **_acc(e)) for e in metrics.get("per_round", [])],
        plan_summary=metrics.get("plan_summary"),
        options=metrics.get("options"),
        seconds=metrics.get("seconds"),
        verification=metrics.get("verification"),
        verification_original=metrics.get("verification_original"),
        objective=metrics.get("objective"),  # the loss each site says it minimised, against the request
        sites_per_phase=sites_per_phase(metrics),  # which sites each activation pass and round used
        resumed=metrics.get("resumed"),  # set when the job went on from an earlier run's round (resume_from)
    )


def prunes(report: dict) -> bool:
    """Whether the job's method pruned before fine-tuning (the others start from the original model)."""
    from nvflare_unlearn.unlearning import get_method

    return get_method(((report.get("options") or {}).get("unlearning") or {}).get("method", "prune")).prunes


def plot_u_r_by_round(report: dict, path: str, title: str = "") -> str:
    """PNG: U-set (forgotten) and R-set (retained) accuracy, original model dashed, round 0 = just pruned (or the
    original, for a method that does not prune)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [0] + [e["round"] for e in report["per_round"]]
    u = [report["pruned"]["u_acc"]] + [e["u_acc"] for e in report["per_round"]]
    r = [report["pruned"]["r_acc"]] + [e["r_acc"] for e in report["per_round"]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(rounds, [100 * v for v in r], "o-", color="tab:blue", label="R-set (retained classes)")
    ax.plot(rounds, [100 * v for v in u], "s-", color="tab:red", label="U-set (forgotten classes)")
    ax.axhline(100 * report["original"]["r_acc"], ls="--", color="tab:blue", alpha=0.5, label="original R-set")
    ax.axhline(100 * report["original"]["u_acc"], ls="--", color="tab:red", alpha=0.5, label="original U-set")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"fine-tuning round (0 = {'right after pruning' if prunes(report) else 'the original'})")
    ax.set_ylabel("federated test accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(title or f"forgetting class(es) {report['forget_classes']}")
    ax.legend(fontsize=8, loc="center right")
    check = report.get("verification") or {}
    if check.get("verdict"):
        text = check["verdict"] + "".join(f"\n{e}" for e in check.get("evidence", []))
        ax.text(0.02, 0.03, text, transform=ax.transAxes, fontsize=6.5, va="bottom",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})  # fmt: skip
    fig.tight_layout()
    _io.write_with(path, lambda fh: fig.savefig(fh, dpi=120, format="png"))
    plt.close(fig)
    return path


def print_report(report: dict) -> None:
    print()
    print(f"  forget classes: {report['forget_classes']}")
    print(f"  {'stage':<10} {'U-set':>7} {'R-set':>7}")
    for stage in ("original", "pruned", "unlearned") if prunes(report) else ("original", "unlearned"):
        print(f"  {stage:<10} {pct(report[stage]['u_acc']):>7} {pct(report[stage]['r_acc']):>7}")
    pb, pa = report["params_before"], report["params_after"]
    if pb and pa and pa != pb:
        print(f"  parameters: {pb:,} -> {pa:,} ({100 * (1 - pa / pb):.1f}% removed), rounds: {report['rounds']}")
    elif pb and pa:
        print(f"  parameters: {pb:,} (none removed), rounds: {report['rounds']}")
    check = report.get("verification") or {}
    if check.get("verdict"):
        print(f"  {check['verdict']}")
        for line in check.get("evidence", []):
            print(f"    {line}")
    objective = report.get("objective") or {}
    if objective.get("not_as_requested"):
        sites = "; ".join(f"{s}: {', '.join(objective['sites'][s])}" for s in objective["not_as_requested"])
        print(f"  warning: not every site reports the requested loss {objective['requested']} ({sites})")
        print(f"    {OBJECTIVE_HINT}")
    print()


def collect_unlearning_outputs(result, out: str) -> dict:
    """Copy the job's models, plan, metrics, signed audit record and its public key into ``out`` (atomically) and
    write report.json + the plot."""
    key = os.path.join(result.run_dir, RECORD_PUBLIC_KEY_FILE) if result.record_path else None
    copied = []
    for src, name in (
        (result.model_path, FINAL_MODEL_FILE),
        (result.pruned_model_path, PRUNED_MODEL_FILE),
        (result.plan_path, PLAN_FILE),
        (result.metrics_path, "job_metrics.json"),
        (result.record_path, RECORD_FILE),
        (key if key and os.path.isfile(key) else None, RECORD_PUBLIC_KEY_FILE),
    ):
        if src:
            _io.copy_file(src, os.path.join(out, name))
            copied.append(name)
    report = build_report(result.metrics)
    report["job_result_dir"] = result.result_dir
    report["files"] = ["report.json", *copied, "u_r_accuracy.png"]  # a method that does not prune writes no plan
    _io.write_json(os.path.join(out, "report.json"), report)
    plot_u_r_by_round(report, os.path.join(out, "u_r_accuracy.png"))
    return report
