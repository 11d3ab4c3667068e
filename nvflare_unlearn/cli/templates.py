"""The job folders under ``job_templates/``, defined once as recipes and exported from them.

Config-driven users submit these folders with ``nvflare job submit -j job_templates/<name>`` (after editing the
``args`` in ``app/config/*.json``); ``poc/run_poc.sh`` runs them in a local POC system. The folders are generated,
never hand-edited: ``python -m nvflare_unlearn.cli.templates job_templates`` rewrites them, and a test regenerates them
into a temporary folder and fails when the committed copies drifted from the recipes.

Each folder also carries NVFlare's template card: ``info.conf`` (the description, controller type and execution API
type that ``nvflare job list_templates -d job_templates`` prints; without it NVFlare prints "NA") and ``info.md``
(what to edit before submitting).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from nvflare_unlearn import _io

#: The trained model the unlearning templates start from: a file NAME, which the server resolves in the job's own
#: ``app/custom/`` folder (NVFlare 2.9's rule for a relative ``initial_ckpt``), so the folders name no path of any
#: machine. Put the model there before ``nvflare job submit`` (``poc/run_poc.py`` does), or edit ``initial_ckpt``
#: in ``app/config/config_fed_server.json`` to an absolute path on your server.
TEMPLATE_CKPT = "pretrained_model.pt"

#: The CIFAR-10 folder of the CIFAR template: a placeholder every site replaces with its own folder (a relative
#: name that exists nowhere, so a site that forgot fails at once with "not found", never on someone else's data).
CIFAR_DATA_ROOT = "SET_ME/cifar10"

#: Where the own-model template's code comes from: the runnable example (your model, data and Client API script).
OWN_MODEL_EXAMPLE = os.path.join("docs", "examples", "own_model")

#: NVFlare's template card files (``nvflare.tool.job.job_client_const.JOB_INFO_CONF`` / ``JOB_INFO_MD``).
INFO_CONF = "info.conf"
INFO_MD = "info.md"

_DIGITS = dict(model="small_cnn", num_classes=10, in_channels=1, dataset="digits", num_clients=2)
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Template:
    """One job template: the recipe that builds it and the card NVFlare lists it with."""

    build: Callable[[], Any]
    description: str  # at most 60 characters: the width of list_templates' column
    execution_api_type: str  # "Executor" (the plugin's executor) or "client_api" (the user's script)
    edit: str  # info.md: what to set before submitting
    controller_type: str = "server"
    folder: str | None = None  # built and exported from this repository folder (its script and modules)


def _pretrain() -> Any:
    from nvflare_unlearn.fl import PretrainRecipe

    return PretrainRecipe(name="pretrain_digits", num_rounds=5, lr=0.05, **_DIGITS)


#: an unlearning template's checkpoint is a path on the server, which need not exist where the job is exported
_ON_THE_SERVER = dict(initial_ckpt=TEMPLATE_CKPT, check_ckpt=False)
#: the digits templates' request: forget 3, the paper's pruning at 30 %, 3 fine-tuning rounds
_DIGITS_REQUEST = dict(**_ON_THE_SERVER, forget_classes=[3], prune_ratio=0.3, num_rounds=3)


def _unlearn(mode: str) -> Callable[[], Any]:
    def build() -> Any:
        from nvflare_unlearn.fl import UnlearningRecipe

        return UnlearningRecipe(
            name=f"unlearn_digits{'_mask' if mode == 'mask' else ''}",
            **_DIGITS_REQUEST,
            lr=0.01,
            prune_mode=mode,
            **_DIGITS,
        )

    return build


def _retrain() -> Any:
    from nvflare_unlearn.fl import RetrainRecipe

    return RetrainRecipe(name="retrain_digits", forget_classes=[3], num_rounds=5, lr=0.05, **_DIGITS)


def _unlearn_cifar10() -> Any:
    from nvflare_unlearn.fl import UnlearningRecipe

    # method unset: the measured default (the job records it); the README's ResNet20 example, with 2 sites
    return UnlearningRecipe(
        name="unlearn_cifar10",
        model="resnet20",
        num_classes=10,
        **_ON_THE_SERVER,
        forget_classes=[9],
        num_rounds=10,
        dataset="cifar10",
        data_root=CIFAR_DATA_ROOT,
        num_clients=2,
    )


@contextlib.contextmanager
def _in_folder(path: str) -> Iterator[None]:
    """Build a recipe from inside ``path`` (NVFlare resolves ``train_script`` there; its modules import from it)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is missing: the own-model template is exported from a repository checkout")
    cwd, added = os.getcwd(), path not in sys.path
    if added:
        sys.path.insert(0, path)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)
        if added:
            sys.path.remove(path)


def _unlearn_own_model() -> Any:
    from nvflare_unlearn.fl import UnlearningRecipe

    return UnlearningRecipe(
        name="unlearn_own_model",
        model="my_net:build_net",  # your factory, by import path: the job carries my_net.py to every machine
        num_classes=10,
        **_DIGITS_REQUEST,
        num_clients=2,
        train_script="train_client.py",
        train_args="--n_sites 2 --epochs 1 --lr 0.01",
    )


_CKPT_NOTE = (
    f"the trained model as `app/custom/{TEMPLATE_CKPT}` (or `initial_ckpt` of the `persistor` as an absolute path "
    "on the server)"
)

#: template folder name -> recipe and card
TEMPLATES: dict[str, Template] = {
    "pretrain_digits": Template(
        _pretrain,
        "FedAvg pretraining of a small CNN on digits (all classes)",
        "Executor",
        "nothing: the digits ship with scikit-learn; `num_rounds`, `lr` in the `controller` / executor args",
    ),
    "unlearn_digits": Template(
        _unlearn("remove"),
        "Unlearn digit 3: TF-IDF pruning + FedAvg fine-tuning",
        "Executor",
        f"{_CKPT_NOTE}; `forget_classes` of the `controller`",
    ),
    "unlearn_digits_mask": Template(
        _unlearn("mask"),
        "Unlearn digit 3, shapes kept (pruned channels held at 0)",
        "Executor",
        f"{_CKPT_NOTE}; `forget_classes` of the `controller`",
    ),
    "retrain_digits": Template(
        _retrain,
        "Retrain from scratch without digit 3 (the gold standard)",
        "Executor",
        "`forget_classes` of the `controller`",
    ),
    "unlearn_cifar10": Template(
        _unlearn_cifar10,
        "Unlearn CIFAR-10 class 9 from a ResNet20 (set data_root)",
        "Executor",
        f"`data_root` in `app/config/config_fed_client.json` (the placeholder `{CIFAR_DATA_ROOT}`: each site's "
        f"CIFAR-10 folder, .npz or torchvision layout; may contain `{{site_name}}`); {_CKPT_NOTE}",
    ),
    "unlearn_own_model": Template(
        _unlearn_own_model,
        "Unlearn your own model (import path), Client API script",
        "client_api",
        "your model module and Client API script in `app/custom/` in place of `my_net.py`, `my_data.py` and "
        "`train_client.py` (the script answers the plugin's tasks: docs/integration.md); `model_name` "
        "(`module:factory`) in `app/config/config_fed_server.json`; `task_script_path` / `task_script_args` in "
        f"`app/config/config_fed_client.json`; {_CKPT_NOTE}",
        folder=OWN_MODEL_EXAMPLE,
    ),
}


def _info_conf(t: Template) -> str:
    """NVFlare's ``info.conf`` (HOCON): the three keys ``list_templates`` prints."""
    return (
        "{\n"
        f'    description = "{t.description}"\n'
        f'    execution_api_type = "{t.execution_api_type}"\n'
        f'    controller_type = "{t.controller_type}"\n'
        "}\n"
    )


def _info_md(name: str, t: Template) -> str:
    return (
        "# Job Template Information Card\n\n"
        f"## {name}\n\n"
        f"{t.description}\n\n"
        f"- controller type: {t.controller_type}; execution API: {t.execution_api_type}\n"
        f"- set before submitting: {t.edit}\n"
        f"- submit: `nvflare job submit -j <your copy of job_templates/{name}>`\n\n"
        "Generated by `python -m nvflare_unlearn.cli.templates job_templates`; see job_templates/README.md.\n"
    )


def export_templates(dest: str) -> list[str]:
    """Export every template into ``dest/<name>/`` (replacing what was there) with its ``info.conf`` and
    ``info.md``; returns the folders written."""
    written = []
    dest = os.path.abspath(dest)  # the own-model recipe is built from another folder
    os.makedirs(dest, exist_ok=True)
    for name, template in TEMPLATES.items():
        if len(template.description) > 60:
            raise ValueError(f"{name}: description over 60 characters, list_templates would cut it")
        with tempfile.TemporaryDirectory() as tmp:
            with _in_folder(os.path.join(_REPO, template.folder)) if template.folder else contextlib.nullcontext():
                recipe = template.build()
                recipe.export(tmp)
            src = os.path.join(tmp, recipe.name)
            if not os.path.isdir(src):
                raise RuntimeError(f"exporting {name} wrote no {src}")
            target = os.path.join(dest, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            shutil.copytree(src, target)
        _io.write_text(os.path.join(target, INFO_CONF), _info_conf(template))
        _io.write_text(os.path.join(target, INFO_MD), _info_md(name, template))
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate the job_templates/ folders from the recipes.")
    parser.add_argument("dest", nargs="?", default="job_templates")
    for path in export_templates(parser.parse_args().dest):
        print(path)


if __name__ == "__main__":  # pragma: no cover
    main()
