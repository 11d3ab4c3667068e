"""Deployment runtime, fast parts: per-phase quorum and timeouts, NVFlare 2.9's checkpoint rule (relative = carried
in the server app, absolute = a server path), the one privacy code path of the executor and of a user's Client API
script, the progress line, and a job status that is not FINISHED:COMPLETED read as a failure."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from torch.utils.data import DataLoader

from nvflare_unlearn.cli.commands import progress_line
from nvflare_unlearn.data import digits_dataset
from nvflare_unlearn.fl import UnlearningRecipe
from nvflare_unlearn.fl import client_api as ua
from nvflare_unlearn.fl.defs import META_FORGET, META_PRIVACY, META_PRIVACY_APPLIED
from nvflare_unlearn.fl.persistor import server_path
from nvflare_unlearn.fl.run import COMPLETED
from nvflare_unlearn.method.checkpoint import save_checkpoint
from nvflare_unlearn.models import build_model
from nvflare_unlearn.options import FederationOptions, PrivacyOptions


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "trained.pt"
    save_checkpoint(str(path), build_model("small_cnn", 10, in_channels=1), None, "small_cnn", 10)
    return path


def _server(job_dir, name):
    app = "app_server" if os.path.isdir(os.path.join(job_dir, name, "app_server")) else "app"
    with open(os.path.join(job_dir, name, app, "config", "config_fed_server.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ quorum and timeouts
def test_default_quorum_survives_one_dead_site_and_phases_override_it():
    fed = FederationOptions()
    assert fed.for_phase("train", 4) == (3, 3600) and fed.for_phase("activation", 1) == (1, 3600)
    fed = FederationOptions(min_clients=2, activation_min_clients=4, train_timeout=60, validate_timeout=0)
    assert fed.for_phase("activation", 4) == (4, 3600)
    assert fed.for_phase("train", 4) == (2, 60) and fed.for_phase("validate", 4) == (2, 0)
    assert fed.quorums(4) == {"activation": 4, "train": 2, "validate": 2}
    with pytest.raises(ValueError, match="train_min_clients"):
        FederationOptions(train_min_clients=0)
    with pytest.raises(ValueError, match="activation_timeout"):
        FederationOptions(activation_timeout=-1)
    with pytest.raises(ValueError, match="phase"):
        fed.for_phase("finetune", 3)


def test_recipe_writes_the_quorum_and_nvflare_keeps_the_job_while_that_many_sites_live(tmp_path, ckpt):
    recipe = UnlearningRecipe(name="q", initial_ckpt=str(ckpt), forget_classes=[3], in_channels=1, num_clients=4)
    assert recipe.min_clients == 3
    recipe.export(str(tmp_path))
    with open(tmp_path / "q" / "meta.json") as f:
        assert json.load(f)["min_clients"] == 3  # NVFlare aborts a job only when fewer sites than this are alive
    controller = _server(tmp_path, "q")["workflows"][0]["args"]
    assert controller["federation"]["min_clients"] == 3
    per_phase = UnlearningRecipe(
        name="p", initial_ckpt=str(ckpt), forget_classes=[3], in_channels=1, num_clients=4, train_min_clients=1
    )
    assert per_phase.min_clients == 1
    with pytest.raises(ValueError, match="at most the number of sites"):
        UnlearningRecipe(name="x", initial_ckpt=str(ckpt), forget_classes=[3], num_clients=2, activation_min_clients=3)


def test_cli_flags_are_generated_for_the_per_phase_options(capsys):
    from nvflare_unlearn.cli import main

    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = capsys.readouterr().out
    for flag in ("--activation-min-clients", "--train-timeout", "--validate-timeout", "--resume-from", "--env"):
        assert flag in text
    assert "prod" in text and "--startup-kit" in text


# ------------------------------------------------------------------------------------------ checkpoints
def test_relative_checkpoint_travels_in_the_server_app_and_absolute_is_a_server_path(tmp_path, ckpt, monkeypatch):
    monkeypatch.chdir(ckpt.parent)
    rel = UnlearningRecipe(name="rel", initial_ckpt="trained.pt", forget_classes=[3], in_channels=1)
    rel.export(str(tmp_path / "jobs"))
    job = tmp_path / "jobs" / "rel"
    persistor = next(c for c in _server(job.parent, "rel")["components"] if c["id"] == "persistor")
    assert persistor["args"]["initial_ckpt"] == "trained.pt"
    carried = list(job.rglob("custom/trained.pt"))
    assert len(carried) == 1 and carried[0].read_bytes() == ckpt.read_bytes()

    server_only = "/srv/models/not_here.pt"
    ab = UnlearningRecipe(name="abs", initial_ckpt=server_only, check_ckpt=False, forget_classes=[3], in_channels=1)
    ab.export(str(tmp_path / "jobs"))
    persistor = next(c for c in _server(tmp_path / "jobs", "abs")["components"] if c["id"] == "persistor")
    assert persistor["args"]["initial_ckpt"] == server_only
    assert not list((tmp_path / "jobs" / "abs").rglob("custom"))
    with pytest.raises(ValueError, match="does not exist"):
        UnlearningRecipe(name="abs2", initial_ckpt=server_only, forget_classes=[3])  # checked unless told not to
    with pytest.raises(ValueError, match="relative path names a file on this machine"):
        UnlearningRecipe(name="rel2", initial_ckpt="missing.pt", forget_classes=[3])


def test_the_persistor_resolves_a_relative_checkpoint_in_the_app_custom_folder():
    ctx = FLContext()
    ctx.set_prop(FLContextKey.APP_ROOT, "/ws/job/app_server", private=True, sticky=False)
    assert server_path("model.pt", ctx) == "/ws/job/app_server/custom/model.pt"
    assert server_path("/models/m.pt", ctx) == "/models/m.pt"


# ------------------------------------------------------------------------------------------ privacy at the sites
def test_a_site_applies_the_stricter_of_its_own_and_the_jobs_privacy():
    eff = ua.effective_privacy(
        {"min_count": 5, "clip_bound": 3.0}, {"min_count": 2, "clip_bound": 1.0, "dp_epsilon": 4.0, "dp_delta": 1e-5}
    )
    assert eff == PrivacyOptions(min_count=5, clip_bound=1.0, dp_epsilon=4.0, dp_delta=1e-5)
    assert ua.effective_privacy(None, None) == PrivacyOptions()


def _activation_inputs():
    model = build_model("small_cnn", 10, in_channels=1).eval()
    data = digits_dataset("train").subset(np.arange(300))
    return model, data


def test_client_api_helper_applies_the_same_privacy_as_the_executor(tmp_path):
    """min-count, clipping and noise from the task's meta: the user's script and the executor share one code path;
    what each applied travels back to the server."""
    from nvflare.apis.dxo import from_shareable
    from nvflare.apis.signal import Signal
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    from nvflare_unlearn.fl import UnlearningExecutor
    from nvflare_unlearn.fl.model_state import state_to_numpy

    model, data = _activation_inputs()
    counts = np.bincount(np.asarray(data.targets), minlength=10)
    min_count = int(np.sort(counts)[3]) + 1  # drops at least three classes
    meta = {META_PRIVACY: {"min_count": min_count, "clip_bound": 0.5}, META_FORGET: [3]}
    fl_model = FLModel(params_type=ParamsType.FULL, params=state_to_numpy(model), meta=meta)
    torch.manual_seed(0)
    via_script = ua.activation_result(model, DataLoader(data, batch_size=32), 10, fl_model)
    applied = via_script.meta[META_PRIVACY_APPLIED]
    assert applied["min_count"] == min_count and applied["clip_bound"] == 0.5 and applied["dp_sigma"] == 0.0
    counts_sent = np.asarray(via_script.params["counts"])
    assert np.all(counts_sent[counts < min_count] == 0) and np.all(counts_sent[counts >= min_count] > 0)

    executor = UnlearningExecutor("small_cnn", 10, in_channels=1, site_data={"num_clients": 1})
    executor._train_data = data
    executor._site_name, executor._device = "site-1", torch.device("cpu")
    shareable = FLModelUtils.to_shareable(fl_model)
    shareable.set_header("task_name", ua.TASK_ACTIVATIONS)
    ctx = FLContext()
    reply = executor.execute(ua.TASK_ACTIVATIONS, shareable, ctx, Signal())
    dxo = from_shareable(reply)
    assert dxo.meta[META_PRIVACY_APPLIED] == applied
    np.testing.assert_array_equal(np.asarray(dxo.data["counts"]), counts_sent)
    for layer, sums in via_script.params["sums"].items():
        np.testing.assert_allclose(np.asarray(dxo.data["sums"][layer]), np.asarray(sums), rtol=1e-6)

    noisy_meta = {META_PRIVACY: {"clip_bound": 0.5, "dp_epsilon": 2.0, "dp_delta": 1e-5}, META_FORGET: [3, 8]}
    noisy_task = FLModel(params_type=ParamsType.FULL, params={}, meta=noisy_meta)
    with pytest.raises(ValueError, match="privacy ledger"):  # DP without the site's ledger: nothing leaves
        ua.activation_result(model, DataLoader(data, batch_size=32), 10, noisy_task)
    ledger = tmp_path / "ledger.json"
    noisy = ua.activation_result(model, DataLoader(data, batch_size=32), 10, noisy_task, ledger_path=str(ledger))
    got = noisy.meta[META_PRIVACY_APPLIED]
    assert got["dp_epsilon"] == 2.0 and got["passes"] == 2 and got["dp_sigma"] > 0 and "dp_ledger" not in got
    spent = json.loads(ledger.read_text())["entries"]
    assert len(spent) == 1 and spent[0]["epsilon"] == pytest.approx(1.0)  # one pass of two: half the epsilon


# ------------------------------------------------------------------------------------------ what an operator sees
def test_progress_line_gives_phase_round_accuracy_and_an_estimate():
    now = 1000.0
    p = {
        "phase": "finetune",
        "round": 3,
        "num_rounds": 5,
        "rounds_done": 2,
        "evaluated": "finetune round 2",
        "u_acc": 0.0,
        "r_acc": 0.9512,
        "phase_started": now - 40,
        "updated": now,
    }
    line = progress_line(p, started=0.0)
    assert "phase finetune" in line and "round 3/5" in line and "U 0.0% R 95.1%" in line
    assert "about 60 s left" in line  # 2 rounds took 40 s, 3 to go


def test_a_job_nvflare_did_not_complete_is_a_failure(tmp_path, monkeypatch):
    """POC / production: a record that says completed is not enough when NVFlare finished the job otherwise."""
    from nvflare_unlearn.fl import run as runner

    run_dir = tmp_path / "dl" / "workspace"
    run_dir.mkdir(parents=True)
    (run_dir / "unlearning_metrics.json").write_text(json.dumps({"status": "completed", "job_kind": "pretrain"}))
    (run_dir / "global_model.pt").write_bytes(b"x")

    class Sess:
        def __init__(self, status):
            self.status = status

        def get_job_meta(self, job_id):
            return {"status": self.status}

        def download_job_result(self, job_id, destination=None):
            return str(tmp_path / "dl")

        def close(self):
            pass

    recipe = SimpleNamespace(run=lambda env: SimpleNamespace(get_job_id=lambda: "j1"), name="x")
    for status, ok in ((COMPLETED, True), ("FINISHED:ABNORMAL", False), ("FINISHED:EXECUTION_EXCEPTION", False)):
        monkeypatch.setattr(runner, "_admin_session", lambda env, s=status: Sess(s))
        if ok:
            assert runner.run_job(recipe, object(), str(tmp_path / "d"), poll_s=0).status == COMPLETED
        else:
            with pytest.raises(RuntimeError, match=status):
                runner.run_job(recipe, object(), str(tmp_path / "d"), poll_s=0)


def test_per_site_config_overrides_the_recipes_values_for_that_site_only(tmp_path, ckpt):
    recipe = UnlearningRecipe(
        name="ps", initial_ckpt=str(ckpt), forget_classes=[3], in_channels=1, lr=0.05, min_count=3
    )
    recipe.set_per_site_config({"site-1": {"min_count": 100}, "site-2": {"lr": 0.02}})
    recipe.export(str(tmp_path))
    args = {}
    for site in ("site-1", "site-2"):
        with open(tmp_path / "ps" / f"app_{site}" / "config" / "config_fed_client.json") as f:
            args[site] = json.load(f)["executors"][0]["executor"]["args"]
    assert args["site-1"]["privacy"]["min_count"] == 100 and args["site-1"]["training"]["lr"] == 0.05
    assert args["site-2"]["privacy"]["min_count"] == 3 and args["site-2"]["training"]["lr"] == 0.02
    with pytest.raises(ValueError, match="min_count"):
        UnlearningRecipe(name="bad", initial_ckpt=str(ckpt), forget_classes=[3]).set_per_site_config(
            {"site-1": {"min_count": -1}}
        )
    with pytest.raises(ValueError, match="unknown option"):
        UnlearningRecipe(name="bad2", initial_ckpt=str(ckpt), forget_classes=[3]).set_per_site_config(
            {"site-1": {"num_rounds": 4}}
        )


def test_report_and_failure_message_say_which_sites_each_phase_used():
    from nvflare_unlearn.cli.report import build_report
    from nvflare_unlearn.fl.results import dropped_sites

    metrics = {
        "activation_rounds": [{"forget_class": 3, "sites": ["site-1", "site-2"], "no_result": ["site-3"]}],
        "per_round": [{"round": 1, "trained_sites": ["site-1", "site-2"], "no_result": ["site-3"]}],
    }
    report = build_report(metrics)
    assert report["sites_per_phase"] == [
        {"phase": "activation class 3", "used": ["site-1", "site-2"], "no_result": ["site-3"]},
        {"phase": "round 1", "used": ["site-1", "site-2"], "no_result": ["site-3"]},
    ]
    text = dropped_sites(metrics)
    assert "['site-3'] gave no result from activation class 3 on" in text and "round 1: site-1, site-2" in text
    assert dropped_sites({"per_round": [{"round": 1, "trained_sites": ["a"], "no_result": []}]}) == ""
