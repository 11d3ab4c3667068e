"""Code delivery both ways: the installed package referenced by import path (allow-listed), and the whole package
carried in the job (``bundle_code=True``), importable from ``app/custom`` where nvflare_unlearn is not installed.
The wheel route (``python -m build``, a fresh virtual environment, the demo from it) is the slow test at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from nvflare_unlearn.fl import PretrainRecipe, UnlearningRecipe
from nvflare_unlearn.method.checkpoint import save_checkpoint
from nvflare_unlearn.models import build_model

REPO = Path(__file__).resolve().parents[1]

#: run in a fresh interpreter: hide every way this checkout or the editable install could be imported, check that
#: nvflare_unlearn is NOT importable, then put app/custom on the path as NVFlare does and build every component of
#: the exported job from its config (path + args), then import every module of the carried package.
IMPORT_FROM_CUSTOM = textwrap.dedent(
    """
    import importlib, importlib.util, json, os, pkgutil, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != os.path.abspath(os.environ["REPO"])]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("nvflare_unlearn") is None, "nvflare_unlearn importable without the bundle"
    job = sys.argv[1]
    built = []
    for app in sorted(os.listdir(job)):
        cfg_dir = os.path.join(job, app, "config")
        if not os.path.isdir(cfg_dir):
            continue
        sys.path.insert(0, os.path.join(job, app, "custom"))
        for name in sorted(os.listdir(cfg_dir)):
            cfg = json.load(open(os.path.join(cfg_dir, name)))
            comps = list(cfg.get("components", [])) + list(cfg.get("workflows", []))
            comps += [e["executor"] for e in cfg.get("executors", [])]
            for c in comps:
                module, cls = c["path"].rsplit(".", 1)
                obj = getattr(importlib.import_module(module), cls)(**c.get("args", {}))
                built.append(c["path"])
    import nvflare_unlearn
    where = os.path.dirname(nvflare_unlearn.__file__)
    assert "/custom/nvflare_unlearn" in where, where
    modules = [m.name for m in pkgutil.walk_packages([where], "nvflare_unlearn.")]
    for m in modules:
        importlib.import_module(m)
    from nvflare_unlearn.models import build_model
    build_model("small_cnn", 10, in_channels=1)
    print(json.dumps({"built": built, "modules": modules, "where": where}))
    """
)


def _fresh_import(job_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["REPO"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_FROM_CUSTOM, str(job_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _package_files() -> set[str]:
    root = REPO / "nvflare_unlearn"
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith((".pyc", ".pyo"))
    }


def test_bundled_job_carries_the_whole_package_and_imports_where_it_is_not_installed(tmp_path):
    ckpt = tmp_path / "model.pt"
    save_checkpoint(str(ckpt), build_model("small_cnn", 10, in_channels=1), None, "small_cnn", 10)
    recipe = UnlearningRecipe(
        name="bundled",
        initial_ckpt=str(ckpt),
        forget_classes=[3],
        in_channels=1,
        bundle_code=True,
    )
    recipe.export(str(tmp_path / "jobs"))
    job = tmp_path / "jobs" / "bundled"
    for app in ("app",):
        custom = job / app / "custom" / "nvflare_unlearn"
        carried = {str(p.relative_to(custom)) for p in custom.rglob("*") if p.is_file()}
        assert carried == _package_files(), sorted(carried ^ _package_files())
        assert not any("__pycache__" in p for p in carried)
    got = _fresh_import(job)
    assert {
        "nvflare_unlearn.fl.unlearning_controller.UnlearningController",
        "nvflare_unlearn.fl.persistor.UnlearningModelPersistor",
        "nvflare_unlearn.fl.aggregator.ActivationAggregator",
        "nvflare_unlearn.fl.executor.UnlearningExecutor",
    } <= set(got["built"])
    assert "nvflare_unlearn.cli.commands" in got["modules"] and "nvflare_unlearn.method.prune" in got["modules"]


def test_the_import_check_fails_for_a_job_without_the_bundle(tmp_path):
    """The fresh-interpreter check is real: a job that only references the package cannot build its components."""
    PretrainRecipe(name="plain", in_channels=1).export(str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["REPO"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_FROM_CUSTOM, str(tmp_path / "plain")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env=env,
    )
    assert proc.returncode != 0 and "No module named 'nvflare_unlearn'" in proc.stderr


def test_installed_route_references_the_package_and_needs_the_allow_list(tmp_path):
    """Without bundling, no plugin code travels: the job names components by import path, which each site's
    class_allow_list must allow (docs/nvflare.md)."""
    PretrainRecipe(name="plain", in_channels=1).export(str(tmp_path))
    job = tmp_path / "plain"
    assert not list(job.rglob("custom")), "the installed route must not carry code"
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    assert client["executors"][0]["executor"]["path"].startswith("nvflare_unlearn.fl.")


# ------------------------------------------------------------------------------------------------ the wheel
DEMO_CHECK = "import nvflare_unlearn, sys; print(nvflare_unlearn.__file__)"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_wheel_installs_into_a_fresh_venv_and_the_demo_runs_from_it(tmp_path):
    """python -m build -> a fresh venv that sees torch/nvflare but not this checkout -> pip install the wheel ->
    nvflare-unlearn demo runs from site-packages, package data included."""
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = dist.glob("nvflare_unlearn-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    missing = {f"nvflare_unlearn/{f}" for f in _package_files()} - names
    assert not missing, f"the wheel lacks package files: {sorted(missing)}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # The heavy dependencies (torch 5.5 GB) come from this interpreter's site-packages through a plain .pth line:
    # .pth files found there are NOT executed, so the editable finder of this checkout stays off.
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_host_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    before = subprocess.run([str(py), "-c", DEMO_CHECK], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert before.returncode != 0, "nvflare_unlearn must not be importable in the fresh venv before the install"
    inst = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-index", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
    check = subprocess.run(
        [str(py), "-m", "pip", "check"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert "nvflare-unlearn" not in check.stdout, check.stdout  # its dependencies are all satisfied
    where = subprocess.run([str(py), "-c", DEMO_CHECK], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0 and where.stdout.strip().startswith(purelib), where.stdout + where.stderr
    demo = subprocess.run(
        [str(venv / "bin" / "nvflare-unlearn"), "demo", "--out", str(tmp_path / "demo"), "--pretrain-rounds", "2"],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=tmp_path,
        env=env,
    )
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["unlearned"]["u_acc"] is not None and report["params_after"] < report["params_before"]
    # the simulator's server and sites ran the installed copy, not this checkout
    logs = list((tmp_path / "demo" / "workspace").rglob("log.txt"))
    assert logs and not any(str(REPO / "nvflare_unlearn") in p.read_text(errors="replace") for p in logs)
