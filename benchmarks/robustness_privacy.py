"""How much bad sites, and how much privacy noise, change the plan, the fine-tuned model and its evaluation.

Setting: scikit-learn's digits (1,347 train / 450 test images, 10 classes), ``small_cnn`` trained here, the train
and test splits spread IID over ``--num-clients`` sites, prune ratio ``--prune-ratio``, paper defaults for scoring.
Everything runs in one process with the package's own functions (``nvflare_unlearn.protect.robust`` is what the
NVFlare aggregator and controller call; ``tests/test_fl_robustness.py`` checks they call exactly these).

1. Screening (1 bad site): x1000 sums, x1000 on the forget-class row of the channels it scores lowest (targeted), a
   NaN, a class swap; mean / median / trimmed_mean; plan Jaccard vs the clean plan and U/R after pruning.
2. Activation-phase attacks, 1 and 2 malicious of 10, every forget class: a report whose class means all lie
   inside the clip bound, crafted against the forget class (B on the half of each layer the site scores lowest, 0
   on the rest), alone and with its counts x10^6. Each aggregation option, with and without the count cap.
3. Fine-tuning attacks, 1 and 2 malicious of 10, ``--ft-classes``: a site that boosts its update x10, or trains the
   forgotten class back in (its forget-class images x5), or both, each claiming 10^12 training steps. FedAvg as
   NVFlare does it (weights as claimed), and the package's aggregation options (capped weights, update clipping):
   U and R after ``--ft-rounds`` rounds, starting from the default (median) plan.
4. Evaluation attacks, 1 and 2 malicious of 10: a site reporting ``total[f] = 10^9, correct[f] = 0``, or claiming
   the forget class is forgotten (correct 0) or remembered (correct = total). Plain pooled sums (the old
   behaviour), pooled with size caps, the robust default (caps + outlier sites left out), the median of sites.
5. Privacy: per-image activations clipped to ``[0, --clip]``, min count ``--min-count``, Gaussian noise on each
   site's sums at (epsilon, ``--delta``) for each epsilon in ``--epsilons`` (``inf`` = no noise), exact mean.

Run: ``.venv/bin/python -m benchmarks.robustness_privacy``; it writes
``benchmarks/results/robustness_privacy.{json,md,png}`` and ``robustness_attacks.png`` (the JSON records the wall
time of each phase); ``python -m benchmarks.render_reliability`` rebuilds the tables of ``docs/reliability.md`` from
it. The attacks are in ``robustness_attacks``, the tables and plots in ``robustness_tables``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import RESULTS, add_output_args, command_line, floats, parser, write_json
from benchmarks.robustness_attacks import activation_attacks, evaluation_attacks, finetune_attacks
from benchmarks.robustness_plans import (
    METHODS,
    K,
    finetune_eval,
    jaccard,
    make_plan,
    per_image_activations,
    per_layer,
    pruned_set,
    report_from_images,
    summarize,
    u_r,
)
from benchmarks.robustness_tables import markdown, write_attack_plot, write_plot
from nvflare_unlearn import _io
from nvflare_unlearn.data import digits_dataset, partition_iid
from nvflare_unlearn.evaluation import class_correct_total, train_epochs
from nvflare_unlearn.method.activations import ClassActivationReport, collect_class_activations
from nvflare_unlearn.method.graph import conv_channels
from nvflare_unlearn.method.prune import apply_pruning_plan
from nvflare_unlearn.method.selection import build_pruning_plan
from nvflare_unlearn.method.tfidf import tfidf_scores
from nvflare_unlearn.models import build_model
from nvflare_unlearn.options import SecurityOptions
from nvflare_unlearn.protect.privacy import (
    apply_min_count,
    gaussian_noise,
    gaussian_sigma,
    sensitivity,
    total_channels,
)
from nvflare_unlearn.protect.robust import (
    aggregate_class_means,
    screen_report,
)
from nvflare_unlearn.runtime.batches import TensorBatches, as_tensors

# ------------------------------------------------------------------------------------------------ experiments


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


def robustness(model, site_reports, site_clipped, expected, test, args) -> list[dict]:
    rows = []
    # clean plans: {screen: {method: {forget class: pruned set}}}
    clean = {
        screen: {
            m: {
                f: pruned_set(make_plan(model, aggregate_class_means(reps, m, args.trim), f, args.prune_ratio))
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
                plan = make_plan(model, aggregate_class_means(kept, method, args.trim), f, args.prune_ratio)
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


def privacy_row(epsilon: float | str, sigma: float | None, plans: list, jac: list[float], accs: tuple) -> dict:
    """One row of the privacy table: the plans' overlap with the noiseless ones and U / R before and after
    fine-tuning (``accs``: U and R pruned, U and R fine-tuned, one value per plan)."""
    row = {"epsilon": epsilon, "sigma_per_site": sigma, "pruned_per_layer": per_layer(plans)}
    row["jaccard_vs_noiseless"] = summarize(jac)
    names = ("u_acc_pruned", "r_acc_pruned", "u_acc_finetuned", "r_acc_finetuned")
    return row | {name: summarize(values) for name, values in zip(names, accs)}


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
    ref = {f: make_plan(model, aggregate_class_means(clipped, "mean"), f, args.prune_ratio) for f in range(K)}
    unclipped_plans = {
        f: make_plan(model, aggregate_class_means(unclipped, "mean"), f, args.prune_ratio) for f in range(K)
    }
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
                plan = make_plan(model, aggregate_class_means(noisy, "mean"), f, args.prune_ratio)
                plans.append(plan)
                jac.append(jaccard(pruned_set(plan), pruned_set(ref[f])))
                pruned = apply_pruning_plan(copy.deepcopy(model), plan)
                u0, r0 = u_r(pruned, test, f)
                u0s.append(u0), r0s.append(r0)
                if seed < args.ft_seeds:
                    u1, r1 = finetune_eval(pruned, train, test, f, args.ft_epochs, args.ft_lr, seed)
                    u1s.append(u1), r1s.append(r1)
        rows.append(privacy_row("inf" if math.isinf(eps) else eps, sigma, plans, jac, (u0s, r0s, u1s, r1s)))
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
        plan = build_pruning_plan(model, scores, args.prune_ratio, forget_class=f)
        plans.append(plan)
        jac.append(jaccard(pruned_set(plan), pruned_set(ref[f])))
        pruned = apply_pruning_plan(copy.deepcopy(model), plan)
        u0, r0 = u_r(pruned, test, f)
        u1, r1 = finetune_eval(pruned, train, test, f, args.ft_epochs, args.ft_lr, args.seed)
        u0s.append(u0), r0s.append(r0), u1s.append(u1), r1s.append(r1)
    rows.append(privacy_row("random channels", None, plans, jac, (u0s, r0s, u1s, r1s)))
    print(
        f"  privacy random channels: jaccard {np.mean(jac):.3f} fine-tuned U/R {np.mean(u1s):.3f}/{np.mean(r1s):.3f}",
        flush=True,
    )
    return rows, info


# ------------------------------------------------------------------------------------------------ main
EPSILONS = [0.1, 0.5, 1.0, 4.0, 16.0, 64.0, math.inf]
SECTIONS = ("screening", "activation", "finetune", "evaluation", "privacy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(__doc__, full_help=False)
    add_output_args(p, RESULTS, threads=1, tag=False)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--bad-site", type=int, default=0)
    p.add_argument("--prune-ratio", type=float, default=0.3, help="0.3: tests/test_fl_simenv.py's for small_cnn")
    p.add_argument("--trim", type=float, default=0.1, help="trimmed_mean: fraction dropped at each end")
    p.add_argument("--clip", type=float, default=2.0, help="per-image activation bound B")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--epsilons", type=floats, default=EPSILONS, help="comma list; 'inf' = no noise")
    p.add_argument("--noise-seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20, help="training epochs of the model to unlearn")
    p.add_argument("--ft-epochs", type=int, default=3)
    p.add_argument("--ft-seeds", type=int, default=1, help="noise seeds that are also fine-tuned (cost)")
    p.add_argument("--ft-lr", type=float, default=0.01)
    for name in ("size_cap_factor", "update_clip", "update_outlier", "eval_outlier_tol"):  # the job's defaults
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(SecurityOptions, name))
    p.add_argument(
        "--ft-classes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[3, 5, 9],
        help="forget classes of the fine-tuning and evaluation attacks (the first one for the evaluation)",
    )
    p.add_argument("--ft-rounds", type=int, default=3, help="federated fine-tuning rounds of the attack runs")
    p.add_argument("--ft-batch", type=int, default=16)
    p.add_argument("--ft-local-epochs", type=int, default=1, help="local epochs per federated fine-tuning round")
    p.add_argument("--ft-fed-lr", type=float, default=0.02, help="local lr of the federated fine-tuning")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of the parts to run (the rest: left out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", default=None, help="rewrite the markdown and plots of this results JSON (no run)")
    args = p.parse_args(argv)
    args.sections = [v for v in args.sections.split(",") if v]
    if not 1 <= args.ft_seeds <= args.noise_seeds:
        p.error("--ft-seeds must be in [1, --noise-seeds]")
    if not 0 <= args.bad_site < args.num_clients:
        p.error(f"--bad-site must be in [0, {args.num_clients})")
    return args


def write_outputs(out: Path, result: dict) -> None:
    """The JSON, the markdown page and the plots of one run (``--replot`` rebuilds the last two from the JSON)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "robustness_privacy.json", result)
    _io.write_text(out / "robustness_privacy.md", markdown(result))
    if "robustness" in result and "privacy" in result:
        write_plot(out / "robustness_privacy.png", result)
    if {"activation_attacks", "finetune_attacks", "evaluation_attacks"} <= set(result):
        write_attack_plot(out / "robustness_attacks.png", result)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        write_outputs(Path(args.out), result)
        return result
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

    parts = partition_iid(train[1].numpy(), args.num_clients, seed=args.seed)
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
    phases = {
        "screening": lambda: {"robustness": robustness(model, site_reports, site_clipped, expected, test, args)},
        "activation": lambda: {"activation_attacks": activation_attacks(model, site_clipped, expected, test, args)},
        "finetune": lambda: {"finetune_attacks": finetune_attacks(model, site_clipped, parts, train, test, args)},
        "evaluation": lambda: {"evaluation_attacks": evaluation_attacks(model, site_clipped, parts, train, test, args)},
        "privacy": lambda: dict(
            zip(("privacy", "privacy_setup"), privacy(model, site_acts, site_labels, train, test, args))
        ),
    }
    sections: dict = {}
    for name in args.sections:
        print(f"{name}:", flush=True)
        t0 = time.perf_counter()
        sections.update(phases[name]())
        timings[name] = time.perf_counter() - t0

    result = {
        "command": command_line("robustness_privacy", argv),
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
        **sections,
        "phase_seconds": timings,
        "seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    write_outputs(out, result)
    print(f"wrote {out}/robustness_privacy.{{json,md}} and plots in {result['seconds']:.0f} s", flush=True)
    return result
