"""The audit record and upload privacy of real unlearning jobs.

SimEnv (2 sites, small CNN, digits, 1 fine-tuning round): the same request is run twice in fresh workspaces, once
through ``UnlearningRecipe`` and once through the ``nvflare-unlearn unlearn`` CLI (which builds the same recipe):
both must produce the same ``pruning_plan.json`` (resubmission gives the same plan), each writes
``unlearning_record.json``, the CLI copies it to ``--out``, and ``nvflare-unlearn verify-record`` accepts the
copied final model and rejects a tampered copy. Fast unit tests cover the DP options on the executor and the
aggregator's screening of noisy reports.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.recipe.sim_env import SimEnv
from test_fl_faults import trained_checkpoint

from nvflare_unlearn.cli import main as cli_main
from nvflare_unlearn.fl import (
    RECORD_FILE,
    ActivationAggregator,
    UnlearningExecutor,
    UnlearningRecipe,
    quiet_log_config,
    read_job_result,
)
from nvflare_unlearn.fl.defs import META_DP_SIGMA
from nvflare_unlearn.fl.model_state import state_to_numpy
from nvflare_unlearn.method.activations import ClassActivationReport, collect_class_activations
from nvflare_unlearn.method.graph import conv_channels
from nvflare_unlearn.models import build_model
from nvflare_unlearn.protect.audit import plan_sha256, sha256_file
from nvflare_unlearn.protect.privacy import gaussian_sigma, sensitivity

FORGET, RATIO, ROUNDS, SITES = 3, 0.2, 1, 2


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    """The same request run twice, fresh workspaces: recipe run A, CLI run B (``--out`` gets the outputs)."""
    root = tmp_path_factory.mktemp("nvflare_audit")
    ckpt = trained_checkpoint(root / "original.pt")
    before = sha256_file(ckpt)
    recipe = UnlearningRecipe(
        name="unlearn_a",
        model="small_cnn",
        num_classes=10,
        initial_ckpt=ckpt,
        forget_classes=[FORGET],
        prune_ratio=RATIO,
        num_rounds=ROUNDS,
        num_clients=SITES,
        tensorboard=False,
    )
    env = SimEnv(
        num_clients=SITES, num_threads=SITES, workspace_root=str(root / "ws_a"), log_config=quiet_log_config(str(root))
    )
    run_a = read_job_result(recipe.execute(env).get_result())
    out_b = root / "out_b"
    rc = cli_main(
        [
            "unlearn",
            "--ckpt",
            ckpt,
            "--forget-classes",
            str(FORGET),
            "--prune-ratio",
            str(RATIO),
            "--num-rounds",
            str(ROUNDS),
            "--num-clients",
            str(SITES),
            "--out",
            str(out_b),
        ]
    )
    assert rc == 0
    return run_a, out_b, ckpt, before


@pytest.mark.sim
def test_record_holds_request_hashes_sites_plan_metrics_and_versions(twice):
    run, _out, ckpt, before = twice
    assert run.record_path == os.path.join(run.run_dir, RECORD_FILE)
    with open(run.record_path) as f:
        rec = json.load(f)
    m = run.metrics
    assert rec["request"]["forget_classes"] == [FORGET] and rec["request"]["num_classes"] == 10
    params = rec["request"]["parameters"]
    assert params["plan"]["prune_ratio"] == RATIO and params["federation"]["num_rounds"] == ROUNDS
    assert params["scoring"]["aggregation"] == "mean"
    assert params["privacy"]["dp_epsilon"] is None and "dp_sigma" not in params
    assert rec["models"]["original"]["sha256"] == before == sha256_file(ckpt)
    assert rec["models"]["final"]["sha256"] == sha256_file(run.model_path)
    assert rec["plan"]["sha256"] == plan_sha256(open(run.plan_path).read())
    assert rec["plan"]["num_pruned"] == sum(len(v) for v in rec["plan"]["pruned_channels"].values()) > 0
    sites = rec["sites"]["participating"]
    assert sorted(sites) == ["site-1", "site-2"] and rec["sites"]["rejected"] == {}
    assert np.add(*sites.values()).tolist() == m["activation_rounds"][0]["counts"]
    assert rec["metrics"]["before"]["u_acc"] == m["original"]["u_acc"] > 0.5
    assert rec["metrics"]["after"]["u_acc"] == m["unlearned"]["u_acc"] < rec["metrics"]["before"]["u_acc"]
    assert rec["timestamps"]["started_at"] <= rec["timestamps"]["finished_at"]
    assert rec["versions"]["nvflare"] == "2.9.0" and rec["versions"]["torch"]
    assert m["files"]["record"] == RECORD_FILE


@pytest.mark.sim
def test_resubmitted_request_gives_the_same_plan(twice):
    run_a, out_b, _ckpt, _before = twice
    with open(run_a.plan_path) as fa, open(out_b / "pruning_plan.json") as fb:
        assert json.load(fa) == json.load(fb)
    with open(run_a.record_path) as fa, open(out_b / RECORD_FILE) as fb:
        rec_a, rec_b = json.load(fa), json.load(fb)
    assert rec_a["plan"] == rec_b["plan"]


@pytest.mark.sim
def test_cli_verify_record_accepts_the_copy_and_rejects_a_tampered_one(twice, tmp_path, capsys):
    _run, out_b, ckpt, _before = twice
    record, model = str(out_b / RECORD_FILE), str(out_b / "unlearned_model.pt")
    assert cli_main(["verify-record", "--record", record, "--model", model, "--original", ckpt]) == 0
    assert capsys.readouterr().out.startswith("OK")
    tampered = tmp_path / "tampered.pt"
    shutil.copy(model, tampered)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert cli_main(["verify-record", "--record", record, "--model", str(tampered)]) == 1
    assert "final model SHA-256" in capsys.readouterr().out
    assert cli_main(["verify-record", "--record", record, "--model", ckpt]) == 1  # the original is not the result
    assert "ORIGINAL" in capsys.readouterr().out
    assert cli_main(["verify-record", "--record", record, "--model", str(tmp_path / "missing.pt")]) == 2


# ----------------------------------------------------------------------------------------------- DP, no SimEnv
def _ctx(site: str) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    return ctx


def _activation_task(net):
    fl_model = FLModel(params_type=ParamsType.FULL, params=state_to_numpy(net), current_round=0, meta={})
    return FLModelUtils.to_shareable(fl_model)


def test_executor_clips_and_noises_the_upload_with_the_stated_sigma():
    net = build_model("small_cnn", 10).eval()
    bound, eps, delta = 0.05, 2.0, 1e-5
    clean = UnlearningExecutor("small_cnn", 10, site_data={"num_clients": 2}, privacy={"clip_bound": bound})
    noisy = UnlearningExecutor(
        "small_cnn",
        10,
        site_data={"num_clients": 2},
        privacy={"clip_bound": bound, "dp_epsilon": eps, "dp_delta": delta},
    )
    a = from_shareable(clean.execute("class_activations", _activation_task(net), _ctx("site-1"), Signal()))
    b = from_shareable(noisy.execute("class_activations", _activation_task(net), _ctx("site-1"), Signal()))
    counts = a.data["counts"]
    assert a.meta[META_DP_SIGMA] == 0.0
    for s in a.data["sums"].values():  # per-image clipping: no class mean above the bound
        assert np.all(s <= bound * counts[:, None] * (1 + 1e-6))
    want = gaussian_sigma(eps, delta, sensitivity(sum(conv_channels(net).values()), bound))
    assert b.meta[META_DP_SIGMA] == pytest.approx(want) and want > 0
    diff = np.concatenate([(b.data["sums"][n] - a.data["sums"][n]).ravel() for n in a.data["sums"]])
    assert np.abs(diff).max() > 0 and b.data["counts"].tolist() == counts.tolist()  # counts are public
    for s in b.data["sums"].values():  # post-processed into [0, B * count]
        assert np.all(s >= 0) and np.all(s <= bound * counts[:, None] * (1 + 1e-6))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dp_epsilon=1.0, dp_delta=1e-5), "clip_bound"),
        (dict(dp_epsilon=1.0, clip_bound=1.0), "together"),
        (dict(dp_epsilon=-1.0, dp_delta=1e-5, clip_bound=1.0), "dp_epsilon"),
        (dict(dp_epsilon=1.0, dp_delta=1.5, clip_bound=1.0), "dp_delta"),
        (dict(clip_bound=0.0), "clip_bound"),
    ],
)
def test_bad_dp_options_are_refused_before_the_job(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        UnlearningExecutor("small_cnn", 10, **kwargs)
    with pytest.raises(ValueError, match=match):
        UnlearningRecipe(initial_ckpt=str(tmp_path / "x.pt"), forget_classes=[3], check_ckpt=False, **kwargs)


def _report_dict(net, shift: float = 0.0) -> dict:
    import torch

    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 10
    rep = collect_class_activations(net, [(x, y)], 10, clip=1.0)
    return ClassActivationReport(
        sums={n: s + shift for n, s in rep.sums.items()}, counts=rep.counts, layer_order=rep.layer_order
    ).to_dict()


def test_aggregator_screens_noisy_reports_only_when_dp_is_on():
    net = build_model("small_cnn", 10).eval()
    negative = _report_dict(net, shift=-0.5)  # what unclipped Gaussian noise can produce
    garbage = _report_dict(net)
    name = sorted(garbage["sums"])[0]
    garbage["sums"][name] = np.full_like(garbage["sums"][name], math.nan)
    inflated = _report_dict(net)
    inflated["sums"][name] = inflated["sums"][name] * 1000 + 100
    for allow_negative, expect in ((False, ["site-1"]), (True, ["site-1", "site-2"])):
        agg = ActivationAggregator(10, clip_bound=1.0, allow_negative=allow_negative)
        agg.set_expected_layers(conv_channels(net))
        for site, params in (
            ("site-1", _report_dict(net)),
            ("site-2", negative),
            ("site-3", garbage),
            ("site-4", inflated),
        ):
            agg.accept_model(FLModel(params=params, meta={"client_name": site}))
        assert agg.accepted_sites == expect
        assert sorted(agg.rejected) == sorted({"site-2", "site-3", "site-4"} - set(expect))
        assert "NaN" in agg.rejected["site-3"] and "clip" in agg.rejected["site-4"]
        merged = agg.aggregate_model()
        assert merged.meta["site_counts"] == {s: [4] * 10 for s in expect}
