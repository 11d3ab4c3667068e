"""Real NVFlare runs in the simulator (SimEnv, 2 sites, small CNN, sklearn digits): pretrain with FedAvg, then
unlearn through the NVFlare job, and check the job's OUTPUT FILES (the simulator can exit 0 after a failure).

The two sites partition both digits splits; federated evaluation sums their per-class counts, so it covers the
whole digits test split exactly once and must agree with a central evaluation of the saved model.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from core_helpers import torch_threads
from nvflare.recipe.sim_env import SimEnv
from torch.utils.data import DataLoader

from nvflare_unlearn import load_checkpoint
from nvflare_unlearn.data import digits_dataset
from nvflare_unlearn.evaluation import class_correct_total, u_r_accuracy
from nvflare_unlearn.fl import PretrainRecipe, UnlearningRecipe, quiet_log_config, read_job_result

pytestmark = pytest.mark.sim  # real NVFlare simulator jobs

N_SITES = 2
PRETRAIN_ROUNDS = 3
FINETUNE_ROUNDS = 3
# Fraction of the 112 conv channels pruned PER forgotten class. At 0.1 this small CNN relearns the forgotten digit
# from shared features within 3 fine-tuning rounds (U ~ 0.85); two classes at 0.3 each leave too little to recover R.
RATIO_ONE = 0.3
# Two classes at 0.15 each sat on the edge: with issue 13's training changes the classes came back within 4 rounds
# (U 0.067 with exact-mean aggregation, 0.18 with issue 11's robust defaults); at 0.2 each this test's recipe gave
# U 0.011 and R 0.972 (original R 0.986) with the defaults.
RATIO_TWO = 0.2


def _env(root) -> SimEnv:
    return SimEnv(
        num_clients=N_SITES, num_threads=N_SITES, workspace_root=str(root), log_config=quiet_log_config(str(root))
    )


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _central_eval(model_path: str, forget: list[int]) -> tuple[list[int], list[int], dict]:
    """Rebuild the saved model from the factory + its plan alone and evaluate it on the whole digits test split."""
    model, plan, _meta = load_checkpoint(model_path)
    with torch_threads(1):  # the sites evaluate with one thread; same kernels, same roundings
        correct, total = class_correct_total(model, DataLoader(digits_dataset("test"), batch_size=256), 10)
    return correct.tolist(), total.tolist(), u_r_accuracy(correct, total, forget)


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory):
    return tmp_path_factory.mktemp("nvflare_sim")


@pytest.fixture(scope="module")
def pretrained(sim_root):
    """One real FedAvg pretraining job shared by the unlearning tests."""
    recipe = PretrainRecipe(
        name="pretrain",
        model="small_cnn",
        num_classes=10,
        num_clients=N_SITES,
        num_rounds=PRETRAIN_ROUNDS,
        local_epochs=2,
        lr=0.05,
        test_dataset="digits",
    )
    result = read_job_result(recipe.execute(_env(sim_root)).get_result())
    assert result.metrics["job_kind"] == "pretrain"
    assert result.rounds == PRETRAIN_ROUNDS and len(result.metrics["per_round"]) == PRETRAIN_ROUNDS
    assert result.metrics["final"]["acc"] >= 0.85, result.metrics["final"]
    return result


def _unlearn(sim_root, pretrained, name: str, forget: list[int], ratio: float, rounds: int):
    ckpt = pretrained.model_path
    before = _sha256(ckpt)
    recipe = UnlearningRecipe(
        name=name,
        model="small_cnn",
        num_classes=10,
        initial_ckpt=ckpt,
        forget_classes=forget,
        prune_ratio=ratio,
        num_rounds=rounds,
        local_epochs=1,
        lr=0.01,
        num_clients=N_SITES,
        test_dataset="digits",
    )
    result = read_job_result(recipe.execute(_env(sim_root)).get_result())
    assert _sha256(ckpt) == before, "the original checkpoint was modified"
    return result


def _check_unlearned(result, forget: list[int], rounds: int) -> None:
    m = result.metrics
    assert m["job_kind"] == "unlearn" and m["forget_classes"] == forget
    assert m["rounds"] == rounds and [r["round"] for r in m["per_round"]] == list(range(1, rounds + 1))
    orig, pruned, final = m["original"], m["pruned"], m["unlearned"]
    assert orig["u_acc"] > 0.5, "the pretrained model must know the classes before we can test forgetting them"
    assert final["u_acc"] <= 0.05, (orig, final)
    assert final["r_acc"] >= orig["r_acc"] - 0.03, (orig, final)
    assert m["params_after"] < m["params_before"]
    assert pruned["u_acc"] < orig["u_acc"], "pruning alone must already remove part of the forget classes"
    assert sum(final["total"]) == len(digits_dataset("test")), "federated evaluation must cover the test split once"
    assert sorted(final["sites"]) == ["site-1", "site-2"]
    assert [a["forget_class"] for a in m["activation_rounds"]] == forget
    assert m["plan_summary"]["forget_classes"] == forget

    # The saved models rebuild from the registry + their plan alone and reproduce the job's own numbers.
    correct, total, acc = _central_eval(result.model_path, forget)
    assert total == final["total"]
    assert correct == final["server"]["correct"], "server-side evaluation of the final model differs"
    assert np.abs(np.subtract(correct, final["correct"])).sum() <= 1, (correct, final["correct"])
    assert acc["u_acc"] == pytest.approx(final["server"]["u_acc"]) and acc["r_acc"] == pytest.approx(
        final["server"]["r_acc"]
    )
    model, plan, meta = load_checkpoint(result.model_path)
    assert plan is not None and plan.forget_classes == forget
    assert sum(p.numel() for p in model.parameters()) == m["params_after"]
    p_correct, _, _ = _central_eval(result.pruned_model_path, forget)
    assert p_correct == pruned["server"]["correct"]
    with open(result.plan_path) as f:
        assert json.load(f)["steps"] == json.loads(plan.to_json())["steps"]
    assert result.tensorboard_dir and any(
        name.startswith("events.out.tfevents") for _d, _s, files in os.walk(result.tensorboard_dir) for name in files
    )


def test_unlearn_one_class_in_simulator(sim_root, pretrained):
    result = _unlearn(sim_root, pretrained, "unlearn_one", [3], RATIO_ONE, FINETUNE_ROUNDS)
    _check_unlearned(result, [3], FINETUNE_ROUNDS)


def test_unlearn_two_classes_in_one_request(sim_root, pretrained):
    rounds = FINETUNE_ROUNDS + 2  # two classes pruned away: two more rounds to recover R (a 3-point bound below)
    result = _unlearn(sim_root, pretrained, "unlearn_two", [3, 8], RATIO_TWO, rounds)
    _check_unlearned(result, [3, 8], rounds)
    steps = result.metrics["activation_rounds"]
    assert steps[0]["params"] > steps[1]["params"], "the second class's pass must prune the already-pruned model"


CLIENT_SCRIPT = """
import nvflare.client as flare
from torch.utils.data import DataLoader

from nvflare_unlearn.fl import client_api as ua
from nvflare_unlearn.fl.site_data import load_site_split
from nvflare_unlearn.evaluation import train_epochs

flare.init()
site = flare.get_site_name()
train_set = load_site_split(site, "train", {"num_clients": 2})
val_set = load_site_split(site, "test", {"num_clients": 2})
while flare.is_running():
    received = flare.receive()
    if received is None:
        break
    model = ua.model_from_flmodel(received, "small_cnn", num_classes=10)
    task = flare.get_task_name()
    if task == ua.TASK_ACTIVATIONS:
        flare.send(ua.activation_result(model, DataLoader(train_set, batch_size=64), 10, received))
    elif task == ua.TASK_TRAIN:
        data = ua.retained(train_set, received)
        if len(data):
            train_epochs(model, DataLoader(data, batch_size=32, shuffle=True), epochs=1, lr=0.01)
        flare.send(ua.weights_result(model, len(data)))
    elif task == ua.TASK_VALIDATE:
        flare.send(ua.validation_result(model, DataLoader(val_set, batch_size=256), 10))
    elif task == ua.TASK_VERIFY:
        loaders = DataLoader(train_set, batch_size=256), DataLoader(val_set, batch_size=256)
        flare.send(ua.verification_result(model, *loaders, received, 10))
"""


@pytest.mark.slow
def test_unlearn_with_a_users_client_api_script(sim_root, pretrained, tmp_path):
    """train_script=: the sites run the user's own Client API loop (numpy exchange) instead of our executor."""
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    recipe = UnlearningRecipe(
        name="unlearn_script",
        initial_ckpt=pretrained.model_path,
        forget_classes=[3],
        prune_ratio=RATIO_ONE,
        num_rounds=2,
        num_clients=N_SITES,
        train_script=str(script),
        test_dataset="digits",
    )
    m = read_job_result(recipe.execute(_env(sim_root)).get_result()).metrics
    assert m["rounds"] == 2 and m["params_after"] < m["params_before"]
    assert m["pruned"]["u_acc"] <= 0.05 and m["unlearned"]["u_acc"] <= 0.05
    assert m["unlearned"]["r_acc"] > m["pruned"]["r_acc"] + 0.3, "fine-tuning through the user's script did not help"
    assert m["verification"]["status"] == "ok" and m["verification"]["sites"] == ["site-1", "site-2"]
    # the script ignores the objective: fine for the paper's cross-entropy fine-tune, so nothing is flagged ...
    silent = {"site-1": ["not reported"], "site-2": ["not reported"]}
    assert m["objective"] == {"requested": "ce", "sites": silent, "not_as_requested": []}

    # ... but under a NegGrad+ request the record must not pass its plain fine-tuning off as NegGrad+
    recipe = UnlearningRecipe(
        name="unlearn_script_neggrad",
        initial_ckpt=pretrained.model_path,
        forget_classes=[3],
        method="neggrad",
        num_rounds=1,
        num_clients=N_SITES,
        train_script=str(script),
        verify=False,
    )
    result = read_job_result(recipe.execute(_env(sim_root)).get_result())
    check = result.metrics["objective"]
    assert check == {"requested": "neggrad+ce", "sites": silent, "not_as_requested": ["site-1", "site-2"]}
    record = json.loads(open(result.record_path).read())
    assert record["request"]["parameters"]["objective_applied"] == check
