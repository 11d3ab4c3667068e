"""The attack experiments of ``benchmarks.robustness_privacy``: crafted activation reports, fine-tuning sites that
boost or relearn, and sites that lie in the federated evaluation, each against every aggregation option."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from benchmarks.render import num
from benchmarks.robustness_plans import K, jaccard, make_plan, pruned_set, summarize, u_r
from nvflare_unlearn.data import partition_iid
from nvflare_unlearn.evaluation import class_correct_total, train_epochs, u_r_accuracy
from nvflare_unlearn.method.activations import ClassActivationReport
from nvflare_unlearn.method.prune import apply_pruning_plan
from nvflare_unlearn.method.tfidf import tfidf_scores
from nvflare_unlearn.protect.robust import (
    aggregate_class_means,
    aggregate_updates,
    cap_report,
    robust_evaluation,
    screen_report,
    size_caps,
)
from nvflare_unlearn.runtime.batches import TensorBatches

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
                + " | ".join(f"{r['aggregation']}: {num(r['u_acc'], '.3f')}" for r in shown),
                flush=True,
            )
    return rows
