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

Run: ``.venv/bin/python benchmarks/robustness_privacy.py``; it writes
``benchmarks/results/robustness_privacy.{json,md,png}`` and ``robustness_attacks.png`` (the JSON records the wall
time of each phase); ``benchmarks/render_reliability.py`` rebuilds the tables of ``docs/reliability.md`` from it.
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

from nvflare_unlearn import _io
from nvflare_unlearn.data import digits_dataset, partition_iid
from nvflare_unlearn.evaluation import class_correct_total, train_epochs, u_r_accuracy
from nvflare_unlearn.method.activations import ClassActivationReport, collect_class_activations
from nvflare_unlearn.method.graph import conv_channels
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.method.prune import apply_pruning_plan
from nvflare_unlearn.method.selection import build_pruning_plan
from nvflare_unlearn.method.tfidf import tfidf_scores
from nvflare_unlearn.models import build_model
from nvflare_unlearn.options import AGGREGATIONS, SecurityOptions
from nvflare_unlearn.protect.privacy import (
    apply_min_count,
    clip_activations,
    gaussian_noise,
    gaussian_sigma,
    sensitivity,
    total_channels,
)
from nvflare_unlearn.protect.robust import (
    aggregate_class_means,
    aggregate_updates,
    cap_report,
    robust_evaluation,
    screen_report,
    size_caps,
)
from nvflare_unlearn.runtime.batches import TensorBatches, as_tensors

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
    """Layer -> [N, C]: each image's pooled activations, from the core collector itself.

    Each image is given its own "class" (labels 0..n-1 of an n-class report), so a class row of the report is one
    image's activation vector: one batched pass instead of one call per image (the model is in eval mode, so the
    batch does not change any image's activations).
    """
    rows: dict[str, list[np.ndarray]] = {}
    for start in range(0, x.shape[0], 256):
        xb = x[start : start + 256]
        rep = collect_class_activations(model, [(xb, torch.arange(xb.shape[0]))], max(2, xb.shape[0]))
        for name in rep.layer_order:
            rows.setdefault(name, []).append(np.asarray(rep.sums[name][: xb.shape[0]], dtype=np.float64))
    return {name: np.concatenate(v) for name, v in rows.items()}


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
        plan = build_pruning_plan(model, scores, args.prune_ratio, forget_class=f)
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


# ------------------------------------------------------------------------------------------------ attacks
#: Activation-phase aggregation options: (label, aggregation, trim, count cap on?). "mean, no count cap" is the
#: behaviour before issue 11 (the paper's exact mean, counts taken as reported).
ACTIVATION_OPTIONS = (
    ("mean, no count cap", "mean", 0.0, False),
    ("mean", "mean", 0.0, True),
    ("median (default)", "median", 0.0, True),
    ("trimmed_mean 0.1", "trimmed_mean", 0.1, True),
    ("trimmed_mean 0.2", "trimmed_mean", 0.2, True),
)


def attack_crafted(rep: ClassActivationReport, forget: int, clip: float, count_factor: int = 1):
    """Class means all inside [0, clip] (passes the clip screen), crafted against the forget class: its row is set
    to the bound on the half of each layer this site scores lowest and to 0 on the rest, so the channels that do NOT
    carry the class look like the class's; optionally every count x ``count_factor`` (same means, more weight)."""
    means = rep.means()
    scores = tfidf_scores(means, forget)
    counts = np.asarray(rep.counts, dtype=np.int64) * int(count_factor)
    sums = {}
    for name, sc in scores.items():
        m = np.array(means[name], dtype=np.float64)
        order = np.argsort(sc, kind="stable")
        m[forget, order[: len(sc) // 2]] = clip
        m[forget, order[len(sc) // 2 :]] = 0.0
        sums[name] = m * counts[:, None]
    return ClassActivationReport(sums, counts, rep.hook_point, list(rep.layer_order))


def server_means(reports: list[ClassActivationReport], aggregation: str, trim: float, cap: bool, factor: float):
    """What the NVFlare aggregator computes: weights capped (``size_caps`` + ``cap_report``), then combined."""
    if cap:
        caps = size_caps({str(i): float(np.sum(r.counts)) for i, r in enumerate(reports)}, None, factor)
        reports = [cap_report(r, caps[str(i)])[0] for i, r in enumerate(reports)]
    return aggregate_class_means(reports, aggregation, trim)


def activation_attacks(model, site_clipped, expected, test, args) -> list[dict]:
    """Rows of (malicious sites, attack, aggregation option): plan Jaccard vs the honest plan, U/R after pruning."""
    honest_ref = {
        f: pruned_set(make_plan(model, aggregate_class_means(site_clipped, "mean"), f, args.prune_ratio))
        for f in range(K)
    }
    rows = []
    variants = [(0, "none", 1)] + [(b, a, c) for b in (1, 2) for a, c in (("crafted", 1), ("crafted_x1e6", 10**6))]
    for n_bad, attack, factor in variants:
        for label, aggregation, trim, cap in ACTIVATION_OPTIONS:
            jac, us, rs, rejected = [], [], [], 0
            for f in range(K):
                sent = list(site_clipped)
                for b in range(n_bad):
                    sent[b] = attack_crafted(sent[b], f, args.clip, factor)
                kept = [r for r in sent if screen_report(r, expected, K, clip_bound=args.clip) is None]
                rejected += len(sent) - len(kept)
                means = server_means(kept, aggregation, trim, cap, args.size_cap_factor)
                plan = make_plan(model, means, f, args.prune_ratio)
                jac.append(jaccard(pruned_set(plan), honest_ref[f]))
                u, r = u_r(apply_pruning_plan(copy.deepcopy(model), plan), test, f)
                us.append(u), rs.append(r)
            rows.append(
                {
                    "malicious": n_bad,
                    "attack": attack,
                    "aggregation": label,
                    "rejected_reports": rejected,
                    "jaccard_vs_honest": summarize(jac),
                    "u_acc_pruned": summarize(us),
                    "r_acc_pruned": summarize(rs),
                }
            )
            print(
                f"  activation {n_bad} bad {attack:13s} {label:20s} jaccard {np.mean(jac):.3f} "
                f"(min {np.min(jac):.3f}) U {np.mean(us):.3f} R {np.mean(rs):.3f}",
                flush=True,
            )
    return rows


#: Fine-tuning options: (label, aggregation, trim, caps and clipping on?, outlier filter on?). "FedAvg as NVFlare" =
#: weights as the sites claim them, no clipping (NVFlare's WeightedAggregationHelper, the behaviour before issue 11).
FINETUNE_OPTIONS = (
    ("FedAvg as NVFlare (claimed weights)", "mean", 0.0, False, False),
    ("mean (capped, clipped, outliers out)", "mean", 0.0, True, True),
    ("median, no outlier filter", "median", 0.0, True, False),
    ("median (default)", "median", 0.0, True, True),
    ("trimmed_mean 0.2", "trimmed_mean", 0.2, True, True),
)
FINETUNE_ATTACKS = ("none", "boost_x10", "relearn", "relearn_boost_x10")


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _load(model: torch.nn.Module, params: dict[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in params.items()})


def federated_finetune(pruned, site_data, forget, n_bad, attack, option, args, seed) -> torch.nn.Module:
    """``--ft-rounds`` FedAvg rounds on the retained classes; sites ``0..n_bad-1`` run ``attack``."""
    _label, aggregation, trim, protected, outlier = option
    model = copy.deepcopy(pruned)
    local = copy.deepcopy(pruned)
    for rnd in range(args.ft_rounds):
        base = _state(model)
        params, claimed = [], []
        for s, (x, y) in enumerate(site_data):
            bad = s < n_bad and attack != "none"
            keep = y != forget
            xs, ys = x[keep], y[keep]
            if bad and attack.startswith("relearn"):  # trains the forgotten class back in, 5 copies of each image
                xs = torch.cat([xs] + [x[~keep]] * 5)
                ys = torch.cat([ys] + [y[~keep]] * 5)
            _load(local, base)
            batches = TensorBatches(xs, ys, args.ft_batch, shuffle=True, seed=seed * 1000 + rnd * 100 + s)
            train_epochs(local, batches, args.ft_local_epochs, args.ft_fed_lr)
            p = _state(local)
            if bad and attack.endswith("boost_x10"):  # model replacement: the update scaled up
                p = {
                    k: (base[k] + 10.0 * (v - base[k])).astype(v.dtype) if v.dtype.kind == "f" else v
                    for k, v in p.items()
                }
            params.append(p)
            claimed.append(1e12 if bad else float(len(ys)))
        if protected:
            caps = size_caps({str(i): w for i, w in enumerate(claimed)}, None, args.size_cap_factor)
            weights = [min(w, caps[str(i)]) for i, w in enumerate(claimed)]
            new, _info = aggregate_updates(
                base, params, weights, aggregation, trim, args.update_clip, args.update_outlier if outlier else None
            )
        else:
            new, _info = aggregate_updates(base, params, claimed, "mean", 0.0, None, None)
        _load(model, new)
    return model


def finetune_attacks(model, site_clipped, site_parts, train, test, args) -> list[dict]:
    """Rows of (malicious sites, attack, option): U and R after federated fine-tuning of the default plan."""
    site_data = [(train[0][p], train[1][p]) for p in site_parts]
    pruned = {}
    for f in args.ft_classes:
        plan = make_plan(
            model, server_means(site_clipped, "median", 0.0, True, args.size_cap_factor), f, args.prune_ratio
        )
        pruned[f] = apply_pruning_plan(copy.deepcopy(model), plan)
    rows = []
    variants = [(0, "none")] + [(b, a) for b in (1, 2) for a in FINETUNE_ATTACKS if a != "none"]
    for n_bad, attack in variants:
        for option in FINETUNE_OPTIONS:
            us, rs = [], []
            for f in args.ft_classes:
                torch.manual_seed(args.seed)
                tuned = federated_finetune(pruned[f], site_data, f, n_bad, attack, option, args, args.seed)
                u, r = u_r(tuned, test, f)
                us.append(u), rs.append(r)
            rows.append(
                {
                    "malicious": n_bad,
                    "attack": attack,
                    "aggregation": option[0],
                    "u_acc": summarize(us),
                    "r_acc": summarize(rs),
                }
            )
            print(
                f"  fine-tune {n_bad} bad {attack:18s} {option[0]:36s} U {np.mean(us):.3f} (max {np.max(us):.3f}) "
                f"R {np.mean(rs):.3f}",
                flush=True,
            )
    return rows


EVAL_OPTIONS = ("pooled sums (before)", "pooled, capped", "robust (default)", "median of sites")
EVAL_ATTACKS = ("none", "total_1e9_correct_0", "claim_forgotten", "claim_remembered")


def evaluation_attacks(model, site_clipped, site_parts, train, test, args) -> list[dict]:
    """Rows of (model, malicious sites, attack, option): the federated U/R and its error vs the honest pooled value."""
    parts = partition_iid(test[1].numpy(), args.num_clients, seed=args.seed + 1)
    models = {"original": model}
    f0 = args.ft_classes[0]
    if args.ft_rounds > 0:  # the model an honest run unlearns to: default plan, default fine-tuning
        means = server_means(site_clipped, "median", 0.0, True, args.size_cap_factor)
        pruned = apply_pruning_plan(copy.deepcopy(model), make_plan(model, means, f0, args.prune_ratio))
        site_data = [(train[0][p], train[1][p]) for p in site_parts]
        models["unlearned"] = federated_finetune(pruned, site_data, f0, 0, "none", FINETUNE_OPTIONS[3], args, args.seed)
    rows = []
    for which, net in models.items():
        counts = {}
        for s, p in enumerate(parts):
            c, t = class_correct_total(net, TensorBatches(test[0][p], test[1][p], 512), K)
            counts[f"site-{s + 1}"] = (np.asarray(c, dtype=np.float64), np.asarray(t, dtype=np.float64))
        honest_c = sum(c for c, _ in counts.values())
        honest_t = sum(t for _, t in counts.values())
        honest = u_r_accuracy(honest_c.astype(np.int64), honest_t.astype(np.int64), f0)
        variants = [(0, "none")] + [(b, a) for b in (1, 2) for a in EVAL_ATTACKS if a != "none"]
        for n_bad, attack in variants:
            sent = {s: (c.copy(), t.copy()) for s, (c, t) in counts.items()}
            for b in range(n_bad):
                c, t = sent[f"site-{b + 1}"]
                if attack == "total_1e9_correct_0":
                    c[f0], t[f0] = 0.0, 1e9
                elif attack == "claim_forgotten":
                    c[f0] = 0.0
                elif attack == "claim_remembered":
                    c[f0] = t[f0]
            caps = size_caps({s: float(t.sum()) for s, (_c, t) in sent.items()}, None, args.size_cap_factor)
            no_caps = {s: math.inf for s in sent}
            corr = {s: c for s, (c, _t) in sent.items()}
            tot = {s: t for s, (_c, t) in sent.items()}
            results = {
                "pooled sums (before)": robust_evaluation(corr, tot, [f0], no_caps, math.inf, math.inf),
                "pooled, capped": robust_evaluation(corr, tot, [f0], caps, math.inf, args.size_cap_factor),
                "robust (default)": robust_evaluation(
                    corr, tot, [f0], caps, args.eval_outlier_tol, args.size_cap_factor
                ),
            }
            for option in EVAL_OPTIONS:
                if option == "median of sites":
                    got = results["robust (default)"]["median"]
                    flagged: list = []
                else:
                    got = results[option]
                    flagged = sorted(results[option]["flagged"])
                rows.append(
                    {
                        "model": which,
                        "malicious": n_bad,
                        "attack": attack,
                        "aggregation": option,
                        "u_acc": got["u_acc"],
                        "r_acc": got["r_acc"],
                        "honest_u_acc": honest["u_acc"],
                        "honest_r_acc": honest["r_acc"],
                        "flagged": flagged,
                    }
                )
            shown = [r for r in rows[-len(EVAL_OPTIONS) :]]
            print(
                f"  evaluation {which:9s} {n_bad} bad {attack:20s} honest U {honest['u_acc']:.3f} | "
                + " | ".join(f"{r['aggregation']}: {_v(r['u_acc'])}" for r in shown),
                flush=True,
            )
    return rows


# ------------------------------------------------------------------------------------------------ output
def fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} (min {s['min']:.3f})"


def _v(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def provenance(result: dict) -> list[str]:
    """Command, environment, wall time and setting of one run (shared by the results page and the docs)."""
    cfg, env = result["config"], result["environment"]
    return [
        f"Produced by `{result['command']}` in {result['seconds']:.0f} s "
        f"({env['device']}, torch {env['torch']}, {env['threads']} thread(s)). "
        f"Trained model: test accuracy {result['model']['test_acc']:.3f}. "
        f"{cfg['num_clients']} IID sites, prune ratio {cfg['prune_ratio']}, clip bound {cfg['clip']}, size cap "
        f"{cfg['size_cap_factor']} x the median site, update clip {cfg['update_clip']} x the median update norm, "
        f"outlier tolerance {cfg['eval_outlier_tol']}.",
        "",
    ]


def screening_table(result: dict) -> list[str]:
    lines = [
        "| attack | server screen | aggregation | rejected sites | Jaccard vs clean mean "
        "| Jaccard vs clean same method | U acc pruned | R acc pruned | same attack, no screen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["robustness"]:
        lines.append(
            f"| {r['attack']} | {r['screen']} | {r['method']} | {r['rejected_sites'] or '-'} | "
            f"{fmt(r['jaccard_vs_clean_mean'])} | {fmt(r['jaccard_vs_clean_same_method'])} | "
            f"{r['u_acc_pruned']['mean']:.3f} | {r['r_acc_pruned']['mean']:.3f} | {r['unscreened']} |"
        )
    return lines + [""]


def _table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> list[str]:
    """A markdown table: one row per result row, one column per (header, cell writer)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return lines + [""]


_WHO = [("malicious of 10", lambda r: str(r["malicious"])), ("attack", lambda r: r["attack"])]
_AGG = [("aggregation", lambda r: r["aggregation"])]


def activation_table(result: dict) -> list[str]:
    return _table(
        result["activation_attacks"],
        _WHO
        + _AGG
        + [
            ("Jaccard vs honest plan: mean (min)", lambda r: fmt(r["jaccard_vs_honest"])),
            ("U acc pruned: mean (max)", lambda r: f"{r['u_acc_pruned']['mean']:.3f} ({r['u_acc_pruned']['max']:.3f})"),
            ("R acc pruned", lambda r: f"{r['r_acc_pruned']['mean']:.3f}"),
        ],
    )


def finetune_table(result: dict) -> list[str]:
    return _table(
        result["finetune_attacks"],
        _WHO
        + _AGG
        + [
            ("U acc: mean (max)", lambda r: f"{r['u_acc']['mean']:.3f} ({r['u_acc']['max']:.3f})"),
            ("R acc: mean (min)", lambda r: f"{r['r_acc']['mean']:.3f} ({r['r_acc']['min']:.3f})"),
        ],
    )


def evaluation_table(result: dict) -> list[str]:
    return _table(
        result["evaluation_attacks"],
        [("model", lambda r: r["model"])]
        + _WHO
        + _AGG
        + [
            ("U acc (honest)", lambda r: f"{_v(r['u_acc'])} ({_v(r['honest_u_acc'])})"),
            ("R acc (honest)", lambda r: f"{_v(r['r_acc'])} ({_v(r['honest_r_acc'])})"),
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


def privacy_table(result: dict) -> list[str]:
    lines = [
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
    return lines + [""]


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
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
    fig.tight_layout()
    _io.write_with(path, lambda fh: fig.savefig(fh, dpi=120, format="png"))
    plt.close(fig)


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
    fig.tight_layout()
    _io.write_with(path, lambda fh: fig.savefig(fh, dpi=120, format="png"))
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
    p.add_argument("--size-cap-factor", type=float, default=SecurityOptions.size_cap_factor)
    p.add_argument("--update-clip", type=float, default=SecurityOptions.update_clip)
    p.add_argument("--update-outlier", type=float, default=SecurityOptions.update_outlier)
    p.add_argument("--eval-outlier-tol", type=float, default=SecurityOptions.eval_outlier_tol)
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
    p.add_argument(
        "--sections",
        default="screening,activation,finetune,evaluation,privacy",
        help="comma list of the parts to run (the others are left out of the results)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
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
    _io.write_json(out / "robustness_privacy.json", result)
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
        **sections,
        "phase_seconds": timings,
        "seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    write_outputs(out, result)
    print(f"wrote {out}/robustness_privacy.{{json,md}} and plots in {result['seconds']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
