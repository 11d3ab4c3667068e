"""Is the benchmarks' in-process federation (``evaluation/fedsim.py``) faithful to the NVFlare job it stands for?

One FedAvg configuration (small CNN on sklearn digits) is run twice from the same initial weights, site slices and
batch orders: as the real NVFlare job (``PretrainRecipe`` in the simulator, one process per site, plain weighted
FedAvg: ``update_aggregation="mean"``, no update clipping or outlier filter) and in-process
(``run_fedavg`` with ``FedConfig(emulate="nvflare", lr_min=lr)``: the executor's batch seeds and the server's
averaging arithmetic, a constant lr, every site each round). The same in-process run with other seeds gives the
run-to-run noise any difference is judged against; a run with fedsim's own seeds and float64 averaging shows what
emulating the job changes. Written: ``benchmarks/results/fedsim_faithfulness.json`` (tables in ``docs/benchmarks.md``).

    python -m benchmarks.fedsim_faithfulness                 # 3 sites, 5 rounds of 2 local epochs; noise: seeds 1-3
    python -m benchmarks.fedsim_faithfulness --rounds 2 --noise-seeds 1 --out /tmp/f.json   # smoke size
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import numpy as np
import torch

from benchmarks import harness
from benchmarks.render import num
from nvflare_unlearn import load_checkpoint
from nvflare_unlearn.data import digits_dataset
from nvflare_unlearn.evaluation import as_tensors, class_correct_total
from nvflare_unlearn.evaluation.fedsim import Federation, run_fedavg
from nvflare_unlearn.models import build_model
from nvflare_unlearn.runtime.batches import TensorBatches

DEFAULT_OUT = harness.RESULTS / "fedsim_faithfulness.json"
MODEL = "small_cnn"


def site_data_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"dataset": "digits", "partition": args.partition, "num_clients": args.sites, "data_seed": 0, "q": args.q}


def nvflare_run(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """The real job: PretrainRecipe in NVFlare's simulator (one thread per site, as the executor sets)."""
    from nvflare.recipe.sim_env import SimEnv

    from nvflare_unlearn.fl import PretrainRecipe, quiet_log_config, read_job_result

    job = dict(name="faithfulness", model=MODEL, num_classes=10, test_dataset="digits", tensorboard=False)
    job |= {"num_clients": args.sites, "num_rounds": args.rounds}
    job |= {k: getattr(args, k) for k in ("local_epochs", "lr", "batch_size", "seed", "partition", "q")}
    # fedsim is plain FedAvg: the job's weighted mean, without the robust defaults (median, clipping, outlier
    # filter; docs/reliability.md measures what they change on honest sites)
    job["security"] = {"update_aggregation": "mean", "update_clip": None, "update_outlier": None}
    recipe = PretrainRecipe(**job)
    env = SimEnv(
        num_clients=args.sites,
        num_threads=args.sites,
        workspace_root=workdir,
        log_config=quiet_log_config(workdir),
    )
    t0 = time.perf_counter()
    result = read_job_result(recipe.execute(env).get_result())
    wall = time.perf_counter() - t0
    model, _plan, _meta = load_checkpoint(result.model_path)
    return {
        "per_round": [
            {"round": r["round"], "acc": r["acc"], "correct": r["correct"]} for r in result.metrics["per_round"]
        ],
        "model": model,
        "wall_s": wall,
    }


def site_federation(args: argparse.Namespace) -> Federation:
    """The job's site slices, in the executor's order: each site's training split as ``load_site_split`` gives it."""
    from nvflare_unlearn.fl.site_data import load_site_split

    xs, ys, parts, start = [], [], [], 0
    for i in range(args.sites):
        x, y = as_tensors(load_site_split(f"site-{i + 1}", "train", site_data_options(args)))
        xs.append(x)
        ys.append(y)
        parts.append(np.arange(start, start + y.numel()))
        start += y.numel()
    return Federation(torch.cat(xs), torch.cat(ys), parts, 10)


def inprocess_run(args: argparse.Namespace, fed: Federation, seed: int, emulate: str) -> dict[str, Any]:
    """``run_fedavg`` with the job's schedule: constant lr, every site every round, same initial weights."""
    xt, yt = as_tensors(digits_dataset("test"))
    torch.manual_seed(seed)  # what the job's persistor does before building a fresh model
    model = build_model(MODEL, 10)
    cfg = harness.fed_config(args, clients_per_round=args.sites, lr_min=args.lr, seed=seed, emulate=emulate)

    def eval_fn(m: torch.nn.Module, _r: int) -> dict[str, Any]:
        c, t = class_correct_total(m, TensorBatches(xt, yt, 256), 10)
        return {"acc": float(c.sum() / t.sum()), "correct": c.tolist()}

    t0 = time.perf_counter()
    hist = run_fedavg(model, fed, cfg, eval_fn=eval_fn)
    return {
        "per_round": [{"round": h["round"], "acc": h["acc"], "correct": h["correct"]} for h in hist],
        "model": model,
        "wall_s": time.perf_counter() - t0,
        "config": cfg.to_dict(),
    }


def weight_distance(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, float]:
    """Max |difference| over all parameters and the relative L2 distance ||a - b|| / ||b||."""
    pa = torch.cat([p.detach().flatten().double() for p in a.parameters()])
    pb = torch.cat([p.detach().flatten().double() for p in b.parameters()])
    return {
        "max_abs": float((pa - pb).abs().max()),
        "rel_l2": float((pa - pb).norm() / pb.norm()),
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per-round accuracy differences and final weight distance between two runs."""
    acc = [x["acc"] - y["acc"] for x, y in zip(a["per_round"], b["per_round"])]
    img = [int(np.abs(np.subtract(x["correct"], y["correct"])).sum()) for x, y in zip(a["per_round"], b["per_round"])]
    return {
        "acc_diff_per_round": acc,
        "max_abs_acc_diff": float(np.max(np.abs(acc))),
        "per_class_count_diffs_per_round": img,
        **{f"weights_{k}": v for k, v in weight_distance(a["model"], b["model"]).items()},
    }


def markdown(report: dict[str, Any], path: str = "benchmarks/results/fedsim_faithfulness.json") -> list[str]:
    """Provenance, the per-round comparison and the verdict, for docs/benchmarks.md."""
    c = report["config"]
    same, own, noise = (
        report["nvflare_vs_inprocess_emulating"],
        report["nvflare_vs_inprocess_own"],
        report["noise"],
    )
    lines = [
        f"- Command: `{harness.command_now(report['command'])}`",
        f"- Machine: {report['machine']['platform']}, 1 torch thread per site / in-process, torch "
        f"{report['machine']['torch']}; generated {report['generated_utc']}; {report['wall_s']:.0f} s wall.",
        f"- Configuration: {c['model']} on digits, {c['sites']} sites ({c['partition']} partition, q = {c['q']}), all "
        f"sites every round, {c['rounds']} rounds, {c['local_epochs']} local epoch(s), batch {c['batch_size']}, "
        f"constant lr {c['lr']}, seed {c['seed']}. File: `{path}`.",
        "",
        "| round | NVFlare job: test acc | in-process, emulating it | in-process, fedsim's own seeds & averaging |",
        "|---|---|---|---|",
    ]
    for a, b, o in zip(
        report["nvflare"]["per_round"],
        report["inprocess_emulating"]["per_round"],
        report["inprocess_own"]["per_round"],
    ):
        lines.append(f"| {a['round']} | {100 * a['acc']:.2f}% | {100 * b['acc']:.2f}% | {100 * o['acc']:.2f}% |")
    lines += [
        "",
        "| comparison | max \\|Δ test acc\\| over rounds | per-class counts differing (last round) "
        "| final weights: max \\|Δ\\| | final weights: relative L2 |",
        "|---|---|---|---|---|",
    ]
    for label, x in (("NVFlare vs in-process, emulating the job", same), ("NVFlare vs in-process, own seeds", own)):
        lines.append(
            f"| {label} | {x['max_abs_acc_diff']:.4f} | {x['per_class_count_diffs_per_round'][-1]} "
            f"| {x['weights_max_abs']:.2e} | {x['weights_rel_l2']:.2e} |"
        )
    lines += [
        f"| run-to-run noise: in-process, seeds {noise['seeds']} | {num(noise['max_abs_acc_diff'], '.4f')} "
        f"| | | {num(noise['min_weights_rel_l2'], '.2e')} (closest pair) |",
        "",
        f"Emulating the job, the in-process federation agrees within the noise: "
        f"**{'yes' if report['agree_within_noise'] else 'no'}**; with its own seeds and averaging: "
        f"**{'yes' if report['own_seeds_within_noise'] else 'no'}**. Weights closer than any two "
        f"seeds (by 10x): **{'yes' if report['weights_closer_than_any_two_seeds'] else 'no'}**.",
        "",
    ]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=2, help="2: the batch order must also carry over epochs")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--partition", default="biased", choices=["iid", "biased"])
    p.add_argument("--q", type=float, default=0.5, help="bias probability of the biased partition")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed of the compared runs")
    p.add_argument("--noise-seeds", default="1,2,3", help="in-process runs with other seeds: the run-to-run noise")
    harness.add_output_args(p, DEFAULT_OUT, with_threads=False, tag=False)
    p.add_argument("--workdir", default=None, help="simulator workspace (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the sites of the simulator run with one thread each: same kernels, same rounding
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="faithfulness_") as tmp:
        workdir = args.workdir or tmp
        harness.log(f"NVFlare simulator: {args.sites} sites, {args.rounds} rounds")
        nv = nvflare_run(args, workdir)
    fed = site_federation(args)
    harness.log("in-process, emulating the job (batch seeds, averaging arithmetic)")
    same = inprocess_run(args, fed, args.seed, "nvflare")
    own = inprocess_run(args, fed, args.seed, "none")
    noise_seeds = [int(s) for s in args.noise_seeds.split(",") if s.strip()]
    harness.log(f"in-process noise runs, seeds {noise_seeds}")
    noise_runs = [inprocess_run(args, fed, s, "nvflare") for s in noise_seeds]
    runs = [same] + noise_runs
    noise_pairs = [compare(x, y) for i, x in enumerate(runs) for y in runs[i + 1 :]]
    final_accs = [r["per_round"][-1]["acc"] for r in runs]
    c_same, c_own = compare(nv, same), compare(nv, own)
    noise = {
        "seeds": [args.seed] + noise_seeds,
        "final_acc": final_accs,
        "max_abs_final_acc_diff": float(max(abs(x - y) for i, x in enumerate(final_accs) for y in final_accs[i + 1 :]))
        if len(final_accs) > 1
        else None,
        "max_abs_acc_diff": float(max(p["max_abs_acc_diff"] for p in noise_pairs)) if noise_pairs else None,
        "min_weights_rel_l2": float(min(p["weights_rel_l2"] for p in noise_pairs)) if noise_pairs else None,
    }
    floor = noise["max_abs_acc_diff"]  # the largest per-round difference between two seeds: like with like
    report = {
        "generated_utc": harness.utc_now(),
        "command": harness.command_line("fedsim_faithfulness", argv),
        "machine": harness.machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")} | {"model": MODEL},
        "nvflare": {"per_round": nv["per_round"], "wall_s": nv["wall_s"]},
        "inprocess_emulating": {"per_round": same["per_round"], "wall_s": same["wall_s"], "config": same["config"]},
        "inprocess_own": {"per_round": own["per_round"]},
        "nvflare_vs_inprocess_emulating": c_same,
        "nvflare_vs_inprocess_own": c_own,
        "noise": noise,
        "agree_within_noise": bool(floor is not None and c_same["max_abs_acc_diff"] <= floor),
        "own_seeds_within_noise": bool(floor is not None and c_own["max_abs_acc_diff"] <= floor),
        "weights_closer_than_any_two_seeds": bool(
            noise["min_weights_rel_l2"] is not None and c_same["weights_rel_l2"] < 0.1 * noise["min_weights_rel_l2"]
        ),
        "wall_s": time.perf_counter() - t_start,
    }
    harness.write_json(args.out, report)
    harness.log(
        f"NVFlare vs in-process (emulating): max |acc diff| {c_same['max_abs_acc_diff']:.4f}, "
        f"weights rel L2 {c_same['weights_rel_l2']:.2e}; own seeds: {c_own['max_abs_acc_diff']:.4f}; "
        f"seed-to-seed max |acc diff| {floor}; wrote {args.out}"
    )
    return report


if __name__ == "__main__":
    main()
