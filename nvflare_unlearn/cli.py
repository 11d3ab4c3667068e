"""``nvflare-unlearn``: run the plugin's NVFlare jobs from a shell, with progress a person can follow.

Every command that trains writes into a NEW ``--out`` folder (an existing non-empty one is refused, so no run
overwrites another) and exits non-zero when the job did not complete: NVFlare's simulator can exit 0 after a
failed job, so success is judged from the job's own result record, never from the simulator's exit code.

    nvflare-unlearn demo --out runs/demo          pretrain on digits, forget a class, fine-tune, evaluate
    nvflare-unlearn pretrain --out runs/pre ...   FedAvg on all classes -> the model to unlearn
    nvflare-unlearn unlearn --ckpt M --forget 3 --out runs/u ...
    nvflare-unlearn retrain --forget 3 --out runs/r ...   the gold standard (from scratch, without class 3)
    nvflare-unlearn evaluate --ckpt M --forget 3          U-set / R-set / class-wise accuracy of a checkpoint
    nvflare-unlearn export --job unlearn --out DIR        an exported job folder for `nvflare job submit`
    nvflare-unlearn verify-record --record R --model M    check an audit record against a model file
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CLIError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- arguments
def _class_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"class ids are integers separated by commas (e.g. 3 or 0,5,9), got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("give at least one class id")
    return values


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def _new_out_dir(path: str) -> str:
    """Create ``path`` for this run's outputs; refuse a non-empty folder so no earlier run is overwritten."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CLIError(f"--out {path} already exists and is not empty: every run writes to a new folder")
    os.makedirs(path, exist_ok=True)
    return path


def _existing_file(path: str, what: str) -> str:
    if not path or not os.path.isfile(path):
        raise CLIError(f"{what} {path!r} does not exist")
    return os.path.abspath(path)


def _add_federation_args(p: argparse.ArgumentParser, *, rounds: int, lr: float) -> None:
    g = p.add_argument_group("federation and data")
    g.add_argument("--model", default="small_cnn",
                   help="registry name (small_cnn, resnet20..56, vgg11..19) or your factory as package.module:function")
    g.add_argument("--num-classes", type=int, default=10)
    g.add_argument("--in-channels", type=int, default=None, help="input channels (default: from the dataset)")
    g.add_argument("--dataset", default="digits", help="digits (built in), cifar10, cifar100")
    g.add_argument("--data-root", default=None,
                   help="folder of the dataset (.npz layout or torchvision's); may contain {site_name}")  # fmt: skip
    g.add_argument("--sites", type=int, default=2, help="number of simulated sites")
    g.add_argument("--partition", default="iid", help="iid, dirichlet, biased (the paper's), none (per-site folders)")
    g.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (partition=dirichlet)")
    g.add_argument("--q", type=float, default=0.5, help="bias probability (partition=biased)")
    g.add_argument("--train-subset", type=int, default=None, help="use only this many training samples")
    g.add_argument("--rounds", type=int, default=rounds, help="FedAvg rounds")
    g.add_argument("--local-epochs", type=int, default=1)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--env", choices=("sim", "poc"), default="sim", help="run in the simulator (default) or POC")
    g.add_argument("--threads", type=int, default=None, help="simulator threads (default: one per site)")
    g.add_argument("--verbose", action="store_true", help="show NVFlare's own log")


def _add_unlearn_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("unlearning")
    g.add_argument("--forget", type=_class_list, required=True, help="class id(s) to forget, e.g. 3 or 0,5,9")
    g.add_argument("--ratio", type=_fraction, default=0.1, help="fraction of conv channels pruned per class")
    g.add_argument("--scope", default="global", help="global (paper) or per_layer")
    g.add_argument("--direction", default="highest", help="highest (paper) or lowest (released code)")
    g.add_argument("--idf", default="paper", help="paper or reference")
    g.add_argument("--tf-norm", default="share", help="share (paper), width, balance")
    g.add_argument("--coe", type=float, default=None, help="balance coefficient's coe (tf-norm=balance)")
    g.add_argument("--prune-mode", default="remove", help="remove (physical) or mask (shapes kept)")
    g.add_argument("--hook-point", default="conv", help="conv (raw conv output, paper) or bn")
    g.add_argument("--target-r-acc", type=float, default=None, help="stop fine-tuning at this R-set accuracy")
    g.add_argument("--aggregation", default="mean", help="mean (exact), median, trimmed_mean")
    g.add_argument("--min-count", type=int, default=0, help="sites do not report classes with fewer images")
    g.add_argument("--clip-bound", type=float, default=None, help="sites clip each pooled activation to [0, B]")
    g.add_argument("--dp-epsilon", type=float, default=None, help="Gaussian noise on uploads: epsilon per request")
    g.add_argument("--dp-delta", type=float, default=None, help="Gaussian noise on uploads: delta per request")


def _common_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        model=a.model, num_classes=a.num_classes, in_channels=a.in_channels, dataset=a.dataset, data_root=a.data_root,
        n_clients=a.sites, partition=a.partition, alpha=a.alpha, q=a.q, train_subset=a.train_subset,
        num_rounds=a.rounds, local_epochs=a.local_epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed,
    )  # fmt: skip


def _unlearn_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        forget_classes=a.forget, prune_ratio=a.ratio, scope=a.scope, direction=a.direction, idf=a.idf,
        tf_norm=a.tf_norm, coe=a.coe, prune_mode=a.prune_mode, hook_point=a.hook_point, target_r_acc=a.target_r_acc,
        aggregation=a.aggregation, min_count=a.min_count, clip_bound=a.clip_bound, dp_epsilon=a.dp_epsilon,
        dp_delta=a.dp_delta,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- running jobs
class _QuietNVFlare:
    """Silence NVFlare's console logging (kept in the workspace's log files) unless --verbose."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self._saved: list[tuple[logging.Logger, int]] = []

    def __enter__(self):
        if not self.verbose:
            for name in ("nvflare", "root", ""):
                logger = logging.getLogger(name or None)
                self._saved.append((logger, logger.level))
                logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for logger, level in self._saved:
            logger.setLevel(level)


def _run_recipe(recipe: Any, a: argparse.Namespace, workspace: str, label: str):
    """Execute a recipe in SimEnv (workspace under the run's folder) or PocEnv; return its checked JobResult."""
    from .fl import read_job_result

    if a.env == "poc":
        from nvflare.recipe import PocEnv

        env = PocEnv(num_clients=a.sites)
    else:
        from nvflare.recipe import SimEnv

        from .fl.recipes import quiet_log_config

        env = SimEnv(
            num_clients=a.sites, num_threads=a.threads or a.sites, workspace_root=workspace,
            log_config=None if a.verbose else quiet_log_config(workspace, "ERROR"),
        )  # fmt: skip
    _say(f"{label}: running job '{recipe.name}' on {a.sites} {'POC' if a.env == 'poc' else 'simulated'} site(s)")
    started = time.time()
    with _QuietNVFlare(a.verbose):
        run = recipe.execute(env)
        result_dir = run.get_result()
    try:
        result = read_job_result(result_dir)
    except RuntimeError as e:
        raise RuntimeError(f"{label} failed: {e}") from None
    _say(f"{label}: done in {time.time() - started:.0f} s ({result.rounds} round(s))")
    return result


def _acc(entry: Optional[dict]) -> dict:
    entry = entry or {}
    return {k: entry.get(k) for k in ("u_acc", "r_acc", "acc", "class_acc")}


def _pct(v: Optional[float]) -> str:
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
    )


def plot_u_r_by_round(report: dict, path: str, title: str = "") -> str:
    """PNG: U-set (forgotten) and R-set (retained) accuracy, original model dashed, round 0 = just pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [e["round"] for e in report["per_round"]]
    u = [report["pruned"]["u_acc"]] + [e["u_acc"] for e in report["per_round"]]
    r = [report["pruned"]["r_acc"]] + [e["r_acc"] for e in report["per_round"]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(rounds, [100 * v for v in r], "o-", color="tab:blue", label="R-set (retained classes)")
    ax.plot(rounds, [100 * v for v in u], "s-", color="tab:red", label="U-set (forgotten classes)")
    ax.axhline(100 * report["original"]["r_acc"], ls="--", color="tab:blue", alpha=0.5, label="original R-set")
    ax.axhline(100 * report["original"]["u_acc"], ls="--", color="tab:red", alpha=0.5, label="original U-set")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("fine-tuning round (0 = right after pruning)")
    ax.set_ylabel("federated test accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(title or f"forgetting class(es) {report['forget_classes']}")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _print_report(report: dict) -> None:
    print()
    print(f"  forget classes: {report['forget_classes']}")
    print(f"  {'stage':<10} {'U-set':>7} {'R-set':>7}")
    for stage in ("original", "pruned", "unlearned"):
        print(f"  {stage:<10} {_pct(report[stage]['u_acc']):>7} {_pct(report[stage]['r_acc']):>7}")
    pb, pa = report["params_before"], report["params_after"]
    if pb and pa:
        print(f"  parameters: {pb:,} -> {pa:,} ({100 * (1 - pa / pb):.1f}% removed), rounds: {report['rounds']}")
    print()


def _collect_unlearning_outputs(result, out: str) -> dict:
    """Copy the job's models, plan, metrics and audit record into ``out`` and write report.json + the plot."""
    from .fl import FINAL_MODEL_FILE, PLAN_FILE, PRUNED_MODEL_FILE, RECORD_FILE

    for src, name in ((result.model_path, FINAL_MODEL_FILE), (result.pruned_model_path, PRUNED_MODEL_FILE),
                      (result.plan_path, PLAN_FILE), (result.metrics_path, "job_metrics.json"),
                      (result.record_path, RECORD_FILE)):  # fmt: skip
        if src:
            shutil.copy2(src, os.path.join(out, name))
    report = build_report(result.metrics)
    report["job_result_dir"] = result.result_dir
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_u_r_by_round(report, os.path.join(out, "u_r_accuracy.png"))
    return report


# ----------------------------------------------------------------------------------------------- commands
def _run_training_job(a: argparse.Namespace, recipe: Any, label: str) -> dict:
    """Pretraining / retraining: run the FedAvg job, copy its model into ``--out``; returns the final metrics."""
    out = _new_out_dir(a.out)
    result = _run_recipe(recipe, a, os.path.join(out, "workspace"), label)
    dst = os.path.join(out, "global_model.pt")
    shutil.copy2(result.model_path, dst)
    final = result.metrics.get("final", {})
    _say(f"model: {dst} (federated test accuracy {_pct(final.get('acc')).strip()}, "
         f"U-set {_pct(final.get('u_acc')).strip()}, R-set {_pct(final.get('r_acc')).strip()})")  # fmt: skip
    return final


def cmd_pretrain(a: argparse.Namespace) -> int:
    from .fl import PretrainRecipe

    _run_training_job(a, PretrainRecipe(name=a.name or "pretrain", **_common_kwargs(a)), "pretraining")
    return EXIT_OK


def cmd_retrain(a: argparse.Namespace) -> int:
    from .fl import RetrainRecipe

    recipe = RetrainRecipe(name=a.name or "retrain", forget_classes=a.forget, **_common_kwargs(a))
    _run_training_job(a, recipe, "retraining from scratch")
    return EXIT_OK


def cmd_unlearn(a: argparse.Namespace) -> int:
    from .fl import UnlearningRecipe

    ckpt = _existing_file(a.ckpt, "--ckpt")
    out = _new_out_dir(a.out)
    recipe = UnlearningRecipe(name=a.name or "unlearn", initial_ckpt=ckpt, **_common_kwargs(a), **_unlearn_kwargs(a))
    result = _run_recipe(recipe, a, os.path.join(out, "workspace"), f"unlearning class(es) {a.forget}")
    report = _collect_unlearning_outputs(result, out)
    _print_report(report)
    _say(f"outputs: {out} (report.json, unlearned_model.pt, pruning_plan.json, unlearning_record.json, u_r_accuracy.png)")
    return EXIT_OK


#: What the demo does not let you change: the built-in data, the small model, the paper's scoring options.
_DEMO_FIXED = dict(
    env="sim", model="small_cnn", num_classes=10, in_channels=1, dataset="digits", data_root=None, partition="iid",
    alpha=0.5, q=0.5, train_subset=None, local_epochs=1, batch_size=32, scope="global", direction="highest",
    idf="paper", tf_norm="share", coe=None, prune_mode="remove", hook_point="conv", aggregation="mean",
    target_r_acc=None, min_count=0, clip_bound=None, dp_epsilon=None, dp_delta=None,
)


def cmd_demo(a: argparse.Namespace) -> int:
    """Pretrain small_cnn on the built-in digits with FedAvg, forget one class, fine-tune, evaluate."""
    from .fl import PretrainRecipe, UnlearningRecipe

    out = _new_out_dir(a.out)
    workspace = os.path.join(out, "workspace")
    base = _common_kwargs(a)
    _say(f"demo: {a.sites} simulated NVFlare sites, sklearn digits (10 classes), model small_cnn; output in {out}")
    pre = PretrainRecipe(name="demo_pretrain", **{**base, "num_rounds": a.pretrain_rounds, "lr": 0.05})
    pre_result = _run_recipe(pre, a, workspace, "1/2 pretraining (FedAvg, all classes)")
    ckpt = os.path.join(out, "pretrained_model.pt")
    shutil.copy2(pre_result.model_path, ckpt)
    unl = UnlearningRecipe(name="demo_unlearn", initial_ckpt=ckpt, **base, **_unlearn_kwargs(a))
    result = _run_recipe(unl, a, workspace, f"2/2 unlearning class {a.forget} (activations, TF-IDF, prune, fine-tune)")
    report = _collect_unlearning_outputs(result, out)
    _print_report(report)
    _say(f"outputs: {out} (report.json, unlearned_model.pt, pruning_plan.json, unlearning_record.json, u_r_accuracy.png)")
    return EXIT_OK


def cmd_evaluate(a: argparse.Namespace) -> int:
    """Centralized U/R evaluation of a checkpoint (ours, a state_dict, or NVFlare's FL_global_model.pt)."""
    import torch
    from torch.utils.data import DataLoader

    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .metrics import class_correct_total, u_r_accuracy

    ckpt = _existing_file(a.ckpt, "--ckpt")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, plan, meta = load_checkpoint(ckpt, model_name=a.model, num_classes=a.num_classes)
    num_classes = int(meta.get("num_classes") or a.num_classes)
    data = load_dataset(a.dataset, root=a.data_root, split="test")
    correct, total = class_correct_total(model, DataLoader(data, batch_size=256), num_classes)
    acc = u_r_accuracy(correct, total, a.forget or [])
    result = dict(checkpoint=ckpt, dataset=a.dataset, forget_classes=a.forget or [], **acc,
                  params=sum(p.numel() for p in model.parameters()), pruned_steps=len(plan.steps) if plan else 0)  # fmt: skip
    print(json.dumps(result, indent=2))
    return EXIT_OK


def cmd_export(a: argparse.Namespace) -> int:
    """Write a runnable job folder (what ``python job.py --export`` writes) for ``nvflare job submit``."""
    from .fl import PretrainRecipe, RetrainRecipe, UnlearningRecipe

    kwargs = _common_kwargs(a)
    if a.job == "pretrain":
        recipe = PretrainRecipe(name=a.name or "pretrain", **kwargs)
    elif a.job == "retrain":
        recipe = RetrainRecipe(name=a.name or "retrain", forget_classes=a.forget, **kwargs)
    else:
        ckpt = _existing_file(a.ckpt, "--ckpt") if a.check_ckpt else a.ckpt
        recipe = UnlearningRecipe(
            name=a.name or "unlearn", initial_ckpt=ckpt, check_ckpt=a.check_ckpt, **kwargs, **_unlearn_kwargs(a)
        )
    recipe.export(a.out)
    _say(f"exported job '{recipe.name}' to {os.path.abspath(a.out)}")
    return EXIT_OK



def cmd_verify_record(a: argparse.Namespace) -> int:
    """Exit 0 when the model (and, with --original, the original checkpoint) match the record, 1 otherwise."""
    from .audit import verify_record

    original = _existing_file(a.original, "--original") if a.original else None
    result = verify_record(_existing_file(a.record, "--record"), _existing_file(a.model, "--model"), original)
    print(result)
    return EXIT_OK if result.ok else EXIT_FAILED


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nvflare-unlearn", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="end-to-end unlearning on built-in digits in the NVFlare simulator (~2 min)")
    d.add_argument("--out", required=True, help="new folder for report.json, models, plan and plot")
    d.add_argument("--sites", type=int, default=2)
    d.add_argument("--forget", type=_class_list, default=[3])
    d.add_argument("--ratio", type=_fraction, default=0.3,
                   help="fraction of conv channels pruned (0.1 lets small_cnn relearn the digit during fine-tuning)")
    d.add_argument("--pretrain-rounds", type=int, default=5)
    d.add_argument("--rounds", type=int, default=3, help="fine-tuning rounds")
    d.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--verbose", action="store_true")
    d.set_defaults(func=cmd_demo, **_DEMO_FIXED)

    for name, func, rounds, lr, helptext in (
        ("pretrain", cmd_pretrain, 5, 0.05, "FedAvg on all classes: the model to unlearn"),
        ("retrain", cmd_retrain, 5, 0.05, "FedAvg from scratch without the forget classes (gold standard)"),
        ("unlearn", cmd_unlearn, 3, 0.01, "federated unlearning of a trained checkpoint"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--out", required=True, help="new folder for this run's outputs")
        s.add_argument("--name", default=None, help="NVFlare job name")
        _add_federation_args(s, rounds=rounds, lr=lr)
        if name == "unlearn":
            s.add_argument("--ckpt", required=True, help="the trained model to unlearn from (never modified)")
            _add_unlearn_args(s)
        elif name == "retrain":
            s.add_argument("--forget", type=_class_list, required=True)
        s.set_defaults(func=func)

    e = sub.add_parser("evaluate", help="U-set / R-set accuracy of a checkpoint on a test set")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--forget", type=_class_list, default=None)
    e.add_argument("--dataset", default="digits")
    e.add_argument("--data-root", default=None)
    e.add_argument("--model", default=None, help="registry name (only for a plain state_dict checkpoint)")
    e.add_argument("--num-classes", type=int, default=None, help="only for a plain state_dict checkpoint")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="write an NVFlare job folder for `nvflare job submit`")
    x.add_argument("--job", choices=("pretrain", "unlearn", "retrain"), required=True)
    x.add_argument("--out", required=True, help="job folder to write")
    x.add_argument("--name", default=None)
    x.add_argument("--ckpt", default=None, help="unlearn: the trained model's path AS SEEN BY THE SERVER")
    x.add_argument("--check-ckpt", action="store_true", help="unlearn: require --ckpt to exist on this machine")
    _add_federation_args(x, rounds=3, lr=0.01)
    _add_unlearn_args(x)
    x.set_defaults(func=cmd_export)
    for action in x._actions:  # --forget is only required for unlearn/retrain: checked in the command
        if action.dest == "forget":
            action.required = False

    v = sub.add_parser("verify-record", help="check an unlearning_record.json against a model file")
    v.add_argument("--record", required=True, help="unlearning_record.json written by the unlearning job")
    v.add_argument("--model", required=True, help="the unlearned model file to check (e.g. OUT/unlearned_model.pt)")
    v.add_argument("--original", default=None, help="also check that this original checkpoint is unchanged")
    v.set_defaults(func=cmd_verify_record)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "export":
        if args.job in ("unlearn", "retrain") and not args.forget:
            parser.error(f"export --job {args.job} needs --forget")
        if args.job == "unlearn" and not args.ckpt:
            parser.error("export --job unlearn needs --ckpt (the model's path as seen by the server)")
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"nvflare-unlearn: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        print(f"nvflare-unlearn: job failed: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
