"""``nvflare-unlearn``: run the plugin's NVFlare jobs from a shell, with progress a person can follow.

    nvflare-unlearn demo --out runs/demo                      pretrain on digits, forget a class, fine-tune
    nvflare-unlearn pretrain --out runs/pre ...               FedAvg on all classes -> the model to unlearn
    nvflare-unlearn unlearn --ckpt M --forget-classes 3 --out runs/u ...
    nvflare-unlearn unlearn --model mymod:build_net --train-script client.py --train-args "--epochs 1" ...
                                                              your model and your Client API script
    nvflare-unlearn retrain --forget-classes 3 --out runs/r ...   the gold standard (from scratch, without 3)
    nvflare-unlearn evaluate --ckpt M --forget-classes 3      U-set / R-set / class-wise accuracy of a checkpoint
    nvflare-unlearn export --job unlearn --out DIR            an exported job folder for `nvflare job submit`
    nvflare-unlearn verify-record --record R --model M --public-key K   check a signed audit record and its files
    nvflare-unlearn export-model --ckpt M --out model.pt2     the model as a program plain torch loads (or ONNX)

Owns: the parser (``parser``, flags generated from ``nvflare_unlearn.options``), the commands (``commands``), the
report and plot (``report``) and the generated ``job_templates/`` (``templates``). May import anything.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from nvflare_unlearn.cli.commands import COMMANDS, EXIT_FAILED, EXIT_USAGE, CLIError
from nvflare_unlearn.cli.messages import cli_words, make_importable
from nvflare_unlearn.cli.parser import build_parser

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(COMMANDS)
    args = parser.parse_args(argv)
    if args.command == "export":
        if args.job in ("unlearn", "retrain") and not args.forget_classes:
            parser.error(f"export --job {args.job} needs --forget-classes")
        if args.job == "unlearn" and not args.ckpt:
            parser.error("export --job unlearn needs --ckpt (the model's path as seen by the server)")
    try:
        make_importable(getattr(args, "path", None) or [])
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"nvflare-unlearn: error: {cli_words(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        print(f"nvflare-unlearn: job failed: {cli_words(str(e))}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
