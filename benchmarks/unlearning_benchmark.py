"""Federated class unlearning benchmark: pretrain once, then every method, then the forgetting tests.

Methods (``nvflare_unlearn.evaluation.baselines``): retrain from scratch, fine-tune only, classifier-row reset,
federated Fisher forgetting, the paper's pruning on federated statistics, and two ideas meant to make pruning earn
its place (re-initialise instead of remove; prune only the deepest layers). All run in the in-process FedAvg simulator
(``nvflare_unlearn.evaluation.fedsim``) with the same sites, client sampling, batch order and cosine lr family.

For each method: R-set / U-set accuracy after every round; rounds, wall time (statistics phase included) and
bytes moved until it reaches retrain quality; and on the final model the forgetting tests (linear probe,
relearn steps, membership inference with its power, class-wise KL to the retrained model). Writes JSON (after
every method, so a timeout still leaves results), a markdown table shaped like the paper's Table 2 plus the
forgetting tests, and PNG curves, under ``--out`` (default ``benchmarks/results/``).

    python -m benchmarks.unlearning_benchmark --mode quick
    python -m benchmarks.unlearning_benchmark --mode full --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
    RESULTS,
    add_data_root_arg,
    add_output_args,
    apply_preset,
    command_line,
    device,
    elapsed,
    fed_config,
    floats,
    log,
    machine,
    parser,
    strs,
    utc_now,
    write_json,
)
from benchmarks.unlearning_eval import (
    Data,
    TrainCache,
    build_eval_sets,
    curve_eval,
    finish_costs,
    forgetting_tests,
    load_data,
)
from benchmarks.unlearning_tables import markdown, plot_run
from nvflare_unlearn import _io
from nvflare_unlearn.data import partition_biased
from nvflare_unlearn.evaluation import accuracy_report, compare_class_accuracy
from nvflare_unlearn.evaluation.baselines import METHODS, PruneOptions, prepare_method
from nvflare_unlearn.evaluation.fedsim import CostMeter, FedConfig, Federation, run_fedavg, state_bytes
from nvflare_unlearn.models import build_model
from nvflare_unlearn.options import PlanOptions, ScoringOptions

# -------------------------------------------------------------------------------------------------- presets
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds-to-minutes smoke run: sklearn digits, the small CNN, 4 sites.
    "quick": dict(
        dataset="digits", model="small_cnn", train_images=None, sites=4, clients_per_round=3, q="0.1",
        pretrain_rounds=20, retrain_rounds=20, ft_rounds=6, lr=0.05, ft_lr=0.02,
        batch_size=32, local_epochs=1, augment="none", eval_n=None,
        relearn_forget_n=20, relearn_retain_n=200, relearn_target=0.5, relearn_lr=0.01, relearn_batch=32,
        relearn_max_steps=200, relearn_eval_every=2,
        probe_train_n=None, mia_n=None, fisher_alpha=1e-6, fisher_images=None, threads=1,
    ),
}
# The full setting: ResNet20, 20,000 real CIFAR-10 training images, 10 sites, bias q = 0.1.
# Sized for <= 60 min on a 2-core CPU; a few minutes on one GPU. The rest as in the quick run.
PRESETS["full"] = PRESETS["quick"] | dict(
    dataset="cifar10", model="resnet20", train_images=20000, sites=10, clients_per_round=5,
    pretrain_rounds=24, retrain_rounds=24, ft_lr=0.01, batch_size=64, augment="flip", eval_n=2000,
    relearn_forget_n=100, relearn_retain_n=900, relearn_batch=64, relearn_max_steps=300, relearn_eval_every=10,
    probe_train_n=5000, mia_n=3000, fisher_images=400, threads=2,
)
# fmt: on

SWEEP_KEYS = ("ratio", "scope", "tf_norm", "idf", "direction", "hook_point", "stats_images", "prune_mode")
SWEEP_DEFAULTS = dict(zip(SWEEP_KEYS, ("0.05", "global", "share", "paper", "highest", "conv", "all", "remove")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--mode", choices=sorted(PRESETS), default="quick", help="preset; any flag below overrides it")
    p.add_argument("--dataset", choices=["digits", "cifar10", "cifar100"])
    p.add_argument("--model", help="registry name: small_cnn, resnet20/32/44/56, vgg11/13/16/19")
    add_data_root_arg(p)
    p.add_argument("--train-images", type=int, help="class-balanced subset of the training split (CIFAR)")
    p.add_argument("--forget", default=None, help="comma-separated class ids (default: the last class, as the paper)")
    p.add_argument("--q", default=None, help="comma-separated bias probabilities (Fang et al. partition)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (partition, init, sampling)")
    p.add_argument("--sites", type=int)
    p.add_argument("--clients-per-round", type=int)
    p.add_argument("--pretrain-rounds", type=int)
    p.add_argument("--retrain-rounds", type=int)
    p.add_argument("--ft-rounds", type=int, help="fine-tuning rounds for every non-retrain method")
    p.add_argument(
        "--ft-stop-at-quality",
        action="store_true",
        help="end each fine-tune at the first round that reaches retraining's R accuracy (-1 point) "
        "with U <= 1 %% (--ft-rounds is then the cap), so the forgetting tests compare models at "
        "equal accuracy quality; needs retrain among --methods",
    )
    p.add_argument("--lr", type=float, help="peak lr of pretraining and retraining (cosine to 0)")
    p.add_argument("--ft-lr", type=float, help="peak lr of every fine-tune (cosine to 0)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--augment", choices=["none", "flip", "crop_flip"])
    p.add_argument("--eval-n", type=int, help="test images for per-round curves (final tests use the full test set)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--relearn-target", type=float, help="forget-class test accuracy that ends the relearn test")
    p.add_argument("--relearn-max-steps", type=int)
    p.add_argument("--relearn-eval-every", type=int, help="relearn resolution in optimizer steps")
    p.add_argument("--relearn-lr", type=float)
    p.add_argument("--mia-n", type=int, help="retained members / non-members per membership test")
    p.add_argument("--probe-train-n", type=int, help="training images behind the linear probe")
    p.add_argument("--fisher-alpha", type=float)
    p.add_argument("--fisher-images", type=int, help="retained images per participating site for the Fisher")
    p.add_argument("--deep-fraction", type=float, default=1.0 / 3.0, help="prune_deep: last fraction of conv layers")
    for key in SWEEP_KEYS:
        p.add_argument(
            "--" + key.replace("_", "-"),
            default=None,
            help=f"sweep list for the prune method (default {SWEEP_DEFAULTS[key]})",
        )
    p.add_argument("--probe-tol", type=float, default=0.01, help="AUC slack when comparing probes with retrain")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_output_args(p, RESULTS, threads=None)
    p.add_argument("--no-cache", action="store_true", help="do not reuse cached pretrained/retrained models")
    args = p.parse_args(argv)
    return apply_preset(apply_preset(args, PRESETS[args.mode]), SWEEP_DEFAULTS)


# -------------------------------------------------------------------------------------------------- methods
def prune_variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Cartesian product of the sweep lists (the default is one variant: the paper's settings)."""
    lists = {
        "ratio": floats(args.ratio),
        "scope": strs(args.scope),
        "tf_norm": strs(args.tf_norm),
        "idf": strs(args.idf),
        "direction": strs(args.direction),
        "hook_point": strs(args.hook_point),
        "stats_images": strs(args.stats_images),
        "prune_mode": strs(args.prune_mode),
    }
    return [dict(zip(lists, combo)) for combo in itertools.product(*lists.values())]


def variant_name(method: str, v: dict[str, Any], n_variants: int) -> str:
    if n_variants == 1:
        return method
    diff = [f"{k}={v[k]}" for k in SWEEP_KEYS if str(v[k]) != str(SWEEP_DEFAULTS[k])]
    return f"{method}[{','.join(diff) or 'default'}]"


def prune_options(v: dict[str, Any], n_participants: int) -> PruneOptions:
    stats = None if v["stats_images"] == "all" else max(1, int(v["stats_images"]) // max(1, n_participants))
    return PruneOptions(
        plan=PlanOptions(
            prune_ratio=float(v["ratio"]), scope=v["scope"], direction=v["direction"], prune_mode=v["prune_mode"]
        ),
        scoring=ScoringOptions(
            tf_norm=v["tf_norm"],
            idf=v["idf"],
            hook_point=v["hook_point"],
            coe=1.0 if v["tf_norm"] == "balance" else None,
        ),
        images_per_site=stats,
    )


def write_outputs(report: dict[str, Any], stem: Path, final: bool) -> None:
    """JSON always (atomically); markdown and plots as well. Called after every method."""
    report["wall_s"] = elapsed()
    report["complete"] = final
    write_json(stem.with_name(stem.name + ".json"), report)
    for run in report["runs"]:
        png = stem.with_name(f"{stem.name}_q{run['q']}_s{run['seed']}.png")
        try:
            plot_run(
                run,
                png,
                f"{report['config']['model']} / {report['config']['dataset']}, forget "
                f"{report['config']['forget']}, q={run['q']}, seed={run['seed']}",
            )
            run["plots"] = png.name
        except Exception as exc:  # a plotting failure must not lose the numbers
            log(f"plot failed: {exc}")
    _io.write_text(stem.with_name(stem.name + ".md"), markdown(report))


PAPER_REFERENCE = {
    "source": "Wang et al. WWW 2022, Table 2 (CIFAR-10, ResNet20, unlearning the last class; 100 clients, "
    "FedAvg, R=0.05)",
    "raw": {"u": 0.9150, "r": 0.8333},
    "after_pruned": {"u": 0.0, "r": 0.2079},
    "fine_tuned": {"u": 0.0, "r": 0.8640},
    "retrained": {"u": 0.0, "r": 0.8633},
    "speedup": 8.9,
}


@dataclass
class Bench:
    """What every (q, seed) of a run shares: the flags, the data, the forget classes, the curve, the report."""

    args: argparse.Namespace
    data: Data
    forget: list[int]
    curve: Callable[[torch.nn.Module, int], dict[str, Any]]
    report: dict[str, Any]
    stem: Path


@dataclass
class Run:
    """One (q, seed) of a benchmark run: its federation, test sets, cached trainer and the results so far."""

    args: argparse.Namespace
    data: Data
    forget: list[int]
    fed: Federation
    participants: list[int]
    seed: int
    cache: TrainCache
    record: dict[str, Any]

    def schedule(self, rounds: int, lr: float) -> FedConfig:
        """Every FedAvg schedule of the run: the flags' sites, epochs, batch and augmentation, this seed."""
        return fed_config(self.args, rounds=rounds, lr=lr, seed=self.seed)


def retrain(run: Run) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Retraining from scratch without the forget classes (cached): the reference every method is held to."""
    model, hist, cost, cached = run.cache.train(
        run.schedule(run.args.retrain_rounds, run.args.lr), run.forget, "retrain", forget=run.forget
    )
    # the cached curve may come from another test set: the target for the others is re-measured
    return model, dict(history=hist, cost=cost, cached=cached, final_curve_now=run.cache.eval_fn(model, len(hist)))


def unlearn(run: Run, method: str, variant: dict[str, Any], original: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """``method``'s preparation of the original, then the shared FedAvg fine-tune on the retained classes."""
    args, res = run.args, {}
    meter = CostMeter()
    opts = None
    if method.startswith("prune"):
        opts = prune_options(variant, len(run.participants))
        if method == "prune_deep":
            opts.plan = dataclasses.replace(opts.plan, deep_fraction=args.deep_fraction)
        res["options"] = opts.to_dict()
    extra = {"prune_opts": opts, "fisher_alpha": args.fisher_alpha, "fisher_images_per_site": args.fisher_images}
    prep = prepare_method(method, original, run.fed, run.forget, run.participants, meter, seed=run.seed, **extra)
    model = prep.model
    res["prepare_info"] = prep.info
    res["after_prepare_curve"] = run.cache.eval_fn(model, 0)
    full_ap = accuracy_report(model, (run.data.xt, run.data.yt), run.data.num_classes, run.forget)
    res["after_prepare"] = {"u_acc": full_ap["u_acc"], "r_acc": full_ap["r_acc"]}
    res["prepare_cost"] = meter.snapshot()
    res["params_after_prepare"] = int(sum(p.numel() for p in model.parameters()))
    res["state_bytes_after_prepare"] = state_bytes(model)
    log(
        f"  after prepare: U {full_ap['u_acc']:.4f} R {full_ap['r_acc']:.4f} "
        f"({meter.total_s:.1f}s, {res['params_after_prepare']} params)"
    )
    after = None
    if opts is not None and opts.plan.prune_mode == "mask":
        from nvflare_unlearn.method.prune import enforce_masks

        after = enforce_masks
    stop = None
    if args.ft_stop_at_quality:
        target = run.record["results"]["retrain"]["final_curve_now"]["r_acc"] - 0.01

        def stop(rec: dict[str, Any], target: float = target) -> bool:
            return rec["r_acc"] >= target and rec["u_acc"] <= 0.01

    ft = run.schedule(args.ft_rounds, args.ft_lr)
    hooks = {"eval_fn": run.cache.eval_fn, "after_step": after, "stop_fn": stop}
    hist = run_fedavg(model, run.fed, ft, drop_classes=run.forget, meter=meter, phase="finetune", **hooks)
    res.update(history=hist, cost=meter.snapshot(), cached=False)
    return model, res


def method_variants(args: argparse.Namespace, method: str) -> list[dict[str, Any]]:
    """The prune sweep's variants, or the one setting of the sweep flags for every other method."""
    if method == "prune":
        return prune_variants(args)
    return [{k: (strs(v)[0] if k != "ratio" else floats(v)[0]) for k, v in ((k, getattr(args, k)) for k in SWEEP_KEYS)}]


def run_seed(bench: Bench, q: float, seed: int) -> None:
    """Pretrain (cached), test the original, then every method of ``--methods`` on one partition and seed."""
    args, data, forget, report = bench.args, bench.data, bench.forget, bench.report
    record: dict[str, Any] = {"q": q, "seed": seed, "results": {}}
    report["runs"].append(record)
    torch.manual_seed(seed)
    dev, k = data.x.device, data.num_classes
    fed = Federation(data.x, data.y, partition_biased(data.y.cpu().numpy(), args.sites, q, seed=seed), k, dev)
    record["site_class_counts"] = fed.class_counts().tolist()
    build_eval_sets(data, forget, args, seed)
    participants = fed.sample_sites(-1, args.clients_per_round, seed)
    record["stats_participants"] = participants

    def make_model(seed: int = seed) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(args.model, k).to(dev)

    key = {**{f: getattr(args, f) for f in ("dataset", "model", "train_images", "sites")}, "q": q, "seed": seed}
    cache = TrainCache(
        Path(args.out) / "unlearning_cache", {**key, "version": 1}, make_model, fed, bench.curve, not args.no_cache
    )
    run = Run(args, data, forget, fed, participants, seed, cache, record)
    original, pre_hist, pre_cost, pre_cached = cache.train(run.schedule(args.pretrain_rounds, args.lr), [], "pretrain")
    record["pretrain"] = {"cost": pre_cost, "cached": pre_cached, "final_curve": pre_hist[-1] if pre_hist else None}
    log("testing the original model")
    record["results"]["original"] = {"tests": forgetting_tests(original, data, forget, args, seed, None)}
    write_outputs(report, bench.stem, final=False)

    ref_class_acc = None
    methods = report["config"]["methods"]
    for method in (["retrain"] if "retrain" in methods else []) + [m for m in methods if m != "retrain"]:
        variants = method_variants(args, method)
        for v in variants:
            name = variant_name(method, v, len(variants))
            log(f"method {name}")
            model, res = retrain(run) if method == "retrain" else unlearn(run, method, v, original)
            res = {"method": method, **res}
            log(
                f"  final curve: R {res['history'][-1]['r_acc']:.4f} U {res['history'][-1]['u_acc']:.4f}; "
                f"running forgetting tests"
            )
            res["tests"] = forgetting_tests(model, data, forget, args, seed, ref_class_acc)
            if method == "retrain":
                ref_class_acc = res["tests"]["accuracy"]["class_acc"]
                for acc in (record["results"]["original"]["tests"]["accuracy"], res["tests"]["accuracy"]):
                    acc.update(compare_class_accuracy(acc["class_acc"], ref_class_acc))
            a, t = res["tests"]["accuracy"], res["tests"]
            log(
                f"  {name}: U {a['u_acc']:.4f} R {a['r_acc']:.4f} probe AUC {t['probe']['auc']:.3f} "
                f"relearn {t['relearn']['steps']} MIA power {t['mia']['loss']['power_accuracy']:.3f} "
                f"control {t['mia']['loss']['forget_accuracy']:.3f} ({t['test_seconds']:.0f}s tests)"
            )
            record["results"][name] = res
            finish_costs(record, args)
            write_outputs(report, bench.stem, final=False)


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    methods = strs(args.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {METHODS}")
    if args.ft_stop_at_quality and "retrain" not in methods:
        raise SystemExit("--ft-stop-at-quality needs retrain among --methods (its accuracy is the stopping target)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    log(f"mode {args.mode} on {dev}: loading {args.dataset}")
    data = load_data(args, dev)
    K = data.num_classes
    forget = [int(c) for c in strs(args.forget)] if args.forget else [K - 1]
    if any(not 0 <= c < K for c in forget) or len(set(forget)) >= K:
        raise SystemExit(f"--forget must name distinct class ids in 0..{K - 1}, not all of them")
    log(
        f"{data.x.shape[0]} train / {data.xt.shape[0]} test images, {K} classes, forget {forget} "
        f"({', '.join(data.classes[c] for c in forget)})"
    )

    ftag = "+".join(str(c) for c in forget)
    stem = out / f"unlearning_{args.mode}_{args.dataset}_{args.model}_f{ftag}{('_' + args.tag) if args.tag else ''}"
    report: dict[str, Any] = {
        "generated_utc": utc_now(),
        "command": command_line("unlearning_benchmark", argv),
        "machine": machine(dev),
        "config": {
            **vars(args),
            "forget": forget,
            "methods": methods,
            "train_images_used": int(data.x.shape[0]),
            "test_images": int(data.xt.shape[0]),
            "eval_images": int(data.eval_idx.size),
            "class_names": data.classes,
        },
        "paper_reference": PAPER_REFERENCE,
        "runs": [],
    }
    bench = Bench(args, data, forget, curve_eval(data, forget), report, stem)
    for q, seed in itertools.product(floats(args.q), [int(s) for s in strs(args.seeds)]):
        run_seed(bench, q, seed)
    write_outputs(report, stem, final=True)
    log(f"done: {stem.with_name(stem.name + '.json')} and .md")
    return report


if __name__ == "__main__":
    main()
