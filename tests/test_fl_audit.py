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
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
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
from nvflare_unlearn.fl.defs import META_DP_SIGMA, RECORD_PUBLIC_KEY_FILE
from nvflare_unlearn.fl.model_state import state_to_numpy
from nvflare_unlearn.method.activations import ClassActivationReport, collect_class_activations
from nvflare_unlearn.method.graph import conv_channels
from nvflare_unlearn.models import build_model
from nvflare_unlearn.protect.privacy import gaussian_sigma, sensitivity
from nvflare_unlearn.protect.record import plan_sha256, record_digest, sha256_file
from nvflare_unlearn.protect.signing import KEY_DIR_ENV, key_id, load_public_key, signature_problem

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
    assert params["scoring"]["aggregation"] == "median"  # robust by default
    assert params["security"]["update_aggregation"] == "median"
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
    assert rec["request"]["model_name"] == "small_cnn" and rec["plan"]["steps_before"] == 0
    assert rec["models"]["original"]["params"] == m["params_before"] > rec["models"]["final"]["params"]
    assert rec["models"]["final"]["params"] == m["params_after"]
    sig = rec["signature"]
    assert sig["algorithm"] == "ed25519" and sig["key_source"].startswith("user key")
    # signed with the test session's key (outside the run folder); its public key sits beside the record
    key = load_public_key(os.path.join(run.run_dir, RECORD_PUBLIC_KEY_FILE))
    assert sig["key_id"] == key_id(key) and signature_problem(rec, key) is None
    assert os.path.commonpath([run.run_dir, os.environ[KEY_DIR_ENV]]) != run.run_dir
    # every site's own evaluation is in the metrics, none flagged on an honest run
    assert sorted(m["unlearned"]["per_site"]) == ["site-1", "site-2"] and m["unlearned"]["flagged"] == {}


@pytest.mark.sim
def test_resubmitted_request_gives_the_same_plan(twice):
    run_a, out_b, _ckpt, _before = twice
    with open(run_a.plan_path) as fa, open(out_b / "pruning_plan.json") as fb:
        assert json.load(fa) == json.load(fb)
    with open(run_a.record_path) as fa, open(out_b / RECORD_FILE) as fb:
        rec_a, rec_b = json.load(fa), json.load(fb)
    assert rec_a["plan"] == rec_b["plan"]
    # the CLI's output folder holds exactly the files its report lists (the CLI prints the same list)
    listed = json.loads((out_b / "report.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in out_b.iterdir() if p.is_file()), listed


@pytest.mark.sim
def test_cli_verify_record_accepts_the_copy_and_rejects_a_tampered_one(twice, tmp_path, capsys):
    _run, out_b, ckpt, _before = twice
    record, model = str(out_b / RECORD_FILE), str(out_b / "unlearned_model.pt")
    key = str(out_b / RECORD_PUBLIC_KEY_FILE)
    verify = ["verify-record", "--record", record, "--public-key", key]
    assert cli_main([*verify, "--model", model, "--original", ckpt]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK") and "FAIL" not in out and "skip" not in out
    for check in ("signature", "forget classes = plan steps", "prune ratio = units pruned", "parameters before"):
        assert f"ok   {check}" in out
    assert "ok   metrics = job's metrics file" in out  # job_metrics.json beside the record
    tampered = tmp_path / "tampered.pt"
    shutil.copy(model, tampered)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert cli_main([*verify, "--model", str(tampered)]) == 1
    assert "final model SHA-256" in capsys.readouterr().out
    assert cli_main([*verify, "--model", ckpt]) == 1  # the original is not the result
    assert "ORIGINAL" in capsys.readouterr().out
    assert cli_main([*verify, "--model", str(tmp_path / "missing.pt")]) == 2
    assert cli_main(["verify-record", "--record", record, "--model", model]) == 1  # no key: nothing is proven
    assert "no public key given" in capsys.readouterr().out


@pytest.mark.sim
def test_a_forged_copy_of_the_run_folder_does_not_verify(twice, tmp_path, capsys):
    """The run folder copied, its record rewritten to claim another forget class and its digest recomputed."""
    _run, out_b, _ckpt, _before = twice
    forged = tmp_path / "forged"
    shutil.copytree(out_b, forged, ignore=shutil.ignore_patterns("workspace"))
    rec = json.loads((forged / RECORD_FILE).read_text())
    rec["request"]["forget_classes"] = [5]
    rec["content_sha256"] = record_digest(rec)
    (forged / RECORD_FILE).write_text(json.dumps(rec))
    args = ["verify-record", "--record", str(forged / RECORD_FILE), "--model", str(forged / "unlearned_model.pt")]
    assert cli_main([*args, "--public-key", str(out_b / RECORD_PUBLIC_KEY_FILE)]) == 1
    out = capsys.readouterr().out
    assert "ok   record content digest" in out  # the digest was recomputed, so it proves nothing
    assert "FAIL signature: the signature does not match the record" in out
    assert "FAIL forget classes = plan steps" in out


# ----------------------------------------------------------------------------------------------- DP, no SimEnv
def _ctx(site: str) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    return ctx


def _activation_task(net):
    fl_model = FLModel(params_type=ParamsType.FULL, params=state_to_numpy(net), current_round=0, meta={})
    return FLModelUtils.to_shareable(fl_model)


def test_executor_clips_and_noises_the_upload_with_the_stated_sigma(tmp_path):
    net = build_model("small_cnn", 10).eval()
    bound, eps, delta = 0.05, 2.0, 1e-5
    clean = UnlearningExecutor("small_cnn", 10, site_data={"num_clients": 2}, privacy={"clip_bound": bound})
    dp = {"clip_bound": bound, "dp_epsilon": eps, "dp_delta": delta, "dp_ledger": str(tmp_path / "{site_name}.json")}
    noisy = UnlearningExecutor("small_cnn", 10, site_data={"num_clients": 2}, privacy=dp)
    a = from_shareable(clean.execute("class_activations", _activation_task(net), _ctx("site-1"), Signal()))
    b = from_shareable(noisy.execute("class_activations", _activation_task(net), _ctx("site-1"), Signal()))
    counts = a.data["counts"]
    assert a.meta[META_DP_SIGMA] == 0.0
    for s in a.data["sums"].values():  # per-image clipping: no class mean above the bound
        assert np.all(s <= bound * counts[:, None] * (1 + 1e-6))
    want = gaussian_sigma(eps, delta, sensitivity(sum(conv_channels(net).values()), bound))
    assert b.meta[META_DP_SIGMA] == pytest.approx(want) and want > 0
    diff = np.concatenate([(b.data["sums"][n] - a.data["sums"][n]).ravel() for n in a.data["sums"]])
    # swap-within-class unit (default): counts are released exactly
    assert np.abs(diff).max() > 0 and b.data["counts"].tolist() == counts.tolist()
    for s in b.data["sums"].values():  # post-processed into [0, B * count]
        assert np.all(s >= 0) and np.all(s <= bound * counts[:, None] * (1 + 1e-6))
    ledger = json.loads((tmp_path / "site-1.json").read_text())
    assert [(e["epsilon"], e["delta"]) for e in ledger["entries"]] == [(eps, delta)]


def test_the_site_ledger_refuses_a_second_request_beyond_its_budget(tmp_path):
    """A server that asks again (to average the noise away) gets no second release once the budget is spent."""
    net = build_model("small_cnn", 10).eval()
    dp = {"clip_bound": 0.05, "dp_epsilon": 2.0, "dp_delta": 1e-5, "dp_ledger": str(tmp_path / "ledger.json")}
    site = UnlearningExecutor("small_cnn", 10, site_data={"num_clients": 2}, privacy=dp)
    first = site.execute("class_activations", _activation_task(net), _ctx("site-1"), Signal())
    assert first.get_return_code() == ReturnCode.OK
    again = site.execute("class_activations", _activation_task(net), _ctx("site-1"), Signal())
    assert again.get_return_code() == ReturnCode.BAD_TASK_DATA  # refused: nothing released
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert len(ledger["entries"]) == 1 and ledger["budget"] == {"epsilon": 2.0, "delta": 1e-5}
    # a later job cannot raise the budget the ledger holds; the site admin's budget of two requests can
    raised = UnlearningExecutor("small_cnn", 10, privacy={**dp, "dp_budget_epsilon": 100.0, "dp_budget_delta": 0.1})
    assert raised.execute("class_activations", _activation_task(net), _ctx("site-1"), Signal()).get_return_code() == (
        ReturnCode.BAD_TASK_DATA
    )
    two = {**dp, "dp_ledger": str(tmp_path / "two.json"), "dp_budget_epsilon": 4.0, "dp_budget_delta": 2e-5}
    site2 = UnlearningExecutor("small_cnn", 10, privacy=two)
    codes = [site2.execute("class_activations", _activation_task(net), _ctx("site-2"), Signal()).get_return_code()]
    codes += [site2.execute("class_activations", _activation_task(net), _ctx("site-2"), Signal()).get_return_code()]
    codes += [site2.execute("class_activations", _activation_task(net), _ctx("site-2"), Signal()).get_return_code()]
    assert codes == [ReturnCode.OK, ReturnCode.OK, ReturnCode.BAD_TASK_DATA]


def test_add_remove_unit_noises_the_counts_too(tmp_path):
    net = build_model("small_cnn", 10).eval()
    bound, eps, delta = 0.05, 2.0, 1e-5
    dp = {"clip_bound": bound, "dp_epsilon": eps, "dp_delta": delta, "dp_unit": "add_remove_image"}
    site = UnlearningExecutor("small_cnn", 10, privacy={**dp, "dp_ledger": str(tmp_path / "l.json")})
    clean = UnlearningExecutor("small_cnn", 10, privacy={"clip_bound": bound})
    a = from_shareable(clean.execute("class_activations", _activation_task(net), _ctx("site-1"), Signal()))
    b = from_shareable(site.execute("class_activations", _activation_task(net), _ctx("site-1"), Signal()))
    assert b.data["counts"].tolist() != a.data["counts"].tolist() and np.all(b.data["counts"] >= 0)
    channels = sum(conv_channels(net).values())
    assert b.meta[META_DP_SIGMA] == pytest.approx(gaussian_sigma(eps, delta, sensitivity(channels, bound, True)))


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


def test_aggregator_bounds_sums_in_both_modes():
    """Without DP sums must lie in [0, B*count]; with allow_negative in [-B*count, B*count]: never unbounded."""
    net = build_model("small_cnn", 10).eval()
    negative = _report_dict(net, shift=-0.5)  # what unclipped Gaussian noise can produce
    garbage = _report_dict(net)
    name = sorted(garbage["sums"])[0]
    garbage["sums"][name] = np.full_like(garbage["sums"][name], math.nan)
    inflated = _report_dict(net)
    inflated["sums"][name] = inflated["sums"][name] * 1000 + 100
    huge_negative = _report_dict(net)
    huge_negative["sums"][name] = huge_negative["sums"][name] - 1e12
    for allow_negative, expect in ((False, ["site-1"]), (True, ["site-1", "site-2"])):
        agg = ActivationAggregator(10, clip_bound=1.0, allow_negative=allow_negative)
        agg.set_expected_layers(conv_channels(net))
        for site, params in (
            ("site-1", _report_dict(net)),
            ("site-2", negative),
            ("site-3", garbage),
            ("site-4", inflated),
            ("site-5", huge_negative),
        ):
            agg.accept_model(FLModel(params=params, meta={"client_name": site}))
        assert agg.accepted_sites == expect
        assert sorted(agg.rejected) == sorted({"site-2", "site-3", "site-4", "site-5"} - set(expect))
        assert "NaN" in agg.rejected["site-3"] and "clip" in agg.rejected["site-4"]
        assert "clip" in agg.rejected["site-5"] or "non-negative" in agg.rejected["site-5"]
        merged = agg.aggregate_model()
        assert merged.meta["site_counts"] == {s: [4] * 10 for s in expect}
    with pytest.raises(ValueError, match="needs clip_bound"):
        ActivationAggregator(10, allow_negative=True)


def test_aggregator_caps_a_site_that_inflates_its_counts():
    """Counts x 10^6 with the same class means: the site's weight is capped (declared size or median-based cap)."""
    net = build_model("small_cnn", 10).eval()
    honest = [_report_dict(net) for _ in range(3)]
    liar = _report_dict(net)
    liar = {**liar, "counts": liar["counts"] * 10**6, "sums": {n: s * 10**6 for n, s in liar["sums"].items()}}
    for sizes, cap in ((None, 2 * 40), ({"site-4": 40}, 40)):
        agg = ActivationAggregator(10, aggregation="mean", site_sizes=sizes)
        agg.set_expected_layers(conv_channels(net))
        for i, params in enumerate([*honest, liar]):
            assert agg.accept_model(FLModel(params=params, meta={"client_name": f"site-{i + 1}"}))
        merged = agg.aggregate_model()
        assert sum(merged.meta["counts"]) <= 3 * 40 + cap + 10  # (+ at most 1 per class from rounding)
        assert list(merged.meta["capped"]) == ["site-4"] and "weight capped" in merged.meta["capped"]["site-4"]
        assert merged.meta["site_counts"]["site-4"][0] == 4 * 10**6  # the record keeps what the site claimed
