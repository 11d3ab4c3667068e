"""The unlearning methods of the job API (unlearning.objective): each objective does what its name says, and the
NVFlare job runs a non-pruning method end to end with the teacher and the sites' forget data, then verifies."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from core_helpers import digits_tensors, trained_digits_cnn
from torch.utils.data import DataLoader, TensorDataset

from nvflare_unlearn import save_checkpoint
from nvflare_unlearn.evaluation import train_epochs
from nvflare_unlearn.unlearning import MethodOptions
from nvflare_unlearn.unlearning.objective import UnlearningObjective

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FORGET = [3]


@pytest.fixture
def trained_ckpt(tmp_path) -> str:
    """The trained digits CNN saved as the checkpoint a job unlearns from."""
    ckpt = tmp_path / "trained.pt"
    save_checkpoint(ckpt, trained_digits_cnn(), None, "small_cnn", 10)
    return str(ckpt)


def _split():
    xtr, ytr, _, _ = digits_tensors()
    f = ytr == FORGET[0]
    return (xtr[~f], ytr[~f]), (xtr[f], ytr[f])


def _forget_loss(model, xf, yf) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(xf), yf))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="gradient_ascent"), "method must be one of"),
        (dict(recovery="mse"), "recovery must be one of"),
        (dict(kd_temperature=0), "kd_temperature"),
        (dict(forget_weight=-1), "forget_weight"),
        (dict(verify="yes"), "verify must be true or false"),
    ],
)
def test_method_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MethodOptions(**kwargs)


def test_objectives_refuse_what_they_lack():
    model = trained_digits_cnn()
    with pytest.raises(ValueError, match="needs the teacher"):
        UnlearningObjective({"recovery": "kd"}, FORGET, 10)
    with pytest.raises(ValueError, match="forget-class data"):
        UnlearningObjective({"method": "neggrad"}, FORGET, 10, teacher=model)


def test_kd_term_vanishes_when_the_student_is_the_teacher():
    model = trained_digits_cnn()
    (xr, yr), _ = _split()
    kd = UnlearningObjective({"method": "finetune", "recovery": "kd"}, FORGET, 10, teacher=copy.deepcopy(model))
    ce = torch.nn.functional.cross_entropy(model(xr[:64]), yr[:64])
    assert float(kd.batch_loss(model, xr[:64], yr[:64])) == pytest.approx(float(ce), rel=1e-3)


@pytest.mark.parametrize("method", ["neggrad", "random_label", "scrub"])
def test_forget_terms_raise_the_forget_loss_and_keep_the_rest(method):
    model = trained_digits_cnn()
    (xr, yr), (xf, yf) = _split()
    before = _forget_loss(model, xf, yf)
    loader = DataLoader(TensorDataset(xf, yf), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    obj = UnlearningObjective({"method": method, "recovery": "kd"}, FORGET, 10, teacher=copy.deepcopy(model),
                              forget_loader=loader)  # fmt: skip
    retained = DataLoader(
        TensorDataset(xr, yr), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    train_epochs(model, retained, 2, lr=0.01, loss_fn=obj.batch_loss)
    model.eval()
    with torch.no_grad():
        acc_r = float((model(xr).argmax(1) == yr).float().mean())
        pred_f = model(xf).argmax(1)
    assert _forget_loss(model, xf, yf) > before + 1.0, method
    assert float((pred_f == yf).float().mean()) < 0.2 and acc_r > 0.95


@pytest.mark.sim
def test_the_default_method_runs_as_a_job_and_verifies(tmp_path, trained_ckpt):
    """The default (NegGrad+ with distillation) through NVFlare: the sites use their forget data and the teacher the
    task carries, and say so; the job ends with the forgetting check, recorded in the metrics and the audit record."""
    from nvflare.recipe.sim_env import SimEnv

    from nvflare_unlearn.fl import UnlearningRecipe, quiet_log_config, read_job_result

    recipe = UnlearningRecipe(
        name="neggrad_kd", model="small_cnn", num_classes=10, in_channels=1, initial_ckpt=trained_ckpt,
        forget_classes=FORGET, num_rounds=1, num_clients=2, tensorboard=False,
    )  # fmt: skip
    assert (recipe.defaults_applied["method"], recipe.defaults_applied["recovery"]) == ("neggrad", "kd")
    env = SimEnv(num_clients=2, num_threads=2, workspace_root=str(tmp_path / "ws"),
                 log_config=quiet_log_config(str(tmp_path / "ws")))  # fmt: skip
    result = read_job_result(recipe.execute(env).get_result())
    m = result.metrics
    assert m["options"]["unlearning"]["method"] == "neggrad" and "activation_rounds" not in m
    assert m["original"]["u_acc"] > 0.9 and m["unlearned"]["u_acc"] < 0.1 and m["unlearned"]["r_acc"] > 0.9
    assert m["params_after"] == m["params_before"]  # nothing pruned
    for key in ("verification_original", "verification"):
        check = m[key]
        assert check["status"] == "ok" and check["sites"] == ["site-1", "site-2"]
        assert 0 <= check["membership"]["auc"] <= 1 and 0 <= check["probe"]["auc"] <= 1
    assert m["verification"]["verdict"].startswith("forgotten at the feature level:")
    record = json.loads(open(result.record_path).read())
    assert record["verification"]["verdict"] == m["verification"]["verdict"]
    assert record["sites"]["trained"] == ["site-1", "site-2"] and record["plan"]["num_pruned"] == 0
    hist = np.asarray(record["verification"]["membership"]["n_positive"])
    assert hist > 0
    # every site ran the requested loss, with its forget term, and the signed record says so
    ran = {"requested": "neggrad+kd", "sites": {"site-1": ["neggrad+kd"], "site-2": ["neggrad+kd"]}}
    assert m["objective"] == {**ran, "not_as_requested": []}
    assert record["request"]["parameters"]["objective_applied"] == m["objective"]
    assert m["per_round"][0]["objective_applied"] == {"site-1": "neggrad+kd", "site-2": "neggrad+kd"}


@pytest.mark.parametrize("method", ["finetune", "neggrad"])
def test_a_training_method_without_rounds_is_refused(trained_ckpt, method):
    """Only pruning changes the model before fine-tuning: any other method with num_rounds=0 would return the
    original unchanged under an "unlearned" name."""
    from nvflare_unlearn.fl import UnlearningRecipe

    with pytest.raises(ValueError, match="num_rounds=0 would leave the model unchanged"):
        UnlearningRecipe(model="small_cnn", num_classes=10, in_channels=1, initial_ckpt=trained_ckpt,
                         forget_classes=FORGET, method=method, num_rounds=0, num_clients=2)  # fmt: skip


@pytest.mark.parametrize(
    "forget, given, method, recovery, ratio",
    [
        ([3], {}, "neggrad", "kd", 0.05),  # one class: U 0 % on cat and truck at the least cost in R
        ([0, 5, 9], {}, "neggrad", "kd", 0.05),  # several: NegGrad+ with distillation kept R
        ([3], {"method": "prune"}, "prune", "ce", 0.05),  # the paper's method, one flag away
        ([0, 5, 9], {"method": "prune"}, "prune", "ce", 0.05),
        ([0, 5, 9], {"recovery": "ce"}, "neggrad", "ce", 0.05),
        ([3], {"prune_ratio": 0.2}, "prune", "ce", 0.2),  # a pruning option asks for pruning
        ([0, 5, 9], {"plan": {"scope": "per_layer"}}, "prune", "ce", 0.05),
        ([0, 5, 9], {"ratio": 0.2}, "prune", "ce", 0.2),  # deprecated name of prune_ratio
        ([0, 5, 9], {"unlearning": {"method": "scrub"}}, "scrub", "ce", 0.05),
    ],
)
def test_the_default_method_is_the_measured_best(tmp_path, trained_ckpt, forget, given, method, recovery, ratio):
    """Issue 13: defaults from the evidence (unlearning.defaults.measured_defaults), written into the exported job as
    concrete values, so the sites, the record and the auditor see the method that ran, not a rule."""
    from nvflare_unlearn.cli.commands import method_summary
    from nvflare_unlearn.fl import UnlearningRecipe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        recipe = UnlearningRecipe(model="small_cnn", num_classes=10, in_channels=1, initial_ckpt=trained_ckpt,
                                  forget_classes=forget, num_clients=2, tensorboard=False, **given)  # fmt: skip
    u = recipe.options["unlearning"]
    assert (u.method, u.recovery, recipe.prune_ratio) == (method, recovery, ratio)
    assert ("method" in recipe.defaults_applied) == ("method" not in given and "unlearning" not in given)
    summary = method_summary(recipe)
    chose = "method" in recipe.defaults_applied
    assert summary.startswith(f"method: {method}")
    assert ("(the default: U 0 % on every CIFAR-10 forget set" in summary) == (chose and method != "prune")
    assert ("(a pruning option is set (" in summary) == (chose and method == "prune")
    recipe.export(str(tmp_path / "job"))
    server = json.loads(next((tmp_path / "job").rglob("config_fed_server.json")).read_text())
    args = next(c["args"] for c in server["workflows"] if "unlearning" in c.get("args", {}))
    assert args["unlearning"]["method"] == method and args["unlearning"]["recovery"] == recovery
    assert args["plan"]["prune_ratio"] == ratio


def test_a_default_training_method_without_rounds_says_it_was_the_default(trained_ckpt):
    from nvflare_unlearn.fl import UnlearningRecipe

    for forget in ([3], [3, 8]):
        with pytest.raises(ValueError, match=r"'neggrad' \(the default: .*\).*method='prune' to prune"):
            UnlearningRecipe(model="small_cnn", num_classes=10, in_channels=1, initial_ckpt=trained_ckpt,
                             forget_classes=forget, num_rounds=0, num_clients=2)  # fmt: skip


def test_an_objective_reports_the_loss_and_the_batches_it_computed():
    """What a site vouches for is counted by the objective itself, and weights_result carries it to the server."""
    from nvflare_unlearn.fl import client_api as ua
    from nvflare_unlearn.fl.defs import META_OBJECTIVE_APPLIED

    (xr, yr), (xf, yf) = _split()
    model = trained_digits_cnn()
    forget = DataLoader(TensorDataset(xf, yf), batch_size=16)
    objective = UnlearningObjective({"method": "neggrad"}, FORGET, 10, forget_loader=forget)
    assert objective.report() == {"loss": "neggrad+ce", "steps": 0, "forget_steps": 0}
    train_epochs(model, DataLoader(TensorDataset(xr[:96], yr[:96]), batch_size=32), 1, 0.01,
                 loss_fn=objective.batch_loss)  # fmt: skip
    assert objective.report() == {"loss": "neggrad+ce", "steps": 3, "forget_steps": 3}
    assert ua.weights_result(model, 96, objective).meta[META_OBJECTIVE_APPLIED] == objective.report()
    assert META_OBJECTIVE_APPLIED not in ua.weights_result(model, 96).meta  # a script that does not say


@pytest.mark.parametrize(
    "report, seen",
    [
        ({"loss": "neggrad+kd", "steps": 5, "forget_steps": 5}, "neggrad+kd"),
        (None, "not reported"),  # a Client API script that ignores the objective
        ({"loss": "kd", "steps": 5, "forget_steps": 0}, "kd"),  # a site without forget-class images
        ({"loss": "neggrad+kd", "steps": 5, "forget_steps": 0}, "neggrad+kd (no forget-class step)"),
        ({"loss": "neggrad+kd", "steps": 0, "forget_steps": 0}, "neggrad+kd (no step)"),
        ({"loss": "neggrad+kd", "steps": 5, "forget_steps": 9}, "malformed report"),  # more forget steps than steps
        ({"loss": "neggrad+kd", "steps": True, "forget_steps": 0}, "malformed report"),
        ({"loss": "neggrad+kd", "steps": -1, "forget_steps": 0}, "malformed report"),
        ({"loss": "neggrad+kd", "steps": 5.0, "forget_steps": 5}, "malformed report"),
        ({"loss": ["neggrad+kd"], "steps": 5, "forget_steps": 5}, "malformed report"),  # unhashable
        ({"loss": "neggrad+kd; drop table", "steps": 5, "forget_steps": 5}, "malformed report"),
        ({"steps": 5}, "malformed report"),
        ("neggrad+kd", "malformed report"),
    ],
)
def test_a_sites_report_is_read_field_by_field(report, seen):
    from nvflare_unlearn.unlearning.objective import reported_loss

    assert reported_loss(report) == seen


def test_the_controller_records_which_sites_ran_the_requested_loss():
    """Four sites under a NegGrad+ request: one runs it, one runs a script that ignores it, two send crafted reports.
    The round keeps only the checked names, the record lists the three, and the averaging is not changed by it."""
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from nvflare_unlearn.fl.defs import META_OBJECTIVE_APPLIED
    from nvflare_unlearn.fl.model_state import state_to_numpy
    from nvflare_unlearn.fl.unlearning_controller import UnlearningController

    ctrl = UnlearningController("small_cnn", 10, FORGET, unlearning={"method": "neggrad", "recovery": "kd"})
    base = state_to_numpy(trained_digits_cnn())
    reports = {
        "site-1": {"loss": "neggrad+kd", "steps": 4, "forget_steps": 4},
        "site-2": None,
        "site-3": {"loss": {"nested": "x" * 10_000}, "steps": 4, "forget_steps": 4},
        "site-4": {"loss": "neggrad+kd", "steps": 4, "forget_steps": 40},
    }
    results = [
        FLModel(
            params_type=ParamsType.FULL,
            params=base,
            meta={
                "client_name": site,
                FLMetaKey.NUM_STEPS_CURRENT_ROUND: 10,
                **({META_OBJECTIVE_APPLIED: r} if r is not None else {}),
            },
        )  # fmt: skip
        for site, r in reports.items()
    ]
    ctrl._round_base = base
    ctrl._fedavg(results)
    entry = ctrl.round_record(ctrl._last_averaged)
    assert entry == {"objective_applied": {"site-1": "neggrad+kd", "site-2": "not reported",
                                           "site-3": "malformed report", "site-4": "malformed report"}}  # fmt: skip
    assert sorted(ctrl._last_aggregation["weights"]) == sorted(reports)  # reports do not decide the average
    ctrl._check_objective([entry, {"objective_applied": {"site-1": "neggrad+kd", "site-2": "kd"}}])
    check = ctrl._record.objective
    assert check["requested"] == "neggrad+kd" and check["not_as_requested"] == ["site-2", "site-3", "site-4"]
    assert check["sites"]["site-2"] == ["not reported", "kd"] and check["sites"]["site-1"] == ["neggrad+kd"]


def test_a_plain_cross_entropy_request_does_not_flag_scripts_that_do_not_report():
    from nvflare_unlearn.unlearning.objective import objective_check

    rounds = [{"site-1": "not reported", "site-2": "ce"}, {"site-1": "not reported", "site-2": "neggrad+ce"}]
    check = objective_check({"method": "prune"}, rounds)
    assert check["requested"] == "ce" and check["not_as_requested"] == ["site-2"]
    assert objective_check({"method": "finetune", "recovery": "kd"}, rounds)["not_as_requested"] == ["site-1", "site-2"]


def test_the_cli_report_shows_what_a_non_pruning_method_did_and_which_sites_differ(capsys):
    """A NegGrad+ job prints no "pruned" stage and no "% removed", and names the sites that did not run its loss."""
    from nvflare_unlearn.cli.report import build_report, print_report

    stage = {"u_acc": 0.9, "r_acc": 0.95}
    metrics = {
        "forget_classes": [3], "original": stage, "pruned": stage, "unlearned": {"u_acc": 0.0, "r_acc": 0.94},
        "params_before": 1000, "params_after": 1000, "rounds": 2, "options": {"unlearning": {"method": "neggrad"}},
        "objective": {"requested": "neggrad+kd", "sites": {"site-1": ["neggrad+kd"], "site-2": ["not reported"]},
                      "not_as_requested": ["site-2"]},
    }  # fmt: skip
    print_report(build_report(metrics))
    out = capsys.readouterr().out
    assert "pruned" not in out and "% removed" not in out and "parameters: 1,000 (none removed), rounds: 2" in out
    assert "warning: not every site reports the requested loss neggrad+kd (site-2: not reported)" in out
    metrics.update(options={"unlearning": {"method": "prune"}}, params_after=600, objective=None)
    print_report(build_report(metrics))
    out = capsys.readouterr().out
    assert "pruned" in out and "1,000 -> 600 (40.0% removed)" in out and "warning" not in out


def test_the_client_api_objective_is_the_requested_loss_and_says_what_ran():
    """A Client API script gets an objective for every unlearning task (plain cross-entropy included), so its answer
    can say what it ran; without forget-class images it runs the retained term and says that instead."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from nvflare_unlearn.fl import client_api as ua
    from nvflare_unlearn.fl.defs import META_FORGET, META_METHOD

    (_xr, _yr), (xf, yf) = _split()
    forget = DataLoader(TensorDataset(xf, yf), batch_size=16)

    def task(meta):
        return FLModel(params_type=ParamsType.FULL, params={}, meta=meta)

    assert ua.training_objective(task({}), "small_cnn", 10) is None  # pretraining
    plain = ua.training_objective(task({META_FORGET: FORGET, META_METHOD: {"method": "prune"}}), "small_cnn", 10)
    assert plain.report()["loss"] == "ce"
    neggrad = {META_FORGET: FORGET, META_METHOD: {"method": "neggrad"}}
    assert ua.training_objective(task(neggrad), "small_cnn", 10, forget).report()["loss"] == "neggrad+ce"
    assert ua.training_objective(task(neggrad), "small_cnn", 10).report()["loss"] == "ce"  # no forget data here
