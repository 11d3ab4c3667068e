"""The unlearning benchmark's markdown page and curves (``benchmarks.unlearning_benchmark``); ``render_docs``
builds docs/benchmarks.md's tables of these runs with the same writers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.render import num, pct, pyplot, save_figure

EQUAL_QUALITY_NOTE = (
    "; every fine-tune stops at the first round that reaches retrain quality (R, U), so the tests compare models "
    "at equal accuracy"
)


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"# Unlearning benchmark: {cfg['mode']} mode, {cfg['dataset']} / {cfg['model']}, forget {cfg['forget']}",
        "",
        f"Generated {report['generated_utc']} on {report['machine']['device_name']} "
        f"({report['machine']['platform']}, torch {report['machine']['torch']}, {report['machine']['threads']} "
        f"CPU threads). Command: `{report['command']}`. Total wall time {report['wall_s']:.0f}s.",
        "",
        f"Federation: {cfg['sites']} sites, {cfg['clients_per_round']} sampled per round, local epochs "
        f"{cfg['local_epochs']}, batch {cfg['batch_size']}, augment {cfg['augment']}; pretrain/retrain "
        f"{cfg['pretrain_rounds']}/{cfg['retrain_rounds']} rounds at lr {cfg['lr']}, every other method "
        f"{cfg['ft_rounds']} fine-tune rounds at lr {cfg['ft_lr']} (cosine to 0 for all)"
        f"{EQUAL_QUALITY_NOTE if cfg.get('ft_stop_at_quality') else ''}. "
        f"{cfg['train_images_used']} training images; curves on {cfg['eval_images']} test images, final tests on "
        f"the full test set ({cfg['test_images']} images).",
        "",
    ]
    for run in report["runs"]:
        lines += run_markdown(run, cfg)
    if len(report["runs"]) > 1:
        lines += aggregate_markdown(report)
    return "\n".join(lines) + "\n"


def run_markdown(run: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    res = run["results"]
    orig, re_ = res.get("original"), res.get("retrain")
    lines = [f"## q = {run['q']}, seed = {run['seed']}", ""]
    lines += [
        "Table 2 shape (U-set / R-set test accuracy; 'after prepare' = right after pruning / noise / reset, "
        "before any fine-tuning):",
        "",
        "| method | raw U | raw R | after-prepare U | after-prepare R | fine-tuned U | fine-tuned R | re-trained U "
        "| re-trained R | rounds to quality | speedup vs retrain | wall s to quality | MB moved to quality |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        if name == "original":
            continue
        acc = r["tests"]["accuracy"]
        cost = r.get("cost_to_quality") or {}
        rq = r.get("rounds_to_quality")
        wall_q = f"{cost['wall_s_total']:.1f}" if cost else "n/a"
        mb_q = f"{cost['bytes_total'] / 1e6:.2f}" if cost else "n/a"
        lines.append(
            f"| {name} | {pct(orig['tests']['accuracy']['u_acc']) if orig else 'n/a'} "
            f"| {pct(orig['tests']['accuracy']['r_acc']) if orig else 'n/a'} "
            f"| {pct(r.get('after_prepare', {}).get('u_acc'))} | {pct(r.get('after_prepare', {}).get('r_acc'))} "
            f"| {pct(acc['u_acc'])} | {pct(acc['r_acc'])} "
            f"| {pct(re_['tests']['accuracy']['u_acc']) if re_ else 'n/a'} "
            f"| {pct(re_['tests']['accuracy']['r_acc']) if re_ else 'n/a'} "
            f"| {rq if rq is not None else 'not reached'} | {r.get('speedup') or 'n/a'} "
            f"| {wall_q} | {mb_q} |"
        )
    lines += [
        "",
        "Forgetting tests on the final models (original = ceiling, retrain = reference). Probe: logistic regression "
        "forget-class vs rest on penultimate features (AUC, balanced acc); the same probe for up to 9 retained classes "
        "is the control (a weaker extractor lowers every class, forgetting only the forget class). "
        "Relearn: SGD steps until forget-class "
        "test accuracy reaches the target (`>` = not reached). MIA: loss-threshold (Yeom et al. 2018) and MLP-on-"
        "softmax attacks; power = held-out retained members vs non-members accuracy; control = the same attack on "
        "forget-class train vs test (0.5 = no membership signal); paper success = share of forget-class train "
        "images judged members.",
        "",
        "| method | probe AUC | probe bal. acc | retained-class probe AUC (mean) | probe AUC minus retained "
        "| relearn steps | MIA power loss / mlp | forget control loss / mlp "
        "| self-calibrated control | paper success (train / test) | KL to retrain | max class diff | conditions met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        t = r["tests"]
        rl = t["relearn"]
        ml, mm = t["mia"].get("loss", {}), t["mia"].get("mlp", {})
        acc = t["accuracy"]
        q = r.get("quality")
        if name in ("retrain", "original"):
            met = "reference" if name == "retrain" else "ceiling"
        elif q is None:
            met = "n/a (no retrain in this run)"
        else:
            met = ", ".join(k for k, v in q.items() if v) or "none"
        lines.append(
            f"| {name} | {t['probe']['auc']:.3f} | {t['probe']['balanced_accuracy']:.3f} "
            f"| {num(t['probe'].get('control_auc_mean'), '.3f')} "
            f"| {num(t['probe'].get('auc_minus_control'), '+.3f')} "
            f"| {'' if rl['reached'] else '>'}{rl['steps']} "
            f"| {ml.get('power_accuracy', float('nan')):.3f} / {mm.get('power_accuracy', float('nan')):.3f} "
            f"| {ml.get('forget_accuracy', float('nan')):.3f} / {mm.get('forget_accuracy', float('nan')):.3f} "
            f"| {ml.get('forget_selfcal_accuracy', float('nan')):.3f} "
            f"| {ml.get('forget_train_member_rate', float('nan')):.3f} / "
            f"{ml.get('forget_test_member_rate', float('nan')):.3f} "
            f"| {'(reference)' if name == 'retrain' else num(acc.get('kl_to_reference'), '.2e')} "
            f"| {'(reference)' if name == 'retrain' else num(acc.get('max_class_acc_diff'), '.3f')} "
            f"| {met} |"
        )
    if run.get("plots"):
        lines += ["", f"Curves: `{run['plots']}`"]
    lines.append("")
    return lines


def aggregate_markdown(report: dict[str, Any]) -> list[str]:
    """Mean ± sd over runs (seeds / q values) for the numbers where differences are small."""
    by: dict[tuple, dict[str, list[float]]] = {}
    for run in report["runs"]:
        for name, r in run["results"].items():
            t = r["tests"]
            d = by.setdefault((run["q"], name), {})
            for key, val in (
                ("R", t["accuracy"]["r_acc"]),
                ("U", t["accuracy"]["u_acc"]),
                ("probe", t["probe"]["auc"]),
                ("probe_gap", t["probe"].get("auc_minus_control")),
                ("relearn", t["relearn"]["steps"]),
                ("rounds", len(r.get("history") or []) or None),
                ("mia_ctrl", t["mia"].get("loss", {}).get("forget_accuracy")),
            ):
                if val is not None:
                    d.setdefault(key, []).append(float(val))
    lines = [
        "## Mean ± sd over seeds",
        "",
        "| q | method | n | rounds run | R acc | U acc | probe AUC | "
        "probe AUC minus retained | relearn steps | MIA control (loss) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(v: list[float], pct: bool = False, digits: int = 2) -> str:
        f = 100.0 if pct else 1.0
        return f"{f * np.mean(v):.{digits}f} ± {f * np.std(v):.{digits}f}" if v else "n/a"

    for (q, name), d in by.items():
        lines.append(
            f"| {q} | {name} | {len(d.get('R', []))} | {ms(d.get('rounds', []), digits=1)} | "
            f"{ms(d.get('R', []), True)} | {ms(d.get('U', []), True)} | {ms(d.get('probe', []), digits=3)} | "
            f"{ms(d.get('probe_gap', []), digits=3)} | {ms(d.get('relearn', []), digits=1)} | "
            f"{ms(d.get('mia_ctrl', []), digits=3)} |"
        )
    return lines + [""]


def plot_run(run: dict[str, Any], path: Path, title: str) -> None:
    """R and U accuracy per fine-tune round of every method of one run (retraining dashed)."""
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.5))
    for name, r in run["results"].items():
        hist = r.get("history") or []
        if not hist:
            continue
        rounds = [0] + [h["round"] for h in hist]
        ap = r.get("after_prepare_curve") or {}
        rr = [ap.get("r_acc")] + [h["r_acc"] for h in hist]
        uu = [ap.get("u_acc")] + [h["u_acc"] for h in hist]
        style = "--" if name == "retrain" else "-"
        axes[0].plot(rounds, [np.nan if v is None else 100 * v for v in rr], style, marker=".", label=name)
        axes[1].plot(rounds, [np.nan if v is None else 100 * v for v in uu], style, marker=".", label=name)
    for ax, what in zip(axes, ("R-set accuracy (%)", "forget-class (U-set) accuracy (%)")):
        ax.set_xlabel("FedAvg round (fine-tune; retrain: from scratch)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path, dpi=110)
