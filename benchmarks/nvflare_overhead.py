"""What NVFlare costs on top of the unlearning work: the same job as an NVFlare simulator job and in one process.

    python -m benchmarks.nvflare_overhead                          # CIFAR-10, ResNet20, 2 sites (needs the data)
    python -m benchmarks.nvflare_overhead --dataset digits --model small_cnn --rounds 1 --repeats 1   # tiny
    python -m benchmarks.nvflare_overhead --render-only            # rewrite docs/core-benchmark.md from the JSON

The NVFlare side is ``UnlearningRecipe`` run with ``run_job`` in ``SimEnv`` (one process per site, sites in
parallel, one torch thread each). The in-process side does the same work with the same code: every site task is
the plugin's own ``UnlearningExecutor.execute`` on the same data slices and options (the sites one after the other,
with one torch thread like each simulated site, ``--threads`` to change it), and the server's part is the
controller's own math (``ActivationAggregator``, ``unlearning_step``, ``apply_pruning_plan``, sample-weighted
FedAvg, per-class counts).
Both run the same phases: evaluate the original, one activation pass per forget class, prune, evaluate, then
``--rounds`` x (train + evaluate). The two are interleaved ``--repeats`` times, so load on a shared machine hits both.

Outputs ``<out>/nvflare_overhead.json`` (every run) and ``.md``; the table between
``<!-- generated:nvflare-overhead -->`` markers of docs/core-benchmark.md is rendered from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.harness import REPO_ROOT, RESULTS, add_output_args, command_line, command_now, parser, write_json
from benchmarks.render import replace_block
from nvflare_unlearn import _io

DOC = REPO_ROOT / "docs" / "core-benchmark.md"
BLOCK = "nvflare-overhead"


def options(a: argparse.Namespace) -> dict:
    site_data = dict(
        dataset=a.dataset, data_root=a.data, partition="iid", num_clients=a.num_clients, train_subset=a.train_subset
    )
    return dict(
        model=a.model,
        num_classes=10,
        forget_classes=[a.forget],
        site_data=site_data,
        training=dict(local_epochs=1, lr=0.01, batch_size=a.batch_size),
        plan=dict(prune_ratio=a.prune_ratio),
        federation=dict(num_rounds=a.rounds),
    )


# ------------------------------------------------------------------------------------------------ in one process
def in_process(a: argparse.Namespace, ckpt: str) -> dict:
    """The job's work in this process: the executor's tasks per site, the controller's math on the server side."""
    import numpy as np
    import torch
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.signal import Signal
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    from nvflare_unlearn.evaluation import u_r_accuracy
    from nvflare_unlearn.fl import ActivationAggregator, UnlearningExecutor
    from nvflare_unlearn.fl.defs import (
        META_FORGET,
        META_PLAN,
        META_PRIVACY,
        META_PRUNE_MODE,
        TASK_ACTIVATIONS,
        TASK_TRAIN,
        TASK_VALIDATE,
    )
    from nvflare_unlearn.fl.fedavg_eval_controller import site_weight
    from nvflare_unlearn.fl.model_state import load_numpy_state, rebuild_model, state_to_numpy
    from nvflare_unlearn.fl.persistor import load_initial_model
    from nvflare_unlearn.method.graph import conv_channels
    from nvflare_unlearn.method.prune import apply_pruning_plan
    from nvflare_unlearn.method.unlearning import unlearning_step
    from nvflare_unlearn.options import PlanOptions, ScoringOptions

    torch.set_num_threads(a.threads)  # the simulator's sites use one thread each (the executor's torch_threads=1)
    o = options(a)
    t_start = time.time()
    sites = [f"site-{i + 1}" for i in range(a.num_clients)]
    executors = {}
    for s in sites:
        ex = UnlearningExecutor(o["model"], 10, site_data=o["site_data"], training=o["training"], torch_threads=0)
        ex._site_name, ex._device = s, torch.device("cpu")
        executors[s] = ex
    net, plan = load_initial_model(ckpt, o["model"], 10)
    forget = o["forget_classes"]
    plan_json = plan.to_json() if plan else None
    timings: dict[str, float] = {}

    def task(name: str, params: dict, plan_json, round_num=None) -> list[FLModel]:
        meta = {META_PLAN: plan_json, META_PRUNE_MODE: "remove", META_FORGET: forget, META_PRIVACY: {}}
        if not plan_json:
            meta.pop(META_PLAN)
        out = []
        for s in sites:
            shareable = FLModelUtils.to_shareable(
                FLModel(params_type=ParamsType.FULL, params=params, current_round=round_num, meta=meta)
            )
            reply = executors[s].execute(name, shareable, FLContext(), Signal())
            r = FLModelUtils.from_shareable(reply)
            r.meta = {**(r.meta or {}), "client_name": s}
            out.append(r)
        return out

    def evaluate(params, plan_json) -> dict:
        correct = np.zeros(10, dtype=np.int64)
        total = np.zeros(10, dtype=np.int64)
        for r in task(TASK_VALIDATE, params, plan_json):
            correct += np.asarray(r.metrics["correct"])
            total += np.asarray(r.metrics["total"])
        return dict(u_r_accuracy(correct, total, forget))

    def timed(label: str, fn, *args):
        t0 = time.time()
        value = fn(*args)
        timings[label] = timings.get(label, 0.0) + time.time() - t0
        return value

    params = state_to_numpy(net)
    original = timed("evaluate", evaluate, params, plan_json)
    t0 = time.time()
    for c in forget:
        agg = ActivationAggregator(10)
        agg.set_expected_layers(conv_channels(net))
        for r in task(TASK_ACTIVATIONS, params, plan_json):
            agg.accept_model(r)
        merged = agg.aggregate_model()
        plan = unlearning_step(
            net,
            merged.params,
            c,
            ScoringOptions(),
            PlanOptions(prune_ratio=a.prune_ratio),
            plan,
            class_counts=merged.meta["counts"],
            model_name=o["model"],
        )
        net = apply_pruning_plan(net, plan, mode="remove")
        plan_json = plan.to_json()
        params = state_to_numpy(net)
    timings["activations + pruning"] = time.time() - t0
    pruned = timed("evaluate", evaluate, params, plan_json)
    history = []
    for rnd in range(a.rounds):
        t0 = time.time()
        results = task(TASK_TRAIN, params, plan_json, rnd)
        weights = [site_weight(r) for r in results]
        params = {
            k: sum(w * np.asarray(r.params[k], dtype=np.float64) for w, r in zip(weights, results)) / sum(weights)
            for k in results[0].params
        }
        params = state_to_numpy(load_numpy_state(rebuild_model(o["model"], 10, plan), params))
        timings["train"] = timings.get("train", 0.0) + time.time() - t0
        history.append(timed("evaluate", evaluate, params, plan_json))
    return dict(
        seconds=round(time.time() - t_start, 2),
        phases={k: round(v, 2) for k, v in timings.items()},
        original=original,
        pruned=pruned,
        unlearned=history[-1] if history else pruned,
    )


# ------------------------------------------------------------------------------------------------ as an NVFlare job
def as_nvflare_job(a: argparse.Namespace, ckpt: str, root: str, name: str) -> dict:
    from nvflare.recipe.sim_env import SimEnv

    from nvflare_unlearn.fl import UnlearningRecipe, quiet_log_config, run_job

    o = options(a)
    recipe = UnlearningRecipe(name=name, initial_ckpt=ckpt, tensorboard=False, **o)
    env = SimEnv(
        num_clients=a.num_clients, num_threads=a.num_clients, workspace_root=root, log_config=quiet_log_config(root)
    )
    t0 = time.time()
    result = run_job(recipe, env, root)
    wall = time.time() - t0
    m = result.metrics
    tasks = 2 + len(o["forget_classes"]) + 2 * m["rounds"]  # evaluations, activation passes, train + evaluate
    return dict(
        seconds=round(wall, 2),
        job_seconds=m.get("seconds"),  # from the server's workflow start to its end
        tasks=tasks,
        original={k: m["original"].get(k) for k in ("u_acc", "r_acc")},
        pruned={k: m["pruned"].get(k) for k in ("u_acc", "r_acc")},
        unlearned={k: m["unlearned"].get(k) for k in ("u_acc", "r_acc")},
    )


# ------------------------------------------------------------------------------------------------ report
def table(rep: dict) -> list[str]:
    a = rep["args"]
    best_fl = min(r["nvflare"]["seconds"] for r in rep["runs"])
    best_ip = min(r["in_process"]["seconds"] for r in rep["runs"])
    job = min(r["nvflare"]["job_seconds"] for r in rep["runs"])
    first = rep["runs"][0]
    tasks = first["nvflare"]["tasks"]
    lines = [
        f"Command: `{command_now(rep['command'])}`  ",
        f"Machine: {rep['machine']}; load average {rep['load_before']} before, {rep['load_after']} after. "
        f"Date: {rep['date']}.  ",
        f"Work: {a['model']} on {a['dataset']}, {a['num_clients']} sites, "
        f"{a['train_subset'] or 'all'} training images, forget class {a['forget']} at prune ratio "
        f"{a['prune_ratio']}, {a['rounds']} fine-tuning round(s), {tasks} site tasks per run; "
        f"{len(rep['runs'])} interleaved run(s) of each.",
        "",
        "| run | NVFlare job (SimEnv), wall | of which the server's workflow | in one process, wall | ratio |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(rep["runs"], 1):
        fl, ip = r["nvflare"], r["in_process"]
        lines.append(
            f"| {i} | {fl['seconds']:.1f} s | {fl['job_seconds']:.1f} s | {ip['seconds']:.1f} s | "
            f"{fl['seconds'] / ip['seconds']:.2f}x |"
        )
    lines += [
        f"| **best / best** | **{best_fl:.1f} s** | {job:.1f} s | **{best_ip:.1f} s** | "
        f"**{best_fl / best_ip:.2f}x** (aim <= 1.5x: {'met' if best_fl / best_ip <= 1.5 else 'missed'}) |",
        "",
        "Where the time goes (best runs): simulator start-up and shut-down (wall minus the server's workflow) "
        f"{best_fl - job:.1f} s. The workflow against the in-process work run one site after the other: "
        f"{job - best_ip:+.1f} s over {tasks} tasks ({(job - best_ip) / tasks:+.2f} s per task); against a perfect "
        f"split of that work over the {a['num_clients']} sites running in parallel ({best_ip / a['num_clients']:.1f} "
        f"s): {job - best_ip / a['num_clients']:+.1f} s ({(job - best_ip / a['num_clients']) / tasks:+.2f} s per "
        "task). NVFlare's own cost (a process per site, task scheduling, serialising the weights, the sites' "
        "polling for tasks) lies between the two: the simulator runs the sites in parallel, which one process does "
        "not, and on a shared machine the parallel share is far from perfect. In-process phases of the best run: "
        + ", ".join(
            f"{k} {v:.1f} s"
            for k, v in min(rep["runs"], key=lambda r: r["in_process"]["seconds"])["in_process"]["phases"].items()
        )
        + ".",
    ]
    return lines


def render_doc(rep: dict, doc: Path = DOC) -> None:
    """Rewrite the page's generated block from the report."""
    _io.write_text(doc, replace_block(doc.read_text(), BLOCK, table(rep)))


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, full_help=False)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data", default=None, help="data root (default: $NVFLARE_UNLEARN_DATA or ../shared/data)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--num-clients", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--forget", type=int, default=9)
    p.add_argument("--prune-ratio", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in one process (default 1, the sites' own setting; 2 threads stall on busy cores)",
    )
    add_output_args(p, RESULTS, with_threads=False, tag=False)
    p.add_argument("--doc", default=None, help="also rewrite this page's generated block (docs/core-benchmark.md)")
    p.add_argument("--render-only", action="store_true", help="rewrite --doc (default docs) from the JSON in --out")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.render_only:
        rep = json.loads((out / "nvflare_overhead.json").read_text())
        _io.write_text(out / "nvflare_overhead.md", "\n".join(table(rep)) + "\n")
        render_doc(rep, Path(a.doc) if a.doc else DOC)
        return 0
    import torch

    from nvflare_unlearn.method.checkpoint import save_checkpoint
    from nvflare_unlearn.models import build_model

    work = tempfile.mkdtemp(prefix="nvflare_overhead_")
    try:
        torch.manual_seed(0)
        in_ch = 1 if a.dataset == "digits" else 3
        ckpt = os.path.join(work, "original.pt")
        save_checkpoint(ckpt, build_model(a.model, 10, in_channels=in_ch), None, a.model, 10)
        load_before = round(os.getloadavg()[0], 2)
        runs = []
        for i in range(a.repeats):
            ip = in_process(a, ckpt)
            print(f"run {i + 1}: in one process {ip['seconds']:.1f} s {ip['phases']}", flush=True)
            fl = as_nvflare_job(a, ckpt, os.path.join(work, f"sim{i}"), f"overhead{i}")
            print(f"run {i + 1}: NVFlare job {fl['seconds']:.1f} s (workflow {fl['job_seconds']} s)", flush=True)
            runs.append(dict(nvflare=fl, in_process=ip))
        rep = dict(
            command=command_line("nvflare_overhead", argv),
            machine=f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}, Python {platform.python_version()}",
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            load_before=load_before,
            load_after=round(os.getloadavg()[0], 2),
            args=vars(a),
            runs=runs,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "nvflare_overhead.json", rep)
    _io.write_text(out / "nvflare_overhead.md", "\n".join(table(rep)) + "\n")
    print("\n".join(table(rep)))
    if a.doc:
        render_doc(rep, Path(a.doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
