"""The library's messages in the command line's words, and the user's folders made importable.

The core's errors suggest Python arguments (``model_name='m:f'``, ``allow_import=['m']``): right for a recipe or
``load_checkpoint`` call, wrong advice at a shell. The CLI rewrites the suggestions it knows into its own flags
before printing, so a message never names an argument the user cannot pass.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence

#: a Python-argument suggestion in a library message -> the same advice as CLI flags
_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bmodel_name='([^']*)'"), r"--model \1"),
    (re.compile(r"\ballow_import=\['([^']*)'\]"), r"--allow-import \1"),
    (re.compile(r"\bpass model_name and num_classes\b"), "pass --model and --num-classes"),
    (
        re.compile(r"pass input_shape=\(C, H, W\) to the recipe \(or name the model '([^']*)'\)"),
        r"or give the shape in the name: --model '\1'",
    ),
    (re.compile(r"\btrain_script\b"), "--train-script"),
    (re.compile(r"is an import path: allow its module\b"), "is an import path: allow its module with --allow-import"),
)

#: a model module that did not import: where the CLI looks for it
_IMPORT_HINT = (
    "; the command line imports your model module from the working directory and from each --path DIR (e.g. --path src)"
)


def cli_words(message: str) -> str:
    """``message`` with the library's Python-argument suggestions rewritten as the CLI's flags."""
    for pattern, replacement in _REWRITES:
        message = pattern.sub(replacement, message)
    if "cannot import module" in message and "--path" not in message:
        message += _IMPORT_HINT
    return message


def make_importable(paths: Sequence[str], cwd: str | None = None) -> list[str]:
    """Let ``--model package.module:factory`` name a module in the working directory or a ``--path`` folder, as
    ``python -m`` would (a console script does not put the working directory on ``sys.path``). The ``--path``
    folders go first, the working directory last, so neither shadows an installed package of the same name by
    accident. Returns the folders added."""
    added = []
    for folder in reversed(list(paths)):
        folder = os.path.abspath(folder)
        if not os.path.isdir(folder):
            raise ValueError(f"--path {folder} is not a folder")
        if folder not in sys.path:
            sys.path.insert(0, folder)
            added.append(folder)
    here = os.path.abspath(cwd or os.getcwd())
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)
        added.append(here)
    return added
