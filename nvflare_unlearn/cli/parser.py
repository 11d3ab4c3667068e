"""The command line's flags. Option flags are generated from ``nvflare_unlearn.options``: one flag per option field,
named after it (``prune_ratio`` -> ``--prune-ratio``), with the field's help text, so the CLI, the recipes and the
job's JSON cannot disagree. A flag left out is not passed at all: the recipe's own default applies."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from nvflare_unlearn.options import (
    EXPORT_FORMATS,
    FederationOptions,
    OptionGroup,
    SecurityOptions,
    SiteDataOptions,
    TrainingOptions,
)
from nvflare_unlearn.unlearning import JOB_GROUPS

TRAINING_GROUPS = (SiteDataOptions, TrainingOptions, FederationOptions, SecurityOptions)
UNLEARNING_GROUPS = JOB_GROUPS  # the unlearning job's groups, defined once with its options (unlearning.options)

#: deprecated flag -> its current name (accepted for one release with a warning on stderr)
DEPRECATED_FLAGS = {
    "--sites": "--num-clients",
    "--rounds": "--num-rounds",
    "--ratio": "--prune-ratio",
    "--forget": "--forget-classes",
}


def class_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"class ids are integers separated by commas (e.g. 3 or 0,5,9), got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one class id")
    return values


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


class _Deprecated(argparse.Action):
    """Store the value under the new flag's dest, and say once on stderr that the old spelling goes away."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = DEPRECATED_FLAGS.get(option_string or "")
        if new:
            print(f"nvflare-unlearn: warning: {option_string} is deprecated, use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def json_mapping(text: str) -> dict:
    """A dict option given as JSON text on the command line (e.g. --site-sizes '{"site-1": 600}')."""
    import json

    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"site-1\": 600}}', got {text!r:.80}"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _flags(name: str) -> list[str]:
    flag = "--" + name.replace("_", "-")
    return [flag] + [old for old, new in DEPRECATED_FLAGS.items() if new == flag]


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(f: dataclasses.Field) -> Any:
    text = str(f.type)
    if f.name == "prune_ratio":
        return fraction
    if text.startswith("dict"):
        return json_mapping
    if text.startswith("bool"):
        return boolean
    for name, kind in (("float", float), ("int", int), ("str", str)):
        if text.startswith(name):
            return kind
    raise TypeError(f"no CLI type for option {f.name} ({text})")


def measured_defaults_help() -> dict[str, str]:
    """What ``--help`` of ``unlearn`` shows as the default of the options the measured default sets (read from
    ``unlearning.defaults``, so the help and the job cannot disagree)."""
    from nvflare_unlearn.unlearning import measured_defaults

    values = measured_defaults(set()).values
    return {
        "method": f"{values.get('method')}, the measured best; prune when a pruning option is set",
        "recovery": f"{values.get('recovery', 'ce')} with the default {values.get('method')}, else ce",
    }


def add_option_groups(p: argparse.ArgumentParser, groups: tuple[type[OptionGroup], ...], defaults: dict) -> None:
    """One flag per field of ``groups``; unset flags stay absent from the namespace (the recipe's default applies)."""
    for group in groups:
        g = p.add_argument_group(f"{group.GROUP} options", (group.__doc__ or "").strip().splitlines()[0])
        for f in dataclasses.fields(group):  # type: ignore[arg-type]
            default = defaults.get(f.name, f.default)
            g.add_argument(
                *_flags(f.name),
                dest=f.name,
                type=_field_type(f),
                default=argparse.SUPPRESS,
                action=_Deprecated,
                help=f"{f.metadata.get('help', '')} (default: {default})",
            )


def add_job_args(p: argparse.ArgumentParser) -> None:
    """What every job command takes besides the options: the model, where to run, what to print."""
    g = p.add_argument_group("model and environment")
    g.add_argument(
        "--model",
        default="small_cnn",
        help="registry name (small_cnn, resnet20..56, vgg11..19) or your factory as package.module:function",
    )
    g.add_argument("--num-classes", type=int, default=10)
    g.add_argument("--in-channels", type=int, default=None, help="input channels (default: from the dataset)")
    g.add_argument(
        "--env",
        choices=("sim", "poc", "prod"),
        default="sim",
        help="sim: NVFlare's simulator (default); poc: a fresh local POC system, stopped after the result is "
        "downloaded; prod: your deployment, as the admin of --startup-kit",
    )
    g.add_argument("--startup-kit", default=None, help="--env prod: the admin user's startup kit folder")
    g.add_argument("--username", default="admin@nvidia.com", help="--env prod: the admin user of the startup kit")
    g.add_argument("--timeout", type=float, default=0, help="abort a POC / production job after this many seconds")
    g.add_argument("--threads", type=int, default=None, help="simulator threads (default: one per site)")
    add_verbose(g)
    add_path(g)
    s = p.add_argument_group("your own training script")
    s.add_argument(
        "--train-script",
        default=None,
        metavar="PATH",
        help="your NVFlare Client API script, run on every site instead of the plugin's executor; it must answer "
        "the plugin's tasks (docs/integration.md). Carried in the job",
    )
    s.add_argument(
        "--train-args",
        default="",
        metavar="ARGS",
        help='the arguments of --train-script as one string, e.g. --train-args "--epochs 2 --lr 0.01" (a single '
        "word starting with a dash: --train-args=--fast)",
    )


def add_verbose(p: Any) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show NVFlare's own log on the console (otherwise it goes to the job's log files only)",
    )


def add_path(p: Any) -> None:
    """``--path``: where the user's model module is found (the working directory always is)."""
    p.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder to import your model module from (--model mymod:build_net); the working directory is "
        "searched without it (repeatable)",
    )


def add_forget_arg(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        *_flags("forget_classes"),
        dest="forget_classes",
        type=class_list,
        required=required,
        action=_Deprecated,
        help="class id(s) to forget, e.g. 3 or 0,5,9",
    )


def add_allow_import(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-import",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module a checkpoint may name as its model (package.module:factory); without it such a checkpoint is "
        "refused, since loading it would run that module's code (repeatable)",
    )


def option_values(args: argparse.Namespace, groups: tuple[type[OptionGroup], ...]) -> dict[str, Any]:
    """The option flags the user gave, as recipe keywords."""
    names = {n for g in groups for n in g.names()}
    return {k: v for k, v in vars(args).items() if k in names}


#: what each ``export-model --format`` writes and needs
EXPORT_FORMAT_HELP = (
    "pt2: torch.export program, loads with torch.export.load(PATH).module(); onnx: needs onnx + onnxscript"
)


def add_checkpoint_model(p: argparse.ArgumentParser) -> None:
    """What a command that loads a checkpoint needs to rebuild its model: the architecture (only for a plain
    state_dict; a plugin checkpoint names its own) and where a model given by import path may come from."""
    p.add_argument("--model", default=None, help="registry name or import path (only for a plain state_dict)")
    p.add_argument("--num-classes", type=int, default=None, help="only for a plain state_dict checkpoint")
    add_allow_import(p)
    add_path(p)


def build_parser(commands: dict[str, Any]) -> argparse.ArgumentParser:
    """The ``nvflare-unlearn`` parser; ``commands`` maps a command name to its function."""
    from nvflare_unlearn.fl.recipes import PretrainRecipe

    p = argparse.ArgumentParser(
        prog="nvflare-unlearn",
        description="Federated class unlearning in NVFlare.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="end-to-end unlearning on built-in digits in the NVFlare simulator (~2 min)")
    d.add_argument("--out", required=True, help="new folder for report.json, models, plan and plot")
    d.add_argument(*_flags("num_clients"), dest="num_clients", type=int, default=2, action=_Deprecated)
    d.add_argument(*_flags("forget_classes"), dest="forget_classes", type=class_list, default=[3], action=_Deprecated)
    d.add_argument(
        *_flags("prune_ratio"),
        dest="prune_ratio",
        type=fraction,
        default=0.3,
        action=_Deprecated,
        help="fraction of conv channels pruned (0.1 lets small_cnn relearn the digit during fine-tuning)",
    )
    d.add_argument("--pretrain-rounds", type=int, default=5)
    d.add_argument(
        *_flags("num_rounds"), dest="num_rounds", type=int, default=3, action=_Deprecated, help="fine-tuning rounds"
    )
    d.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=None)
    add_verbose(d)
    d.set_defaults(func=commands["demo"])

    for name, helptext, groups in (
        ("pretrain", "FedAvg on all classes: the model to unlearn", TRAINING_GROUPS),
        ("retrain", "FedAvg from scratch without the forget classes (gold standard)", TRAINING_GROUPS),
        ("unlearn", "federated unlearning of a trained checkpoint", UNLEARNING_GROUPS),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--out", required=True, help="new folder for this run's outputs")
        s.add_argument("--name", default=None, help="NVFlare job name")
        add_job_args(s)
        if name == "unlearn":
            s.add_argument(
                "--ckpt",
                required=True,
                help="the trained model to unlearn from (never modified); relative: carried in the job, absolute: "
                "a path on the server (with --env prod it need not exist here)",
            )
            s.add_argument(
                "--resume-from",
                default=None,
                help="go on with a stopped or crashed run of the same request: its unlearned_model.pt (or "
                "pruned_model.pt); --ckpt must still name the original model",
            )
        if name != "pretrain":
            add_forget_arg(s, required=True)
        add_option_groups(s, groups, PretrainRecipe.DEFAULTS if name != "unlearn" else measured_defaults_help())
        s.set_defaults(func=commands[name], groups=groups)

    e = sub.add_parser("evaluate", help="U-set / R-set accuracy of a checkpoint on a test set")
    e.add_argument("--ckpt", required=True)
    add_forget_arg(e, required=False)
    e.add_argument("--dataset", default="digits")
    e.add_argument("--data-root", default=None)
    e.add_argument("--normalize", default="dataset", help=SiteDataOptions.help("normalize"))
    add_checkpoint_model(e)
    e.set_defaults(func=commands["evaluate"])

    x = sub.add_parser("export", help="write an NVFlare job folder for `nvflare job submit`")
    x.add_argument("--job", choices=("pretrain", "unlearn", "retrain"), required=True)
    x.add_argument("--out", required=True, help="job folder to write")
    x.add_argument("--name", default=None)
    x.add_argument("--ckpt", default=None, help="unlearn: the trained model's path AS SEEN BY THE SERVER")
    x.add_argument("--check-ckpt", action="store_true", help="unlearn: require --ckpt to exist on this machine")
    add_job_args(x)
    add_forget_arg(x, required=False)
    add_option_groups(x, UNLEARNING_GROUPS, {})
    x.set_defaults(func=commands["export"])

    m = sub.add_parser(
        "export-model", help="write the unlearned model as a torch.export program (or ONNX) that plain torch loads"
    )
    m.add_argument("--ckpt", required=True, help="the checkpoint to export (e.g. OUT/unlearned_model.pt)")
    m.add_argument("--out", required=True, help="new file: model.pt2 (--format pt2) or model.onnx (--format onnx)")
    m.add_argument("--format", choices=EXPORT_FORMATS, default="pt2", help=EXPORT_FORMAT_HELP)
    add_checkpoint_model(m)
    m.set_defaults(func=commands["export-model"])

    v = sub.add_parser("verify-record", help="check an unlearning_record.json's signature and its files")
    v.add_argument("--record", required=True, help="unlearning_record.json written by the unlearning job")
    v.add_argument("--model", required=True, help="the unlearned model file to check (e.g. OUT/unlearned_model.pt)")
    v.add_argument(
        "--public-key",
        default=None,
        help="the server's public key YOU hold (PEM key or certificate); without it the signature check fails",
    )
    v.add_argument("--original", default=None, help="also check that this original checkpoint is unchanged")
    v.add_argument(
        "--metrics", default=None, help="the job's metrics file (default: job_metrics.json beside the record)"
    )
    add_allow_import(v)
    add_path(v)
    v.set_defaults(func=commands["verify-record"])

    ms = sub.add_parser("methods", help="the registered unlearning methods, what each needs, and the default")
    ms.set_defaults(func=commands["methods"])
    return p
