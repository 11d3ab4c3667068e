"""The user's own model, data and Client API script (docs/integration.md, docs/examples/own_model/).

- import-path models: ``"package.module:factory"`` resolved by ``build_model`` and everything that rebuilds an
  architecture (plans, checkpoints, the persistor), with clear errors for what cannot work on other machines;
- the recipes accept the path or the factory, ship a module that is not installed with the job, and the exported
  job names the user's factory and script (strings only) and none of our data options;
- slow: the example job script runs for real in the simulator (pretrain with the user's script, then unlearn).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from nvflare_unlearn import apply_pruning_plan, build_pruning_plan, load_checkpoint, save_checkpoint
from nvflare_unlearn.method.graph import coupled_groups
from nvflare_unlearn.models import build_model, check_model_name, example_input, input_shape, model_name_of, model_spec

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "own_model"
JOB_SCRIPT = EXAMPLE / "pretrain_then_unlearn.py"


@pytest.fixture
def example_on_path(monkeypatch):
    """The example's folder on sys.path (as the job script has it), its modules imported fresh."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for name in ("my_net", "my_data"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import my_net

    return my_net


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """Write small user modules into a fresh folder on sys.path; returns a writer(name, source)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, source: str) -> Path:
        path = tmp_path / f"{name.replace('.', '/')}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        written.append(name)
        monkeypatch.delitem(sys.modules, name, raising=False)
        return path

    yield write
    for name in written:
        sys.modules.pop(name.removesuffix(".__init__"), None)


TINY_NET = """
    import torch.nn as nn

    def build(num_classes=10):
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, num_classes))
"""


# ---------------------------------------------------------------------------------------- import-path models
def test_import_path_builds_the_users_model_with_its_input_shape(example_on_path):
    my_net = example_on_path
    model = build_model("my_net:build_net", 10).eval()
    assert isinstance(model, my_net.DigitResNet)
    assert model_name_of(model) == "my_net:build_net"
    assert input_shape("my_net:build_net") == (1, 8, 8)
    x = example_input(model, 2)
    assert tuple(x.shape) == (2, 1, 8, 8) and torch.equal(x, example_input("my_net:build_net", 2))
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    # the factory itself, or the path with the declared shape spelled out, give the same canonical name
    assert model_spec(my_net.build_net) == model_spec("my_net:build_net@1x8x8") == "my_net:build_net"
    assert model_name_of(build_model(my_net.build_net, 7)) == "my_net:build_net"
    # the residual additions couple channels across the user's own layer names
    assert ["entry", "stage1.conv_out"] in coupled_groups(model)
    assert ["widen", "stage2.conv_out"] in coupled_groups(model)


def test_input_shape_given_outside_the_factory_is_part_of_the_name(user_modules):
    user_modules("shapeless_net", TINY_NET)
    name = model_spec("shapeless_net:build", input_shape=(1, 12, 12))
    assert name == "shapeless_net:build@1x12x12"
    model = build_model(name, 5)
    assert model_name_of(model) == name and tuple(example_input(model).shape) == (1, 1, 12, 12)
    assert input_shape(name) == (1, 12, 12) and input_shape(name, in_channels=1) == (1, 12, 12)
    with pytest.raises(ValueError, match="names input shape"):
        model_spec(name, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"takes 1-channel inputs .* not in_channels=3"):
        build_model(name, 5, in_channels=3)


def test_plan_and_checkpoint_round_trip_through_the_import_path(example_on_path, tmp_path):
    model = build_model("my_net:build_net", 10)
    scores = {n: torch.rand(m.out_channels).numpy() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    plan = build_pruning_plan(model, scores, 0.3, forget_class=3)
    assert plan.model_name == "my_net:build_net" and plan.input_shape == [1, 8, 8]
    apply_pruning_plan(model, plan)
    assert model.entry.out_channels == model.stage1.conv_out.out_channels < 16  # coupled: pruned together
    path = save_checkpoint(tmp_path / "pruned.pt", model, plan, "my_net:build_net", 10)
    with pytest.raises(ValueError, match="would import and run module 'my_net'"):
        load_checkpoint(path)  # the file alone may not choose a module to import (issue 11)
    again, plan2, meta = load_checkpoint(path, allow_import=["my_net"])  # rebuilt from the stored name + plan
    assert meta["model_name"] == "my_net:build_net" and plan2.to_json() == plan.to_json()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # an ordinary NVFlare FedAvg checkpoint ({"model": state_dict}) of the user's model loads by name too
    torch.save(
        {"model": build_model("my_net:build_net", 10).state_dict(), "train_conf": {}}, tmp_path / "FL_global_model.pt"
    )
    plain, no_plan, _ = load_checkpoint(tmp_path / "FL_global_model.pt", model_name="my_net:build_net", num_classes=10)
    assert no_plan is None and model_name_of(plain) == "my_net:build_net"


def test_missing_module_is_a_clear_error():
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_pkg_xyz\.nets'.*importable on the server"):
        build_model("no_such_pkg_xyz.nets:build", 10)
    with pytest.raises(ValueError, match="cannot import module"):
        check_model_name("no_such_pkg_xyz:build")


def test_missing_attribute_and_not_callable(user_modules):
    user_modules("not_a_factory", "VALUE = 3\nclass Plain:\n    pass\n")
    with pytest.raises(ValueError, match="has no attribute 'build'"):
        model_spec("not_a_factory:build")
    with pytest.raises(ValueError, match="names a int, not a factory"):
        model_spec("not_a_factory:VALUE")
    with pytest.raises(ValueError, match="not an nn.Module subclass"):
        model_spec("not_a_factory:Plain@1x8x8")


def test_factory_must_take_num_classes_and_return_a_module(user_modules):
    user_modules(
        "odd_factories",
        """
        import torch.nn as nn

        def no_classes():
            return nn.Conv2d(1, 1, 1)
        no_classes.input_shape = (1, 8, 8)

        def not_a_module(num_classes=10):
            return "a string"
        not_a_module.input_shape = (1, 8, 8)
        """,
    )
    with pytest.raises(ValueError, match="must accept a num_classes= keyword"):
        build_model("odd_factories:no_classes", 10)
    with pytest.raises(ValueError, match="returned str, not an nn.Module"):
        build_model("odd_factories:not_a_module", 10)


def test_lambdas_locals_and_main_are_refused():
    with pytest.raises(ValueError, match="a lambda cannot be rebuilt"):
        model_spec(lambda num_classes=10: nn.Linear(1, num_classes))

    def local_factory(num_classes=10):
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="defined inside a function.*move it to module level"):
        model_spec(local_factory)

    def main_factory(num_classes=10):
        return nn.Linear(1, num_classes)

    main_factory.__module__, main_factory.__qualname__ = "__main__", "main_factory"
    with pytest.raises(ValueError, match=r"defined in the script being run \(__main__\)"):
        model_spec(main_factory)
    with pytest.raises(ValueError, match="not an import path"):
        model_spec("my net:build")
    with pytest.raises(ValueError, match="unknown model name 'alexnet'.*import path"):
        build_model("alexnet", 10)


def test_missing_input_shape_is_a_clear_error(user_modules):
    user_modules("shapeless_net", TINY_NET)
    with pytest.raises(ValueError, match=r"input shape of model 'shapeless_net:build' is unknown.*input_shape="):
        build_model("shapeless_net:build", 10)
    with pytest.raises(ValueError, match="input shape of model 'shapeless_net:build' is unknown"):
        model_spec("shapeless_net:build")
    with pytest.raises(ValueError, match="three positive integers"):
        model_spec("shapeless_net:build", input_shape=(8, 8))


# ---------------------------------------------------------------------------------------- recipes and export
def test_recipes_take_the_factory_and_refuse_what_sites_cannot_rebuild(example_on_path, user_modules, tmp_path):
    from nvflare_unlearn.fl import PretrainRecipe, UnlearningRecipe

    assert model_spec(example_on_path.build_net) == "my_net:build_net"
    assert model_spec(build_model("my_net:build_net", 10)) == "my_net:build_net"
    with pytest.raises(ValueError, match="was not built by nvflare_unlearn.build_model"):
        model_spec(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="a lambda cannot be rebuilt"):
        PretrainRecipe(model=lambda num_classes=10: nn.Linear(1, num_classes), num_clients=2)
    user_modules("shapeless_net", TINY_NET)
    with pytest.raises(ValueError, match="input shape of model 'shapeless_net:build' is unknown"):
        PretrainRecipe(model="shapeless_net:build", num_clients=2)
    recipe = PretrainRecipe(model="shapeless_net:build", input_shape=(1, 8, 8), num_clients=2, num_rounds=1)
    assert recipe.model_name == "shapeless_net:build@1x8x8"
    ckpt = save_checkpoint(tmp_path / "model.pt", build_model("my_net:build_net", 10), None, "my_net:build_net", 10)
    recipe = UnlearningRecipe(model=example_on_path.build_net, initial_ckpt=str(ckpt), forget_classes=[3])
    assert recipe.model_name == "my_net:build_net"
    with pytest.raises(ValueError, match="do not fit|does not match|holds model_name"):  # the wrong architecture
        UnlearningRecipe(model="small_cnn", initial_ckpt=str(ckpt), forget_classes=[3])


def test_a_package_module_ships_with_its_init_and_installed_code_does_not(user_modules, tmp_path):
    from nvflare_unlearn.fl import PretrainRecipe
    from nvflare_unlearn.fl.job_utils import model_files_to_ship

    user_modules("their_pkg.__init__", "")  # their_pkg/__init__.py
    user_modules("their_pkg.nets", textwrap.dedent(TINY_NET) + "\nbuild.input_shape = (1, 8, 8)\n")
    (tmp_path / "their_pkg" / "notes.txt").write_text("not code: not shipped")
    sys.modules.pop("their_pkg", None)
    recipe = PretrainRecipe(name="pkg_job", model="their_pkg.nets:build", num_clients=2, num_rounds=1)
    recipe.export(str(tmp_path / "jobs"))
    custom = tmp_path / "jobs" / "pkg_job" / "app" / "custom"
    assert sorted(p.relative_to(custom).as_posix() for p in custom.rglob("*.py")) == [
        "their_pkg/__init__.py",
        "their_pkg/nets.py",
    ]
    server = json.loads((tmp_path / "jobs" / "pkg_job" / "app" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["args"]["model_name"] == "their_pkg.nets:build"
    # registry models and the plugin itself are referenced by name, never copied
    assert model_files_to_ship("small_cnn") is None
    assert model_files_to_ship("nvflare_unlearn.models.small_cnn:SmallCNN") is None
    import sklearn.datasets  # noqa: F401  (an installed package: referenced, not shipped)

    assert model_files_to_ship("sklearn.datasets:load_digits") is None


def _run_example(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(JOB_SCRIPT), *args],
        cwd=str(REPO),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_example_exports_jobs_naming_the_users_factory_and_script(tmp_path):
    """The job folders the example writes: strings only, the user's code in custom/, none of our data options."""
    out = _run_example(["--export-jobs", str(tmp_path / "jobs")], timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    for job in ("own_model_pretrain", "own_model_unlearn"):
        app = tmp_path / "jobs" / job / "app"
        meta = json.loads((tmp_path / "jobs" / job / "meta.json").read_text())
        assert meta["deploy_map"] == {"app": ["@ALL"]}  # one app: server and sites share its custom code
        assert sorted(p.name for p in (app / "custom").glob("*.py")) == ["my_data.py", "my_net.py", "train_client.py"]
        assert (app / "custom" / "my_net.py").read_text() == (EXAMPLE / "my_net.py").read_text()
        server = json.loads((app / "config" / "config_fed_server.json").read_text())
        assert server["workflows"][0]["args"]["model_name"] == "my_net:build_net"
        persistor = next(c for c in server["components"] if c["id"] == "persistor")
        assert persistor["path"] == "nvflare_unlearn.fl.persistor.UnlearningModelPersistor"
        assert persistor["args"]["model_name"] == "my_net:build_net"
        client_text = (app / "config" / "config_fed_client.json").read_text()
        client = json.loads(client_text)
        (executor,) = client["executors"]
        assert sorted(executor["tasks"]) == ["class_activations", "train", "validate", "verify"]
        assert executor["executor"]["path"].endswith("ClientAPIExecutor")
        args = executor["executor"]["args"]
        assert args["task_script_path"] == "train_client.py" and args["params_exchange_format"] == "numpy"
        assert "--n_sites 2" in args["task_script_args"]
        # the user's script loads its own data: none of the plugin's executor or data options reach the sites
        for unused in ("UnlearningExecutor", "dataset", "data_root", "partition", "data_seed"):
            assert unused not in client_text, unused
    unlearn_server = json.loads(
        (tmp_path / "jobs" / "own_model_unlearn" / "app" / "config" / "config_fed_server.json").read_text()
    )
    assert unlearn_server["workflows"][0]["args"]["forget_classes"] == [3]
    assert unlearn_server["workflows"][0]["args"]["plan"]["prune_ratio"] == 0.3


@pytest.mark.slow
@pytest.mark.sim
@pytest.mark.timeout(1200)  # above the subprocess's own 1100 s, so the subprocess timeout is what fires
def test_example_pretrains_and_unlearns_the_users_model_in_the_simulator(tmp_path):
    """The example end to end: the user's script trains their model, then the unlearning job forgets digit 3."""
    summary_path = tmp_path / "summary.json"
    started = time.time()
    out = _run_example(
        [
            "--workspace",
            str(tmp_path / "ws"),
            "--summary",
            str(summary_path),
            "--forget-classes",
            "3",
            "--prune-ratio",
            "0.3",
            "--pretrain-rounds",
            "3",
            "--num-rounds",
            "3",
        ],
        timeout=1100,
    )
    elapsed = time.time() - started
    print(out.stdout[-1500:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    s = json.loads(summary_path.read_text())
    print(f"example run: {elapsed:.0f} s, {json.dumps({k: s[k] for k in ('original', 'pruned', 'unlearned')})}")
    assert s["ok"] and s["pretrain"]["acc"] >= 0.85
    orig, final = s["original"], s["unlearned"]
    assert orig["u_acc"] > 0.5, "the pretrained model must know digit 3 before it can forget it"
    assert final["u_acc"] <= 0.05, s
    assert final["r_acc"] >= orig["r_acc"] - 0.05, s
    assert s["params_after"] < s["params_before"] and s["rounds"] == 3
    # the user's script passes its objective to weights_result: every site says what it ran, through NVFlare
    assert s["objective"] == {"requested": "ce", "sites": {"site-1": ["ce"], "site-2": ["ce"]}, "not_as_requested": []}
    for line in ("original: U (forgotten)", "unlearned: U (forgotten)", "parameters:"):
        assert line in out.stdout

    # The saved model rebuilds from the user's factory + its plan alone, with coupled residual channels intact.
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLE))
        model, plan, meta = load_checkpoint(s["model_path"], model_name="my_net:build_net")  # the model we expect
    assert meta["model_name"] == "my_net:build_net" and plan.forget_classes == [3]
    assert type(model).__name__ == "DigitResNet"
    assert sum(p.numel() for p in model.parameters()) == s["params_after"]
    assert model.entry.out_channels == model.stage1.conv_out.out_channels
    assert model.widen.out_channels == model.stage2.conv_out.out_channels


@pytest.mark.slow
@pytest.mark.sim
def test_a_users_model_module_ships_to_the_server_and_sites_with_the_plugins_executor(tmp_path, monkeypatch):
    """No train_script: nothing else brings the user's module into the job. The recipe adds it to the job's custom
    code; the simulator's processes (which do not share this process's sys.path) import it from there."""
    from nvflare.recipe.sim_env import SimEnv

    from nvflare_unlearn.fl import PretrainRecipe, quiet_log_config, read_job_result

    code = tmp_path / "code"
    code.mkdir()
    (code / "shipped_user_net.py").write_text((EXAMPLE / "my_net.py").read_text())
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, "shipped_user_net", raising=False)
    ws = tmp_path / "ws"
    job = dict(num_classes=10, num_clients=2, num_rounds=1, local_epochs=2, lr=0.05, dataset="digits")
    recipe = PretrainRecipe(name="shipped", model="shipped_user_net:build_net", **job)
    env = SimEnv(num_clients=2, num_threads=2, workspace_root=str(ws), log_config=quiet_log_config(str(ws)))
    result = read_job_result(recipe.execute(env).get_result())
    assert result.metrics["final"]["acc"] > 0.5
    for site in ("server", "site-1", "site-2"):
        assert list(ws.glob(f"shipped/{site}/simulate_job/app_*/custom/shipped_user_net.py")), site
    model, plan, meta = load_checkpoint(result.model_path, model_name="shipped_user_net:build_net")
    assert meta["model_name"] == "shipped_user_net:build_net" and plan is None
    assert type(model).__name__ == "DigitResNet"
