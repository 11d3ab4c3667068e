"""The commands: each builds a recipe from the parsed flags, runs it where ``--env`` says, and writes into a NEW
``--out`` folder (an existing non-empty one is refused, so no run overwrites another). Success is judged from the
job's own result record, never from the simulator's exit code (it can exit 0 after a failed job)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Optional, TextIO

from nvflare_unlearn import _io
from nvflare_unlearn.cli.messages import cli_words
from nvflare_unlearn.cli.parser import TRAINING_GROUPS, UNLEARNING_GROUPS, option_values
from nvflare_unlearn.cli.report import collect_unlearning_outputs, pct, print_report
from nvflare_unlearn.fl.run import progress_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CLIError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def new_out_dir(path: str) -> str:
    """Create ``path`` for this run's outputs; refuse a non-empty folder so no earlier run is overwritten."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CLIError(f"--out {path} already exists and is not empty: every run writes to a new folder")
    os.makedirs(path, exist_ok=True)
    return path


def existing_file(path: str, what: str, keep_relative: bool = False) -> str:
    """``path`` if it is a file (absolute, or as given with ``keep_relative``: a relative checkpoint travels in the
    job, NVFlare 2.9's rule), else a usage error."""
    if not path or not os.path.isfile(path):
        raise CLIError(f"{what} {path!r} does not exist")
    return path if keep_relative and not os.path.isabs(path) else os.path.abspath(path)


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


def make_env(args: argparse.Namespace, num_clients: int, workspace: str) -> Any:
    """The NVFlare execution environment ``--env`` names: the simulator (workspace under the run's folder), a fresh
    local POC system, or a production system reached through an admin startup kit (``--startup-kit``)."""
    env = getattr(args, "env", "sim")
    if env == "prod":
        from nvflare.recipe import ProdEnv

        kit = getattr(args, "startup_kit", None)
        if not kit or not os.path.isdir(kit):
            raise CLIError(f"--env prod needs --startup-kit: the admin's startup kit folder (got {kit!r})")
        return ProdEnv(startup_kit_location=os.path.abspath(kit), username=args.username, login_timeout=30.0)
    if getattr(args, "startup_kit", None):
        raise CLIError("--startup-kit is only used with --env prod")
    if env == "poc":
        from nvflare_unlearn.fl.poc import all_sites_poc_env

        return all_sites_poc_env(num_clients)
    from nvflare.recipe import SimEnv

    from nvflare_unlearn.fl.job_utils import quiet_log_config

    return SimEnv(
        num_clients=num_clients,
        num_threads=args.threads or num_clients,
        workspace_root=workspace,
        log_config=None if args.verbose else quiet_log_config(workspace, "ERROR"),
    )


class ProgressDisplay:
    """The job's progress on the console: one line that rewrites itself where a terminal is attached, else one
    plain line per phase, activation pass and evaluated round (``run_job`` reports only those changes)."""

    def __init__(self, label: str, started: float, stream: Optional[TextIO] = None, live: Optional[bool] = None):
        self.label, self.started = label, started
        self.stream = stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)()) if live is None else live
        self._open = False  # a live line is on screen without its newline

    def __call__(self, p: dict) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {self.label}: {progress_line(p, self.started)}"
        if self.live:  # cut to the terminal's width: a wrapped line could not be rewritten in place
            self.stream.write("\r\x1b[K" + line[: max(20, shutil.get_terminal_size().columns - 1)])
            self._open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End a live line, so the next output starts on a line of its own."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def run_recipe(recipe: Any, args: argparse.Namespace, workspace: str, label: str):
    """Run a recipe where ``--env`` says (results fetched into ``workspace`` before a POC system stops), printing
    its progress; return its checked JobResult (RuntimeError when NVFlare or the job's record says it failed)."""
    from nvflare_unlearn.fl.run import run_job

    env = make_env(args, recipe.num_clients, workspace)
    where = {"poc": "POC", "prod": "production"}.get(getattr(args, "env", "sim"), "simulated")
    say(f"{label}: running job '{recipe.name}' on {recipe.num_clients} {where} site(s)")
    started = time.time()
    display = ProgressDisplay(label, started)
    with _QuietNVFlare(args.verbose):
        try:
            result = run_job(
                recipe,
                env,
                os.path.join(workspace, "result"),
                timeout=args.timeout or 0,
                on_progress=display,
                verbose=args.verbose,
            )
        except RuntimeError as e:
            raise RuntimeError(f"{label} failed: {e}") from None
        finally:
            display.close()
    say(f"{label}: done in {time.time() - started:.0f} s ({result.rounds} round(s))")
    _report_missing_sites(result, label)
    return result


def _report_missing_sites(result: Any, label: str) -> None:
    """Say which sites a completed job went on without (report.json and the record have them per phase)."""
    from nvflare_unlearn.fl.results import sites_per_phase

    missing = sorted({s for p in sites_per_phase(result.metrics) for s in p["no_result"]})
    if missing:
        say(f"{label}: WARNING: site(s) {missing} dropped out; the job completed with the others (sites_per_phase)")


def _model_kwargs(args: argparse.Namespace) -> dict:
    """The recipe's model arguments, and ``--train-script`` / ``--train-args`` when the sites run the user's script
    (the recipe carries the script in the job; relative paths stay relative, as in NVFlare's own job scripts)."""
    kwargs: dict = dict(model=args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    script = getattr(args, "train_script", None)
    if script:
        kwargs.update(
            train_script=existing_file(script, "--train-script", keep_relative=True), train_args=args.train_args
        )
    elif getattr(args, "train_args", ""):
        raise CLIError("--train-args is for --train-script: give the script too")
    return kwargs


def _run_training_job(args: argparse.Namespace, recipe: Any, label: str) -> dict:
    """Pretraining / retraining: run the FedAvg job, copy its model into ``--out``; returns the final metrics."""
    out = new_out_dir(args.out)
    result = run_recipe(recipe, args, os.path.join(out, "workspace"), label)
    dst = os.path.join(out, "global_model.pt")
    _io.copy_file(result.model_path, dst)
    final = result.metrics.get("final", {})
    say(
        f"model: {dst} (federated test accuracy {pct(final.get('acc')).strip()}, "
        f"U-set {pct(final.get('u_acc')).strip()}, R-set {pct(final.get('r_acc')).strip()})"
    )
    return final


def cmd_pretrain(args: argparse.Namespace) -> int:
    from nvflare_unlearn.fl import PretrainRecipe

    recipe = PretrainRecipe(name=args.name or "pretrain", **_model_kwargs(args), **option_values(args, args.groups))
    _run_training_job(args, recipe, "pretraining")
    return EXIT_OK


def cmd_retrain(args: argparse.Namespace) -> int:
    from nvflare_unlearn.fl import RetrainRecipe

    recipe = RetrainRecipe(
        name=args.name or "retrain",
        forget_classes=args.forget_classes,
        **_model_kwargs(args),
        **option_values(args, args.groups),
    )
    _run_training_job(args, recipe, "retraining from scratch")
    return EXIT_OK


def _finish_unlearning(result, out: str) -> None:
    report = collect_unlearning_outputs(result, out)
    print_report(report)
    say(f"outputs: {out} ({', '.join(report['files'])})")


def cmd_unlearn(args: argparse.Namespace) -> int:
    from nvflare_unlearn.fl import UnlearningRecipe

    server_path = args.env == "prod" and os.path.isabs(args.ckpt) and not os.path.isfile(args.ckpt)
    ckpt = args.ckpt if server_path else existing_file(args.ckpt, "--ckpt", keep_relative=True)
    resume = args.resume_from
    if resume and not (args.env == "prod" and os.path.isabs(resume) and not os.path.isfile(resume)):
        resume = existing_file(resume, "--resume-from", keep_relative=True)
    out = new_out_dir(args.out)
    recipe = UnlearningRecipe(
        name=args.name or "unlearn",
        initial_ckpt=ckpt,
        check_ckpt=not server_path,
        resume_from=resume,
        forget_classes=args.forget_classes,
        **_model_kwargs(args),
        **option_values(args, args.groups),
    )
    say(method_summary(recipe))
    result = run_recipe(recipe, args, os.path.join(out, "workspace"), f"unlearning class(es) {args.forget_classes}")
    _finish_unlearning(result, out)
    return EXIT_OK


def method_summary(recipe: Any) -> str:
    """The method this request runs, and why when the job chose it (``unlearning.defaults.measured_defaults``)."""
    u = recipe.options["unlearning"]
    what = u.method + (f" at prune_ratio {recipe.prune_ratio:g}" if u.spec.prunes else "")
    what += " with recovery kd" if u.recovery == "kd" else ""
    if "method" not in recipe.defaults_applied:
        return f"method: {what}"
    return f"method: {what} ({recipe.method_default.reason})"


def cmd_demo(args: argparse.Namespace) -> int:
    """Pretrain small_cnn on the built-in digits with FedAvg, forget one class, fine-tune, evaluate."""
    from nvflare_unlearn.fl import PretrainRecipe, UnlearningRecipe

    args.env, args.timeout = "sim", 0
    out = new_out_dir(args.out)
    workspace = os.path.join(out, "workspace")
    base = dict(
        model="small_cnn",
        num_classes=10,
        in_channels=1,
        dataset="digits",
        num_clients=args.num_clients,
        seed=args.seed,
        batch_size=32,
    )
    say(
        f"demo: {args.num_clients} simulated NVFlare sites, sklearn digits (10 classes), model small_cnn; "
        f"output in {out}"
    )
    pre = PretrainRecipe(name="demo_pretrain", num_rounds=args.pretrain_rounds, lr=0.05, **base)
    pre_result = run_recipe(pre, args, workspace, "1/2 pretraining (FedAvg, all classes)")
    ckpt = os.path.join(out, "pretrained_model.pt")
    _io.copy_file(pre_result.model_path, ckpt)
    unl = UnlearningRecipe(
        name="demo_unlearn",
        initial_ckpt=ckpt,
        forget_classes=args.forget_classes,
        prune_ratio=args.prune_ratio,
        num_rounds=args.num_rounds,
        lr=args.lr,
        **base,
    )
    label = f"2/2 unlearning class {args.forget_classes} (activations, TF-IDF, prune, fine-tune)"
    _finish_unlearning(run_recipe(unl, args, workspace, label), out)
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Centralized U/R evaluation of a checkpoint (ours, a state_dict, or NVFlare's FL_global_model.pt)."""
    import torch
    from torch.utils.data import DataLoader

    from nvflare_unlearn.data import load_dataset
    from nvflare_unlearn.method.checkpoint import load_checkpoint
    from nvflare_unlearn.runtime import class_correct_total, u_r_accuracy

    ckpt = existing_file(args.ckpt, "--ckpt")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, plan, meta = load_checkpoint(
        ckpt, model_name=args.model, num_classes=args.num_classes, allow_import=args.allow_import
    )
    num_classes = int(meta.get("num_classes") or args.num_classes)
    data = load_dataset(args.dataset, root=args.data_root, split="test", normalize=args.normalize)
    correct, total = class_correct_total(model, DataLoader(data, batch_size=256), num_classes)
    forget = args.forget_classes or []
    acc = u_r_accuracy(correct, total, forget)
    result = dict(
        checkpoint=ckpt,
        dataset=args.dataset,
        forget_classes=forget,
        **acc,
        params=sum(p.numel() for p in model.parameters()),
        pruned_steps=len(plan.steps) if plan else 0,
    )
    print(json.dumps(result, indent=2))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Write a runnable job folder (what ``python job.py --export`` writes) for ``nvflare job submit``."""
    from nvflare_unlearn.fl import PretrainRecipe, RetrainRecipe, UnlearningRecipe

    model = _model_kwargs(args)
    if args.job == "pretrain":
        recipe = PretrainRecipe(name=args.name or "pretrain", **model, **option_values(args, TRAINING_GROUPS))
    elif args.job == "retrain":
        recipe = RetrainRecipe(
            name=args.name or "retrain",
            forget_classes=args.forget_classes,
            **model,
            **option_values(args, TRAINING_GROUPS),
        )
    else:
        ckpt = existing_file(args.ckpt, "--ckpt") if args.check_ckpt else args.ckpt
        recipe = UnlearningRecipe(
            name=args.name or "unlearn",
            initial_ckpt=ckpt,
            check_ckpt=args.check_ckpt,
            forget_classes=args.forget_classes,
            **model,
            **option_values(args, UNLEARNING_GROUPS),
        )
    recipe.export(args.out)
    say(f"exported job '{recipe.name}' to {os.path.abspath(args.out)}")
    return EXIT_OK


def cmd_verify_record(args: argparse.Namespace) -> int:
    """Exit 0 when the record's signature (against --public-key) and every consistency check pass, 1 otherwise."""
    from nvflare_unlearn.protect.verify import verify_record

    original = existing_file(args.original, "--original") if args.original else None
    result = verify_record(
        existing_file(args.record, "--record"),
        existing_file(args.model, "--model"),
        original,
        public_key=existing_file(args.public_key, "--public-key") if args.public_key else None,
        metrics_path=existing_file(args.metrics, "--metrics") if args.metrics else None,
        allow_import=args.allow_import,
    )
    print(cli_words(str(result)))
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_export_model(args: argparse.Namespace) -> int:
    """Write the checkpoint as a torch.export program (or ONNX) that runs without nvflare_unlearn; checked on write."""
    from nvflare_unlearn.method.export import export_checkpoint

    summary = export_checkpoint(
        existing_file(args.ckpt, "--ckpt"),
        os.path.abspath(args.out),
        fmt=args.format,
        model_name=args.model,
        num_classes=args.num_classes,
        allow_import=args.allow_import,
    )
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def cmd_methods(args: argparse.Namespace) -> int:
    """The method registry as a table: name, what it needs, the default (``unlearning.registry``)."""
    from nvflare_unlearn.unlearning import all_methods, measured_defaults

    default = measured_defaults(set())
    rows = [("method", "forget data", "teacher", "prunes", "what it does")]
    for m in all_methods().values():
        teacher = "always" if m.always_distils else "with recovery kd"
        rows.append((m.name, "yes" if m.uses_forget_data else "no", teacher, "yes" if m.prunes else "no", m.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    print(f"\ndefault: {default.values} ({default.reason})")
    return EXIT_OK


COMMANDS = {
    "demo": cmd_demo,
    "pretrain": cmd_pretrain,
    "retrain": cmd_retrain,
    "unlearn": cmd_unlearn,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "verify-record": cmd_verify_record,
    "methods": cmd_methods,
    "export-model": cmd_export_model,
}
