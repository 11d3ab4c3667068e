"""The job folders under ``job_templates/``, defined once as recipes and exported from them.

Config-driven users submit these folders with ``nvflare job submit -j job_templates/<name>`` (after editing the
``args`` in ``app/config/*.json``); ``poc/run_poc.sh`` runs them in a local POC system. The folders are generated,
never hand-edited: ``python -m nvflare_unlearn.cli.templates job_templates`` rewrites them, and a test regenerates them
into a temporary folder and fails when the committed copies drifted from the recipes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any, Callable

#: The trained model the unlearning templates start from: a file NAME, which the server resolves in the job's own
#: ``app/custom/`` folder (NVFlare 2.9's rule for a relative ``initial_ckpt``), so the folders name no path of any
#: machine. Put the model there before ``nvflare job submit`` (``poc/run_poc.py`` does), or edit ``initial_ckpt``
#: in ``app/config/config_fed_server.json`` to an absolute path on your server.
TEMPLATE_CKPT = "pretrained_model.pt"

_DIGITS = dict(model="small_cnn", num_classes=10, in_channels=1, dataset="digits", num_clients=2)


def _pretrain() -> Any:
    from nvflare_unlearn.fl import PretrainRecipe

    return PretrainRecipe(name="pretrain_digits", num_rounds=5, lr=0.05, **_DIGITS)


def _unlearn(mode: str) -> Callable[[], Any]:
    def build() -> Any:
        from nvflare_unlearn.fl import UnlearningRecipe

        return UnlearningRecipe(
            name=f"unlearn_digits{'_mask' if mode == 'mask' else ''}",
            initial_ckpt=TEMPLATE_CKPT,
            check_ckpt=False,
            forget_classes=[3],
            prune_ratio=0.3,
            num_rounds=3,
            lr=0.01,
            prune_mode=mode,
            **_DIGITS,
        )

    return build


def _retrain() -> Any:
    from nvflare_unlearn.fl import RetrainRecipe

    return RetrainRecipe(name="retrain_digits", forget_classes=[3], num_rounds=5, lr=0.05, **_DIGITS)


#: template folder name -> recipe factory
TEMPLATES: dict[str, Callable[[], Any]] = {
    "pretrain_digits": _pretrain,
    "unlearn_digits": _unlearn("remove"),
    "unlearn_digits_mask": _unlearn("mask"),
    "retrain_digits": _retrain,
}


def export_templates(dest: str) -> list[str]:
    """Export every template into ``dest/<name>/`` (replacing what was there); returns the folders written."""
    written = []
    os.makedirs(dest, exist_ok=True)
    for name, factory in TEMPLATES.items():
        recipe = factory()
        with tempfile.TemporaryDirectory() as tmp:
            recipe.export(tmp)
            src = os.path.join(tmp, recipe.name)
            if not os.path.isdir(src):
                raise RuntimeError(f"exporting {name} wrote no {src}")
            target = os.path.join(dest, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            shutil.copytree(src, target)
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate the job_templates/ folders from the recipes.")
    parser.add_argument("dest", nargs="?", default="job_templates")
    for path in export_templates(parser.parse_args().dest):
        print(path)


if __name__ == "__main__":  # pragma: no cover
    main()
