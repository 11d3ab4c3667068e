"""job_templates/ must be exactly what the recipes export today (no hand edits, no drift)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from nvflare_unlearn.cli.templates import CIFAR_DATA_ROOT, TEMPLATE_CKPT, TEMPLATES, export_templates

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(REPO, "job_templates")


def _tree(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path) as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_committed_templates_match_the_recipes(tmp_path):
    export_templates(str(tmp_path))
    fresh = _tree(str(tmp_path))
    committed = {k: v for k, v in _tree(COMMITTED).items() if k != "README.md"}
    assert sorted(fresh) == sorted(committed), (
        "job_templates/ differs from the recipes: run python -m nvflare_unlearn.cli.templates job_templates"
    )
    drifted = [k for k in fresh if fresh[k] != committed[k]]
    assert not drifted, f"regenerate job_templates/ (python -m nvflare_unlearn.cli.templates job_templates): {drifted}"


def test_unlearning_template_chains_pruning_and_fine_tuning():
    with open(os.path.join(COMMITTED, "unlearn_digits", "app", "config", "config_fed_server.json")) as f:
        server = json.load(f)
    controller = next(w for w in server["workflows"] if w["id"] == "controller")
    assert controller["path"].endswith("UnlearningController")
    assert controller["args"]["forget_classes"] == [3] and controller["args"]["federation"]["num_rounds"] > 0
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["initial_ckpt"] == TEMPLATE_CKPT
    with open(os.path.join(COMMITTED, "unlearn_digits", "app", "config", "config_fed_client.json")) as f:
        client = json.load(f)
    tasks = client["executors"][0]["tasks"]
    assert {"class_activations", "train", "validate"} <= set(tasks)
    assert set(TEMPLATES) == {d for d in os.listdir(COMMITTED) if os.path.isdir(os.path.join(COMMITTED, d))}


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def test_job_folders_name_no_path_of_any_machine():
    """The templates run on any server: no absolute path (the checkpoint is a name resolved in app/custom/)."""
    found = []
    for name, text in _tree(COMMITTED).items():
        if name.endswith(".json"):
            found += [(name, v) for v in _strings(json.loads(text)) if v.startswith(("/", "~")) or ":\\" in v]
    assert not found, f"machine-specific paths in job_templates/: {found}"
    assert not os.path.isabs(TEMPLATE_CKPT)


def test_each_template_carries_the_card_nvflare_reads():
    """info.conf is what NVFlare's template index reads (``get_template_info_config``); info.md is the human card."""
    from nvflare.tool.job.job_cli import get_template_info_config

    for name, template in TEMPLATES.items():
        assert len(name) <= 20, f"list_templates cuts names at 20 characters: {name!r}"
        info = get_template_info_config(os.path.join(COMMITTED, name))
        assert info is not None, f"{name}: no info.conf"
        assert info.get("description") == template.description and len(template.description) <= 60
        assert info.get("controller_type") == "server"
        assert info.get("execution_api_type") == template.execution_api_type
        with open(os.path.join(COMMITTED, name, "info.md")) as f:
            assert template.description in f.read()


def _nvflare_cli() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "nvflare")
    found = beside if os.path.isfile(beside) else shutil.which("nvflare")
    if not found:
        pytest.skip("the nvflare command is not installed beside this Python")
    return found


def test_nvflare_list_templates_prints_each_description(tmp_path):
    """The real ``nvflare job list_templates -d job_templates`` (it writes ~/.nvflare/config.conf: HOME is a tmp)."""
    env = {**os.environ, "HOME": str(tmp_path)}
    run = subprocess.run(
        [_nvflare_cli(), "job", "list_templates", "-d", COMMITTED],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {line.split()[0]: line for line in run.stdout.splitlines() if line.strip() and line.split()[0] in TEMPLATES}
    assert set(rows) == set(TEMPLATES), run.stdout
    for name, template in TEMPLATES.items():
        assert template.description in rows[name], rows[name]
        assert " NA " not in rows[name] + " ", rows[name]


def _config(name: str, side: str) -> dict:
    with open(os.path.join(COMMITTED, name, "app", "config", f"config_fed_{side}.json")) as f:
        return json.load(f)


def test_cifar_template_is_resnet20_with_a_data_root_to_set():
    executor = _config("unlearn_cifar10", "client")["executors"][0]["executor"]["args"]
    assert executor["model_name"] == "resnet20"
    assert executor["site_data"]["dataset"] == "cifar10"
    assert executor["site_data"]["data_root"] == CIFAR_DATA_ROOT and not os.path.exists(CIFAR_DATA_ROOT)
    persistor = next(c for c in _config("unlearn_cifar10", "server")["components"] if c["id"] == "persistor")
    assert persistor["args"]["initial_ckpt"] == TEMPLATE_CKPT


def test_own_model_template_runs_the_users_script_and_model():
    """The user's model by import path and their Client API script, carried in app/custom/ for every machine."""
    executor = _config("unlearn_own_model", "client")["executors"][0]["executor"]
    assert executor["path"].endswith("ClientAPIExecutor")
    assert executor["args"]["task_script_path"] == "train_client.py"
    controller = next(w for w in _config("unlearn_own_model", "server")["workflows"] if w["id"] == "controller")
    assert controller["args"]["model_name"] == "my_net:build_net"
    custom = os.listdir(os.path.join(COMMITTED, "unlearn_own_model", "app", "custom"))
    assert {"my_net.py", "train_client.py"} <= set(custom)
