"""The results page, the docs tables and the plots of ``benchmarks.robustness_privacy``; ``render_reliability``
rebuilds docs/reliability.md from the committed JSON with these same writers (one definition of a table)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.harness import command_now
from benchmarks.render import column_table, num, pyplot, save_figure
from benchmarks.robustness_plans import METHODS


def fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} (min {s['min']:.3f})"


def provenance(result: dict) -> list[str]:
    """Command, environment, wall time and setting of one run (shared by the results page and the docs)."""
    cfg, env = result["config"], result["environment"]
    run = f"Produced by `{command_now(result['command'])}` in {result['seconds']:.0f} s"
    where = f"({env['device']}, torch {env['torch']}, {env['threads']} thread(s))."
    model = f"Trained model: test accuracy {result['model']['test_acc']:.3f}."
    sites = f"{cfg['num_clients']} IID sites, prune ratio {cfg['prune_ratio']}, clip bound {cfg['clip']},"
    caps = (
        f"size cap {cfg['size_cap_factor']} x the median site, update clip {cfg['update_clip']} x the median update "
        f"norm, outlier tolerance {cfg['eval_outlier_tol']}."
    )
    return [" ".join((run, where, model, sites, caps)), ""]


_WHO = [("malicious of 10", lambda r: str(r["malicious"])), ("attack", lambda r: r["attack"])]
_AGG = [("aggregation", lambda r: r["aggregation"])]
_PRUNED = [
    ("U acc pruned", lambda r: f"{r['u_acc_pruned']['mean']:.3f}"),
    ("R acc pruned", lambda r: f"{r['r_acc_pruned']['mean']:.3f}"),
]


def screening_table(result: dict) -> list[str]:
    return column_table(
        result["robustness"],
        [
            ("attack", lambda r: r["attack"]),
            ("server screen", lambda r: r["screen"]),
            ("aggregation", lambda r: r["method"]),
            ("rejected sites", lambda r: str(r["rejected_sites"] or "-")),
            ("Jaccard vs clean mean", lambda r: fmt(r["jaccard_vs_clean_mean"])),
            ("Jaccard vs clean same method", lambda r: fmt(r["jaccard_vs_clean_same_method"])),
            *_PRUNED,
            ("same attack, no screen", lambda r: r["unscreened"]),
        ],
    )


def _attack_table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> list[str]:
    """One row per (malicious sites, attack, aggregation option), then ``columns``."""
    return column_table(rows, _WHO + _AGG + columns)


def activation_table(result: dict) -> list[str]:
    jaccard = ("Jaccard vs honest plan: mean (min)", lambda r: fmt(r["jaccard_vs_honest"]))
    u_acc = ("U acc pruned: mean (max)", lambda r: f"{r['u_acc_pruned']['mean']:.3f} ({r['u_acc_pruned']['max']:.3f})")
    return _attack_table(result["activation_attacks"], [jaccard, u_acc, _PRUNED[1]])


def finetune_table(result: dict) -> list[str]:
    u_acc = ("U acc: mean (max)", lambda r: f"{r['u_acc']['mean']:.3f} ({r['u_acc']['max']:.3f})")
    r_acc = ("R acc: mean (min)", lambda r: f"{r['r_acc']['mean']:.3f} ({r['r_acc']['min']:.3f})")
    return _attack_table(result["finetune_attacks"], [u_acc, r_acc])


def evaluation_table(result: dict) -> list[str]:
    return column_table(
        result["evaluation_attacks"],
        [("model", lambda r: r["model"])]
        + _WHO
        + _AGG
        + [
            ("U acc (honest)", lambda r: f"{num(r['u_acc'], '.3f')} ({num(r['honest_u_acc'], '.3f')})"),
            ("R acc (honest)", lambda r: f"{num(r['r_acc'], '.3f')} ({num(r['honest_r_acc'], '.3f')})"),
            ("sites left out", lambda r: ", ".join(r["flagged"]) or "-"),
        ],
    )


def privacy_setup_text(result: dict) -> list[str]:
    cfg, p = result["config"], result["privacy_setup"]
    return [
        f"Per-image activations clipped to [0, {p['clip_bound']}] ({100 * p['fraction_of_activations_clipped']:.2f} % "
        f"of values clipped), images per class per site {p['images_per_class_per_site']['min']:.0f} to "
        f"{p['images_per_class_per_site']['max']:.0f} (mean {p['images_per_class_per_site']['mean']:.1f}), "
        f"min count {p['min_count']} ({p['classes_dropped_by_min_count']} site-classes dropped), "
        f"{p['total_channels']} channels, L2 sensitivity {p['l2_sensitivity']:.3f} per image swapped within its "
        f"class (counts public), delta {p['delta']}, sigma from the analytic Gaussian mechanism, noise added by every "
        f"site to its own upload, exact mean aggregation, {cfg['noise_seeds']} noise seeds x 10 forget classes "
        f"(fine-tuned columns: the first {cfg['ft_seeds']} seed(s) x 10 classes). "
        f"Clipping alone (no noise) vs the unclipped plan: Jaccard {fmt(p['jaccard_clipped_vs_unclipped'])}. "
        f"Fine-tune: {cfg['ft_epochs']} epochs of SGD (lr {cfg['ft_lr']}) on the retained classes, centralized.",
        "",
    ]


_LAYERS = "pruned_per_layer"


def privacy_table(result: dict) -> list[str]:
    def sigma(r: dict) -> str:
        return "-" if r["sigma_per_site"] is None else f"{r['sigma_per_site']:.3f}"

    return column_table(
        result["privacy"],
        [
            ("epsilon", lambda r: str(r["epsilon"])),
            ("sigma per site", sigma),
            ("Jaccard vs noiseless", lambda r: fmt(r["jaccard_vs_noiseless"])),
            *_PRUNED,
            ("U acc fine-tuned", lambda r: f"{r['u_acc_finetuned']['mean']:.3f}"),
            ("R acc fine-tuned", lambda r: f"{r['r_acc_finetuned']['mean']:.3f}"),
            (
                "channels pruned per layer (mean)",
                lambda r: ", ".join(f"{k} {v:.1f}" for k, v in r["pruned_per_layer"].items()),
            ),
        ],
    )


def markdown(result: dict) -> str:
    """The results page: every section the run holds, with the tables ``docs/reliability.md`` shows."""
    cfg = result["config"]
    lines = ["# Robustness, attacks and privacy (digits, small_cnn)", "", *provenance(result)]
    if "robustness" in result:
        lines += [
            f"## Screening: site {cfg['bad_site']} of {cfg['num_clients']} misbehaves",
            "",
            "Jaccard = overlap of pruned channel sets with the clean plan (1 = same plan), mean over the 10 forget "
            "classes (min). U/R = forget/retained test accuracy right after pruning (no fine-tune).",
            "",
            *screening_table(result),
        ]
    if "activation_attacks" in result:
        lines += ["## Activation phase: crafted reports inside the clip bound", "", *activation_table(result)]
    if "finetune_attacks" in result:
        lines += [
            f"## Fine-tuning: {cfg['ft_rounds']} federated rounds, forget classes {', '.join(cfg['ft_classes'])}",
            "",
            *finetune_table(result),
        ]
    if "evaluation_attacks" in result:
        lines += [f"## Federated evaluation: forget class {cfg['ft_classes'][0]}", "", *evaluation_table(result)]
    if "privacy" in result:
        lines += [
            "## Privacy: Gaussian noise on each site's per-class sums",
            "",
            *privacy_setup_text(result),
            *privacy_table(result),
        ]
    return "\n".join(lines)


def write_attack_plot(path: Path, result: dict) -> None:
    """Three panels: plan overlap, U after fine-tuning, evaluation error, by aggregation option and attackers."""
    fig, axes = pyplot().subplots(1, 3, figsize=(17, 4.6))
    panels = (
        (
            axes[0],
            [r for r in result["activation_attacks"] if r["attack"] == "crafted_x1e6"],
            lambda r: r["jaccard_vs_honest"]["mean"],
            "plan Jaccard vs honest (crafted, counts x1e6)",
        ),
        (
            axes[1],
            [r for r in result["finetune_attacks"] if r["attack"] == "relearn"],
            lambda r: r["u_acc"]["max"],
            "U acc after fine-tuning, worst class (relearn, claims 1e12 steps)",
        ),
        (
            axes[2],
            [
                r
                for r in result["evaluation_attacks"]
                if r["attack"] == "total_1e9_correct_0" and r["model"] == "original"
            ],
            lambda r: abs((r["u_acc"] or 0.0) - r["honest_u_acc"]),
            "|reported - honest| U acc (total 1e9, correct 0)",
        ),
    )
    for ax, rows, value, title in panels:
        options = list(dict.fromkeys(r["aggregation"] for r in rows))
        for i, n_bad in enumerate((1, 2)):
            vals = [next(value(r) for r in rows if r["aggregation"] == o and r["malicious"] == n_bad) for o in options]
            ax.bar(np.arange(len(options)) + (i - 0.5) * 0.38, vals, 0.38, label=f"{n_bad} of 10 malicious")
        ax.set_xticks(
            np.arange(len(options)), [o.replace(" (", "\n(").replace(", ", ",\n") for o in options], fontsize=7
        )
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)


def write_plot(path: Path, result: dict) -> None:
    """Plan overlap under each screening attack; plan overlap and accuracies against the privacy budget."""
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(12, 4.2))
    rows = [r for r in result["robustness"] if r["screen"] == "validate"]
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    width = 0.25
    for i, method in enumerate(METHODS):
        vals = [
            next(r["jaccard_vs_clean_mean"]["mean"] for r in rows if r["attack"] == a and r["method"] == method)
            for a in attacks
        ]
        ax1.bar(np.arange(len(attacks)) + (i - 1) * width, vals, width, label=method)
    ax1.set_xticks(np.arange(len(attacks)), attacks)
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("Jaccard vs clean plan (mean over 10 classes)")
    ax1.set_title(f"1 of {result['config']['num_clients']} sites misbehaves (after screening)")
    ax1.legend()
    pr = [r for r in result["privacy"] if r["epsilon"] != "random channels"]
    finite = [float(r["epsilon"]) for r in pr if r["epsilon"] != "inf"]
    xs = [float(r["epsilon"]) if r["epsilon"] != "inf" else max(finite) * 4 for r in pr]
    ax2.plot(xs, [r["jaccard_vs_noiseless"]["mean"] for r in pr], "o-", label="plan Jaccard vs noiseless")
    ax2.plot(xs, [r["u_acc_finetuned"]["mean"] for r in pr], "s--", label="U acc (fine-tuned)")
    ax2.plot(xs, [r["r_acc_finetuned"]["mean"] for r in pr], "^--", label="R acc (fine-tuned)")
    ax2.plot(xs, [r["r_acc_pruned"]["mean"] for r in pr], "v:", label="R acc (pruned only)")
    rnd = next(r for r in result["privacy"] if r["epsilon"] == "random channels")
    ax2.axhline(rnd["jaccard_vs_noiseless"]["mean"], color="grey", lw=0.8, ls=":", label="Jaccard of random channels")
    ax2.set_xscale("log")
    ax2.set_xticks(xs, [str(r["epsilon"]) for r in pr])
    ax2.minorticks_off()
    ax2.set_xlabel(f"epsilon per request (delta={result['privacy_setup']['delta']})")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("Gaussian noise on site uploads")
    ax2.legend(fontsize=8)
    save_figure(fig, path, dpi=120)
