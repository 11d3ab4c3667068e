"""One default (issue 21, deliver 3): a request that names no method gets the same concrete method on every route:
the Python recipe, the CLI, an exported job folder, a hand-written job config and the CLI's help all resolve it
through ``unlearning.defaults.measured_defaults`` (fed by the committed evidence)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from core_helpers import trained_digits_cnn

from nvflare_unlearn import save_checkpoint
from nvflare_unlearn.unlearning import measured_defaults

FORGET = [3]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "trained.pt"
    save_checkpoint(path, trained_digits_cnn(), None, "small_cnn", 10)
    return str(path)


@pytest.fixture(scope="module")
def expected() -> dict:
    values = measured_defaults(set()).values
    assert set(values) >= {"method", "recovery"}
    return values


def _method_of(options: dict) -> dict:
    return {k: options[k] for k in ("method", "recovery")}


def _recipe(ckpt: str, **kw):
    from nvflare_unlearn.fl import UnlearningRecipe

    return UnlearningRecipe(model="small_cnn", num_classes=10, in_channels=1, initial_ckpt=ckpt,
                            forget_classes=FORGET, num_rounds=1, num_clients=2, tensorboard=False, **kw)  # fmt: skip


def _cli_args(argv: list[str]):
    from nvflare_unlearn.cli.commands import COMMANDS
    from nvflare_unlearn.cli.parser import build_parser

    return build_parser(COMMANDS).parse_args(argv)


def test_python_recipe(ckpt, expected):
    recipe = _recipe(ckpt)
    assert _method_of(recipe.options["unlearning"].to_dict()) == expected
    assert set(expected) <= set(recipe.defaults_applied)


def test_cli_unlearn_builds_the_same_recipe(ckpt, expected, tmp_path):
    from nvflare_unlearn.cli.parser import option_values
    from nvflare_unlearn.fl import UnlearningRecipe

    args = _cli_args(["unlearn", "--out", str(tmp_path / "o"), "--model", "small_cnn", "--ckpt", ckpt,
                      "--forget-classes", "3", "--num-rounds", "1"])  # fmt: skip
    flags = option_values(args, args.groups)
    assert "method" not in flags and "recovery" not in flags  # nothing the user typed names the method
    recipe = UnlearningRecipe(model="small_cnn", num_classes=10, in_channels=1, initial_ckpt=ckpt,
                              forget_classes=FORGET, tensorboard=False, **flags)  # fmt: skip
    assert _method_of(recipe.options["unlearning"].to_dict()) == expected


def test_cli_help_names_the_default(expected):
    from nvflare_unlearn.cli.commands import COMMANDS
    from nvflare_unlearn.cli.parser import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser(COMMANDS).parse_args(["unlearn", "--help"])
    text = " ".join(out.getvalue().split())
    assert f"(default: {expected['method']}, the measured best" in text


def test_exported_job_carries_the_concrete_method(ckpt, expected, tmp_path):
    from nvflare_unlearn.cli.commands import cmd_export

    args = _cli_args(["export", "--job", "unlearn", "--out", str(tmp_path / "job"), "--model", "small_cnn",
                      "--ckpt", ckpt, "--forget-classes", "3"])  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert cmd_export(args) == 0
    configs = list((tmp_path / "job").rglob("config_fed_server.json"))
    assert len(configs) == 1
    server = json.loads(configs[0].read_text())
    controller = next(w for w in server["workflows"] if w["path"].endswith("UnlearningController"))
    assert _method_of(controller["args"]["unlearning"]) == expected


def test_a_hand_written_job_config_without_a_method_resolves_at_the_controller(expected):
    from nvflare_unlearn.fl.unlearning_controller import UnlearningController

    controller = UnlearningController(model_name="small_cnn", num_classes=10, forget_classes=FORGET, unlearning={})
    assert _method_of(controller.unlearning) == expected


def test_a_pruning_option_or_a_named_method_wins_on_every_route(ckpt):
    assert _recipe(ckpt, prune_ratio=0.2).options["unlearning"].method == "prune"
    assert _recipe(ckpt, method="scrub").options["unlearning"].method == "scrub"
