"""Real NVFlare simulator jobs for the deployment runtime (SimEnv, 2 sites, small CNN, digits):

- resume: a job whose sites all crash in fine-tuning round 2 stops after saving round 1; resubmitted with
  ``resume_from=`` its checkpoint, it goes on from round 2 with the same plan, and the record says so;
- ``set_per_site_config``: a per-site privacy option reaches that site alone (the record lists what each site says
  it applied), site-side training loss reaches NVFlare's experiment tracking (MLflow through NVFlare's
  ``add_experiment_tracking``), and ``run_job`` reports per-round progress while the simulator runs.
"""

from __future__ import annotations

import json
import os

import fault_executors
import pytest
from nvflare.recipe.sim_env import SimEnv
from test_fl_faults import trained_checkpoint

from nvflare_unlearn.fl import UnlearningRecipe, authorize_site_config, quiet_log_config, run_job
from nvflare_unlearn.fl import recipes as recipes_module
from nvflare_unlearn.fl.defs import RECORD_PUBLIC_KEY_FILE
from nvflare_unlearn.method.checkpoint import load_checkpoint
from nvflare_unlearn.protect.record import sha256_file
from nvflare_unlearn.protect.verify import verify_record

pytestmark = pytest.mark.sim

COMMON = dict(model="small_cnn", num_classes=10, forget_classes=[3], prune_ratio=0.3, lr=0.01, num_clients=2)


def _env(root) -> SimEnv:
    return SimEnv(num_clients=2, num_threads=2, workspace_root=str(root), log_config=quiet_log_config(str(root)))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvflare_resume")
    ckpt = trained_checkpoint(root / "original.pt")
    before = sha256_file(ckpt)
    with pytest.MonkeyPatch.context() as mp:
        tests_dir = os.path.dirname(os.path.abspath(fault_executors.__file__))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
        mp.setattr(recipes_module, "UnlearningExecutor", fault_executors.CrashFromRound2Executor)
        allow = authorize_site_config(os.path.join(str(root), "crashing", "local"))
        with open(allow) as f:
            resources = json.load(f)
        resources["class_allow_list"].append("fault_executors")
        with open(allow, "w") as f:
            json.dump(resources, f)
        crashing = UnlearningRecipe(name="crashing", initial_ckpt=ckpt, num_rounds=3, tensorboard=False, **COMMON)
        with pytest.raises(RuntimeError, match="failed"):
            run_job(crashing, _env(root), str(root / "unused"))
    saved = root / "crashing" / "server" / "simulate_job" / "unlearned_model.pt"
    recipe = UnlearningRecipe(
        name="resumed", initial_ckpt=ckpt, resume_from=str(saved), num_rounds=3, tensorboard=False, **COMMON
    )
    result = run_job(recipe, _env(root), str(root / "unused"))
    with open(root / "crashing" / "server" / "simulate_job" / "unlearning_metrics.json") as f:
        crashed = json.load(f)
    return dict(result=result, crashed=crashed, saved=str(saved), ckpt=ckpt, before=before)


def test_a_crashed_job_saved_its_last_round_with_the_state_to_resume(resumed):
    crashed = resumed["crashed"]
    assert crashed["status"] == "failed" and "round" not in crashed.get("error", "")[:0]
    _model, plan, meta = load_checkpoint(resumed["saved"])
    state = meta["extra"]["resume"]
    assert state["round"] == 1 and state["forget_classes"] == [3] and plan.forget_classes == [3]
    assert [r["round"] for r in state["record"]["per_round"]] == [1]


def test_the_resubmitted_job_goes_on_from_the_next_round_with_the_same_plan(resumed):
    result = resumed["result"]
    m = result.metrics
    assert m["status"] == "completed" and m["rounds"] == 3
    assert [r["round"] for r in m["per_round"]] == [1, 2, 3]
    assert m["resumed"]["after_round"] == 1 and m["resumed"]["sha256"] == sha256_file(resumed["saved"])
    assert m["per_round"][0] == resumed["crashed"]["per_round"][0], "round 1 is the crashed job's own round 1"
    assert m["original"] == resumed["crashed"]["original"] and m["pruned"] == resumed["crashed"]["pruned"]
    _m, saved_plan, _ = load_checkpoint(resumed["saved"])
    _m, final_plan, _ = load_checkpoint(result.model_path)
    assert final_plan.to_json() == saved_plan.to_json(), "resuming must keep the plan"
    with open(result.record_path) as f:
        record = json.load(f)
    assert record["request"]["parameters"]["resumed"]["after_round"] == 1
    key = os.path.join(result.run_dir, RECORD_PUBLIC_KEY_FILE)
    outcome = verify_record(result.record_path, result.model_path, resumed["ckpt"], public_key=key)
    assert outcome.ok, str(outcome)
    assert sha256_file(resumed["ckpt"]) == resumed["before"]


def test_resume_refuses_another_request(resumed, tmp_path):
    with pytest.raises(ValueError, match="forgetting"):
        UnlearningRecipe(
            name="other",
            initial_ckpt=resumed["ckpt"],
            resume_from=resumed["saved"],
            **{**COMMON, "forget_classes": [5]},
        )
    with pytest.raises(ValueError, match="nothing to do"):
        UnlearningRecipe(
            name="done", initial_ckpt=resumed["ckpt"], resume_from=resumed["saved"], num_rounds=1, **COMMON
        )


def test_per_site_options_tracking_and_progress_end_to_end(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking.client import MlflowClient
    from nvflare.recipe.utils import add_experiment_tracking

    ckpt = trained_checkpoint(tmp_path / "original.pt")
    recipe = UnlearningRecipe(name="per_site", initial_ckpt=ckpt, num_rounds=2, **COMMON)
    recipe.set_per_site_config({"site-1": {"min_count": 100000}, "site-2": {"lr": 0.02}})
    add_experiment_tracking(recipe, "mlflow")  # NVFlare's own helper: site-side metrics into an MLflow store
    seen: list[dict] = []
    # per-site apps: the simulator is told the site names (NVFlare refuses n_clients with per-site targets)
    env = SimEnv(
        clients=["site-1", "site-2"],
        num_threads=2,
        workspace_root=str(tmp_path),
        log_config=quiet_log_config(str(tmp_path)),
    )
    result = run_job(recipe, env, str(tmp_path / "unused"), on_progress=seen.append)
    m = result.metrics
    applied = m["activation_rounds"][0]["privacy_applied"]
    assert applied["site-1"]["min_count"] == 100000 and applied["site-2"]["min_count"] == 0
    assert sum(m["activation_rounds"][0]["site_counts"]["site-1"]) == 0, "site-1 must have withheld every class"
    with open(result.record_path) as f:
        record = json.load(f)
    assert record["request"]["parameters"]["privacy_applied"]["class 3"]["site-1"]["min_count"] == 100000

    phases = [(p.get("phase"), p.get("round")) for p in seen]
    assert ("finetune", 2) in phases and any(ph == "activation" for ph, _ in phases), phases

    dbs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "per_site") for f in fs if f == "mlflow.db"]
    assert dbs, "NVFlare's MLflow receiver wrote no store"
    client = MlflowClient(tracking_uri=f"sqlite:///{dbs[0]}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    losses = {r.info.run_name: client.get_metric_history(r.info.run_id, "train_loss") for r in runs}
    with_loss = {name: h for name, h in losses.items() if h}
    assert len(with_loss) >= 2, losses  # one run per site, each with its rounds' training loss
    assert all(0 < p.value < 10 for h in with_loss.values() for p in h)
