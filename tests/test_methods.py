"""The unlearning methods of the job API (method.objectives): each objective does what its name says, and the
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
from nvflare_unlearn.method.objectives import UnlearningObjective
from nvflare_unlearn.options import MethodOptions

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
    kd = UnlearningObjective({"recovery": "kd"}, FORGET, 10, teacher=copy.deepcopy(model))
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
def test_a_non_pruning_method_runs_as_a_job_and_verifies(tmp_path, trained_ckpt):
    """NegGrad+ with distillation through NVFlare: the sites use their forget data and the teacher the task carries;
    the job ends with the forgetting check, recorded in the metrics and the audit record."""
    from nvflare.recipe.sim_env import SimEnv

    from nvflare_unlearn.fl import UnlearningRecipe, quiet_log_config, read_job_result

    recipe = UnlearningRecipe(
        name="neggrad_kd", model="small_cnn", num_classes=10, in_channels=1, initial_ckpt=trained_ckpt,
        forget_classes=FORGET, method="neggrad", recovery="kd", num_rounds=1, num_clients=2, tensorboard=False,
    )  # fmt: skip
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
        ([3], {}, "prune", "ce", 0.05),  # one class: the paper's pruning at the measured 5 %
        ([0, 5, 9], {}, "neggrad", "kd", 0.05),  # several: NegGrad+ with distillation kept R
        ([0, 5, 9], {"method": "prune"}, "prune", "ce", 0.05),  # the paper's method, one flag away
        ([0, 5, 9], {"recovery": "ce"}, "neggrad", "ce", 0.05),
        ([0, 5, 9], {"prune_ratio": 0.2}, "prune", "ce", 0.2),  # a pruning option asks for pruning
        ([0, 5, 9], {"plan": {"scope": "per_layer"}}, "prune", "ce", 0.05),
        ([0, 5, 9], {"ratio": 0.2}, "prune", "ce", 0.2),  # deprecated name of prune_ratio
        ([0, 5, 9], {"unlearning": {"method": "scrub"}}, "scrub", "ce", 0.05),
    ],
)
def test_the_default_method_is_the_measured_best_for_the_forget_set(
    tmp_path, trained_ckpt, forget, given, method, recovery, ratio
):
    """Issue 13: defaults from the evidence (options.measured_defaults), written into the exported job as concrete
    values, so the sites, the record and the auditor see the method that ran, not a rule."""
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
    assert summary.startswith(f"method: {method}") and ("measured best" in summary) == (
        "method" in recipe.defaults_applied and (method != "prune" or len(forget) == 1)
    )
    recipe.export(str(tmp_path / "job"))
    server = json.loads(next((tmp_path / "job").rglob("config_fed_server.json")).read_text())
    args = next(c["args"] for c in server["workflows"] if "unlearning" in c.get("args", {}))
    assert args["unlearning"]["method"] == method and args["unlearning"]["recovery"] == recovery
    assert args["plan"]["prune_ratio"] == ratio


def test_a_default_training_method_without_rounds_says_it_was_the_default(trained_ckpt):
    from nvflare_unlearn.fl import UnlearningRecipe

    with pytest.raises(ValueError, match=r"'neggrad' \(the default for 2 forget classes\).*method='prune' to prune"):
        UnlearningRecipe(model="small_cnn", num_classes=10, in_channels=1, initial_ckpt=trained_ckpt,
                         forget_classes=[3, 8], num_rounds=0, num_clients=2)  # fmt: skip
