"""How much one bad site, and how much privacy noise, change the pruning plan and the unlearning result.

Setting: scikit-learn's digits (1,347 train / 450 test images, 10 classes), ``small_cnn`` trained here, the train
split spread IID over ``--sites`` sites. Every forget class 0..9 is unlearned separately (one request each) with
the paper's defaults (TF-IDF ``idf="paper"``, global threshold, highest scores pruned, ``--ratio``).

1. Robustness: one site (``--bad-site``) sends x1000 sums, x1000 on the forget-class row of the channels it
   scores lowest (a targeted attack), a NaN, or its forget-class row swapped with another class. Every report
   passes the server's screen (``robust.screen_report``), the survivors are aggregated with
   ``mean`` / ``median`` / ``trimmed_mean`` (``robust.aggregate_class_means``), and the plan is compared with the
   clean plan (Jaccard overlap of pruned channel sets; 1 = identical) and evaluated (U/R accuracy after pruning).
2. Privacy: per-image activations clipped to ``[0, --clip]``, per-class min count ``--min-count``, Gaussian noise
   on each site's sums at (epsilon, ``--delta``) for each epsilon in ``--epsilons`` (``inf`` = no noise), exact
   mean aggregation. Plan Jaccard vs the noiseless clipped plan, U/R accuracy after pruning and after a short
   centralized fine-tune on the retained classes (a cheap stand-in for the federated fine-tune; ``--ft-seeds``
   of the ``--noise-seeds`` noise draws are fine-tuned, to bound the cost).

The core collector has no per-image clip option, so clipped reports are built from per-image reports of
``collect_class_activations`` (one image per call), each clipped with ``privacy.clip_activations`` and summed:
numerically what a collector that clips before summing would upload.

Run: ``.venv/bin/python benchmarks/robustness_privacy.py``; it writes
``benchmarks/results/robustness_privacy.{json,md,png}``
(the JSON records the wall time of each phase).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nvflare_unlearn.data import digits_dataset, partition_iid
from nvflare_unlearn.evaluation import class_correct_total, train_epochs, u_r_accuracy
from nvflare_unlearn.evaluation.data import TensorBatches, as_tensors
from nvflare_unlearn.method.activations import ClassActivationReport, collect_class_activations
from nvflare_unlearn.method.graph import conv_channels
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.method.prune import apply_pruning_plan
from nvflare_unlearn.method.selection import build_pruning_plan
from nvflare_unlearn.method.tfidf import tfidf_scores
from nvflare_unlearn.models import build_model
from nvflare_unlearn.options import AGGREGATIONS
from nvflare_unlearn.protect.privacy import (
    apply_min_count,
    clip_activations,
    gaussian_noise,
    gaussian_sigma,
    sensitivity,
    total_channels,
)
from nvflare_unlearn.protect.robust import aggregate_class_means, screen_report

K = 10
METHODS = AGGREGATIONS


# ------------------------------------------------------------------------------------------------ helpers
def jaccard(a: set, b: set) -> float:
    """|A n B| / |A u B| of two pruned-channel sets (1.0 when both are empty)."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def pruned_set(plan: PruningPlan) -> set[tuple[str, int]]:
    return {(key, int(i)) for key, idxs in plan.pruned_units().items() for i in idxs}


def make_plan(model: torch.nn.Module, means: dict[str, np.ndarray], forget: int, ratio: float) -> PruningPlan:
    return build_pruning_plan(model, tfidf_scores(means, forget), ratio, forget_class=forget)


def u_r(model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor], forget: int) -> tuple[float, float]:
    correct, total = class_correct_total(model, TensorBatches(*test, 512), K)
    acc = u_r_accuracy(correct, total, forget)
    return float(acc["u_acc"]), float(acc["r_acc"])


def attack_x1000(rep: ClassActivationReport, forget: int) -> ClassActivationReport:
    return ClassActivationReport(
        {n: s * 1000.0 for n, s in rep.sums.items()}, rep.counts.copy(), rep.hook_point, list(rep.layer_order)
    )


def attack_nan(rep: ClassActivationReport, forget: int) -> ClassActivationReport:
    sums = {n: s.copy() for n, s in rep.sums.items()}
    sums[rep.layer_order[0]][forget, 0] = np.nan
    return ClassActivationReport(sums, rep.counts.copy(), rep.hook_point, list(rep.layer_order))


def attack_swap(rep: ClassActivationReport, forget: int) -> ClassActivationReport:
    perm = np.arange(K)
    other = (forget + 1) % K
    perm[forget], perm[other] = other, forget
    return ClassActivationReport(
        {n: s[perm] for n, s in rep.sums.items()}, rep.counts[perm], rep.hook_point, list(rep.layer_order)
    )


def attack_targeted(rep: ClassActivationReport, forget: int) -> ClassActivationReport:
    """x1000 only on the forget-class row, only on the half of each layer the site itself scores LOWEST.

    TF-IDF is invariant to scaling a whole class row (TF is a share within the row, IDF compares a row with its
    own mean), so a uniform x1000 mostly replaces the federation's statistics by this one site's. Steering the
    plan needs a targeted change: inflate the channels that do not carry the class so they get pruned instead.
    """
    scores = tfidf_scores(rep.means(), forget)
    sums = {n: s.copy() for n, s in rep.sums.items()}
    for name, sc in scores.items():
        low = np.argsort(sc, kind="stable")[: len(sc) // 2]
        sums[name][forget, low] *= 1000.0
    return ClassActivationReport(sums, rep.counts.copy(), rep.hook_point, list(rep.layer_order))


ATTACKS: dict[str, Callable[[ClassActivationReport, int], ClassActivationReport] | None] = {
    "none": None,
    "x1000": attack_x1000,
    "x1000_targeted": attack_targeted,
    "nan": attack_nan,
    "swap_classes": attack_swap,
}


def per_image_activations(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Layer -> [N, C]: each image's pooled activations, from a one-image report of the core collector."""
    rows: dict[str, list[np.ndarray]] = {}
    for i in range(x.shape[0]):
        rep = collect_class_activations(model, [(x[i : i + 1], y[i : i + 1])], K)
        for name in rep.layer_order:
            rows.setdefault(name, []).append(rep.sums[name][int(y[i])])
    return {name: np.stack(v) for name, v in rows.items()}


def report_from_images(acts: dict[str, np.ndarray], y: np.ndarray, clip: float | None) -> ClassActivationReport:
    """Per-class sums of (optionally clipped) per-image activations: what a clipping collector would send."""
    counts = np.bincount(y, minlength=K).astype(np.int64)
    sums = {}
    for name, a in acts.items():
        a = clip_activations(a, clip) if clip is not None else a
        s = np.zeros((K, a.shape[1]))
        np.add.at(s, y, a)
        sums[name] = s
    return ClassActivationReport(sums, counts, "conv", list(acts))


def finetune_eval(pruned, train, test, forget, epochs, lr, seed) -> tuple[float, float]:
    """U/R accuracy after ``epochs`` of SGD on the retained classes (modifies ``pruned``)."""
    keep = train[1] != forget
    torch.manual_seed(seed)
    train_epochs(pruned, TensorBatches(train[0][keep], train[1][keep], 64, shuffle=True, seed=seed), epochs, lr)
    return u_r(pruned, test, forget)


def per_layer(plans: list[PruningPlan]) -> dict[str, float]:
    """Mean number of channels each coupled group loses over ``plans`` (where a plan puts its cuts)."""
    keys = plans[0].group_keys
    return {k: float(np.mean([len(p.pruned_units()[k]) for p in plans])) for k in keys}


def summarize(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "std": float(a.std())}


# ------------------------------------------------------------------------------------------------ experiments
def robustness(model, site_reports, site_clipped, expected, test, args) -> list[dict]:
    rows = []
    # clean plans: {screen: {method: {forget class: pruned set}}}
    clean = {
        screen: {
            m: {
                f: pruned_set(make_plan(model, aggregate_class_means(reps, m, args.trim), f, args.ratio))
                for f in range(K)
            }
            for m in METHODS
        }
        for screen, reps in (("validate", site_reports), ("validate+clip_bound", site_clipped))
    }
    variants = [(a, "validate", site_reports) for a in ATTACKS] + [
        (a, "validate+clip_bound", site_clipped) for a in ("x1000", "x1000_targeted")
    ]
    for attack, screen, reports in variants:
        ref = clean[screen]["mean"]
        for method in METHODS:
            jac, jac_same, us, rs, rejected = [], [], [], [], set()
            for f in range(K):
                sent = list(reports)
                if ATTACKS[attack] is not None:
                    sent[args.bad_site] = ATTACKS[attack](sent[args.bad_site], f)
                bound = args.clip if screen == "validate+clip_bound" else None
                reasons = [screen_report(r, expected, K, clip_bound=bound) for r in sent]
                rejected |= {i for i, why in enumerate(reasons) if why is not None}
                kept = [r for r, why in zip(sent, reasons) if why is None]
                plan = make_plan(model, aggregate_class_means(kept, method, args.trim), f, args.ratio)
                jac.append(jaccard(pruned_set(plan), ref[f]))
                jac_same.append(jaccard(pruned_set(plan), clean[screen][method][f]))
                u, r = u_r(apply_pruning_plan(copy.deepcopy(model), plan), test, f)
                us.append(u)
                rs.append(r)
            # the same attack without any screen, to show what validation prevents
            unscreened = "ok"
            if ATTACKS[attack] is not None:
                sent = list(reports)
                sent[args.bad_site] = ATTACKS[attack](sent[args.bad_site], 0)
                try:
                    aggregate_class_means(sent, method, args.trim)
                except ValueError as exc:
                    unscreened = f"ValueError: {str(exc).split(';')[0]}"
            rows.append(
                {
                    "attack": attack,
                    "screen": screen,
                    "method": method,
                    "rejected_sites": sorted(rejected),
                    "unscreened": unscreened,
                    "jaccard_vs_clean_mean": summarize(jac),
                    "jaccard_vs_clean_same_method": summarize(jac_same),
                    "u_acc_pruned": summarize(us),
                    "r_acc_pruned": summarize(rs),
                }
            )
            print(
                f"  robustness {attack:12s} {screen:20s} {method:12s} jaccard {np.mean(jac):.3f} "
                f"(min {np.min(jac):.3f}) rejected {sorted(rejected)}",
                flush=True,
            )
    return rows


def privacy(model, site_acts, site_labels, train, test, args) -> tuple[list[dict], dict]:
    clipped = [
        apply_min_count(report_from_images(a, y, args.clip), args.min_count) for a, y in zip(site_acts, site_labels)
    ]
    unclipped = [report_from_images(a, y, None) for a, y in zip(site_acts, site_labels)]
    n_channels = total_channels(clipped[0])
    sens = sensitivity(n_channels, args.clip)
    all_acts = np.concatenate([np.concatenate(list(a.values()), axis=1) for a in site_acts])
    info = {
        "clip_bound": args.clip,
        "delta": args.delta,
        "min_count": args.min_count,
        "total_channels": n_channels,
        "l2_sensitivity": sens,
        "fraction_of_activations_clipped": float(np.mean(all_acts > args.clip)),
        "images_per_class_per_site": summarize([float(c) for u in unclipped for c in u.counts]),
        "classes_dropped_by_min_count": int(
            sum(int(np.sum((u.counts > 0) & (c.counts == 0))) for u, c in zip(unclipped, clipped))
        ),
    }
    ref = {f: make_plan(model, aggregate_class_means(clipped, "mean"), f, args.ratio) for f in range(K)}
    unclipped_plans = {f: make_plan(model, aggregate_class_means(unclipped, "mean"), f, args.ratio) for f in range(K)}
    info["jaccard_clipped_vs_unclipped"] = summarize(
        [jaccard(pruned_set(ref[f]), pruned_set(unclipped_plans[f])) for f in range(K)]
    )
    rows = []
    for eps in args.epsilons:
        sigma = gaussian_sigma(eps, args.delta, sens)
        jac, u0s, r0s, u1s, r1s, plans = [], [], [], [], [], []
        for seed in range(args.noise_seeds):
            for f in range(K):
                noisy = [
                    gaussian_noise(r, eps, args.delta, args.clip, np.random.default_rng([seed, f, s]))
                    for s, r in enumerate(clipped)
                ]
                plan = make_plan(model, aggregate_class_means(noisy, "mean"), f, args.ratio)
                plans.append(plan)
                jac.append(jaccard(pruned_set(plan), pruned_set(ref[f])))
                pruned = apply_pruning_plan(copy.deepcopy(model), plan)
                u0, r0 = u_r(pruned, test, f)
                u0s.append(u0), r0s.append(r0)
                if seed < args.ft_seeds:
                    u1, r1 = finetune_eval(pruned, train, test, f, args.ft_epochs, args.ft_lr, seed)
                    u1s.append(u1), r1s.append(r1)
        rows.append(
            {
                "epsilon": "inf" if math.isinf(eps) else eps,
                "sigma_per_site": sigma,
                "pruned_per_layer": per_layer(plans),
                "jaccard_vs_noiseless": summarize(jac),
                "u_acc_pruned": summarize(u0s),
                "r_acc_pruned": summarize(r0s),
                "u_acc_finetuned": summarize(u1s),
                "r_acc_finetuned": summarize(r1s),
            }
        )
        print(
            f"  privacy eps={eps:<6} sigma={sigma:9.3f} jaccard {np.mean(jac):.3f} "
            f"pruned U/R {np.mean(u0s):.3f}/{np.mean(r0s):.3f} fine-tuned U/R {np.mean(u1s):.3f}/{np.mean(r1s):.3f}",
            flush=True,
        )
    # reference point: the same number of channels chosen uniformly at random (what pure noise converges to)
    jac, u0s, r0s, u1s, r1s, plans = [], [], [], [], [], []
    for f in range(K):
        rng = np.random.default_rng([args.seed, f, 999])
        scores = {n: rng.random(c) for n, c in conv_channels(model).items()}
        plan = build_pruning_plan(model, scores, args.ratio, forget_class=f)
        plans.append(plan)
        jac.append(jaccard(pruned_set(plan), pruned_set(ref[f])))
        pruned = apply_pruning_plan(copy.deepcopy(model), plan)
        u0, r0 = u_r(pruned, test, f)
        u1, r1 = finetune_eval(pruned, train, test, f, args.ft_epochs, args.ft_lr, args.seed)
        u0s.append(u0), r0s.append(r0), u1s.append(u1), r1s.append(r1)
    rows.append(
        {
            "epsilon": "random channels",
            "sigma_per_site": None,
            "pruned_per_layer": per_layer(plans),
            "jaccard_vs_noiseless": summarize(jac),
            "u_acc_pruned": summarize(u0s),
            "r_acc_pruned": summarize(r0s),
            "u_acc_finetuned": summarize(u1s),
            "r_acc_finetuned": summarize(r1s),
        }
    )
    print(
        f"  privacy random channels: jaccard {np.mean(jac):.3f} fine-tuned U/R {np.mean(u1s):.3f}/{np.mean(r1s):.3f}",
        flush=True,
    )
    return rows, info


# ------------------------------------------------------------------------------------------------ output
def fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} (min {s['min']:.3f})"


def write_markdown(path: Path, result: dict) -> None:
    cfg, env = result["config"], result["environment"]
    lines = [
        "# Robustness and privacy of the activation phase (digits, small_cnn)",
        "",
        f"Produced by `{result['command']}` in {result['seconds']:.0f} s "
        f"({env['device']}, torch {env['torch']}, {env['threads']} threads). "
        f"Trained model: test accuracy {result['model']['test_acc']:.3f}. "
        f"{cfg['sites']} IID sites, prune ratio {cfg['ratio']}, every forget class 0..9 unlearned separately; "
        "numbers are over the 10 forget classes (mean, and min in brackets).",
        "",
        f"## Robustness: site {cfg['bad_site']} of {cfg['sites']} misbehaves",
        "",
        "Jaccard = overlap of pruned channel sets with the clean plan (1 = same plan). `vs clean mean`: against "
        "the plan from all honest sites with the exact mean; `vs clean same method`: against the same aggregation "
        "with no attack. U/R = forget/retained test accuracy right after pruning (no fine-tune).",
        "",
        "| attack | server screen | aggregation | rejected sites | Jaccard vs clean mean "
        "| Jaccard vs clean same method "
        "| U acc pruned | R acc pruned | same attack, no screen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["robustness"]:
        lines.append(
            f"| {r['attack']} | {r['screen']} | {r['method']} | {r['rejected_sites'] or '-'} | "
            f"{fmt(r['jaccard_vs_clean_mean'])} | {fmt(r['jaccard_vs_clean_same_method'])} | "
            f"{r['u_acc_pruned']['mean']:.3f} | {r['r_acc_pruned']['mean']:.3f} | {r['unscreened']} |"
        )
    p = result["privacy_setup"]
    lines += [
        "",
        "## Privacy: Gaussian noise on each site's per-class sums",
        "",
        f"Per-image activations clipped to [0, {p['clip_bound']}] ({100 * p['fraction_of_activations_clipped']:.2f} % "
        f"of values clipped), images per class per site {p['images_per_class_per_site']['min']:.0f} to "
        f"{p['images_per_class_per_site']['max']:.0f} (mean {p['images_per_class_per_site']['mean']:.1f}), "
        f"min count {p['min_count']} ({p['classes_dropped_by_min_count']} site-classes dropped), "
        f"{p['total_channels']} channels, L2 sensitivity {p['l2_sensitivity']:.3f} per added/removed image, "
        f"delta {p['delta']}, counts public, sigma from the analytic Gaussian mechanism, noise added by every site "
        f"to its own upload, exact mean aggregation, {cfg['noise_seeds']} noise seeds x 10 forget classes "
        f"(fine-tuned columns: the first {cfg['ft_seeds']} seed(s) x 10 classes). "
        f"Clipping alone (no noise) vs the unclipped plan: Jaccard {fmt(p['jaccard_clipped_vs_unclipped'])}. "
        f"Fine-tune: {cfg['ft_epochs']} epochs of SGD (lr {cfg['ft_lr']}) on the retained classes, centralized.",
        "",
        "| epsilon | sigma per site | Jaccard vs noiseless | U acc pruned | R acc pruned | U acc fine-tuned "
        "| R acc fine-tuned | channels pruned per layer (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["privacy"]:
        sigma = "-" if r["sigma_per_site"] is None else f"{r['sigma_per_site']:.3f}"
        lines.append(
            f"| {r['epsilon']} | {sigma} | {fmt(r['jaccard_vs_noiseless'])} | "
            f"{r['u_acc_pruned']['mean']:.3f} | {r['r_acc_pruned']['mean']:.3f} | "
            f"{r['u_acc_finetuned']['mean']:.3f} | {r['r_acc_finetuned']['mean']:.3f} | "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["pruned_per_layer"].items())
            + " |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
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
    ax1.set_title(f"1 of {result['config']['sites']} sites misbehaves (after screening)")
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results folder")
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--bad-site", type=int, default=0)
    p.add_argument(
        "--prune-ratio", type=float, default=0.3, help="prune ratio; 0.3 as tests/test_fl_simenv.py uses for small_cnn"
    )
    p.add_argument("--trim", type=float, default=0.1, help="trimmed_mean: fraction dropped at each end")
    p.add_argument("--clip", type=float, default=2.0, help="per-image activation bound B")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument(
        "--epsilons",
        type=lambda s: [float(v) for v in s.split(",")],
        default=[0.1, 0.5, 1.0, 4.0, 16.0, 64.0, math.inf],
        help="comma list; 'inf' = no noise",
    )
    p.add_argument("--noise-seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20, help="training epochs of the model to unlearn")
    p.add_argument("--ft-epochs", type=int, default=3)
    p.add_argument("--ft-seeds", type=int, default=1, help="noise seeds that are also fine-tuned (cost)")
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not 1 <= args.ft_seeds <= args.noise_seeds:
        p.error("--ft-seeds must be in [1, --noise-seeds]")
    if not 0 <= args.bad_site < args.sites:
        p.error(f"--bad-site must be in [0, {args.sites})")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = as_tensors(digits_dataset("train"))
    test = as_tensors(digits_dataset("test"))
    model = build_model("small_cnn", K)
    train_epochs(model, TensorBatches(*train, 64, shuffle=True, seed=args.seed), args.epochs, 0.05)
    correct, total = class_correct_total(model, TensorBatches(*test, 512), K)
    test_acc = float(correct.sum() / total.sum())
    print(f"trained small_cnn: test accuracy {test_acc:.3f}", flush=True)

    parts = partition_iid(train[1].numpy(), args.sites, seed=args.seed)
    site_reports = [collect_class_activations(model, TensorBatches(train[0][p], train[1][p], 256), K) for p in parts]
    site_acts = [per_image_activations(model, train[0][p], train[1][p]) for p in parts]
    site_labels = [train[1][p].numpy() for p in parts]
    # the per-image route must reproduce the collector's own sums before it is trusted for clipping
    for rep, acts, y in zip(site_reports, site_acts, site_labels):
        rebuilt = report_from_images(acts, y, None)
        for name in rep.layer_order:
            np.testing.assert_allclose(
                rebuilt.sums[name], rep.sums[name], rtol=1e-4, atol=1e-5
            )  # float32 convs: batch vs single image
    site_clipped = [report_from_images(a, y, args.clip) for a, y in zip(site_acts, site_labels)]
    expected = conv_channels(model)

    timings = {"setup": time.perf_counter() - t_start}
    print("robustness:", flush=True)
    t0 = time.perf_counter()
    rob = robustness(model, site_reports, site_clipped, expected, test, args)
    timings["robustness"] = time.perf_counter() - t0
    print("privacy:", flush=True)
    t0 = time.perf_counter()
    priv, priv_info = privacy(model, site_acts, site_labels, train, test, args)
    timings["privacy"] = time.perf_counter() - t0

    result = {
        "command": " ".join(
            [".venv/bin/python benchmarks/robustness_privacy.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "config": {
            k: (v if not isinstance(v, list) else [str(e) for e in v]) for k, v in vars(args).items() if k != "out"
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "model": {
            "name": "small_cnn",
            "dataset": "digits",
            "test_acc": test_acc,
            "site_sizes": [int(len(p)) for p in parts],
        },
        "robustness": rob,
        "privacy_setup": priv_info,
        "privacy": priv,
        "phase_seconds": timings,
        "seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness_privacy.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    write_markdown(out / "robustness_privacy.md", result)
    write_plot(out / "robustness_privacy.png", result)
    print(f"wrote {out}/robustness_privacy.{{json,md,png}} in {result['seconds']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
