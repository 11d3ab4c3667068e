"""job_templates/ must be exactly what the recipes export today (no hand edits, no drift)."""

from __future__ import annotations

import json
import os

from nvflare_unlearn.cli.templates import TEMPLATE_CKPT, TEMPLATES, export_templates

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
