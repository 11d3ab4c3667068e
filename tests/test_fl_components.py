"""The NVFlare components without the simulator: executor tasks, report aggregation, persistor round trip,
recipe validation and export, results reading. Fast (seconds)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.fl_constant import FLMetaKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from torch.utils.data import DataLoader

from nvflare_unlearn import (
    build_model,
    build_pruning_plan,
    collect_class_activations,
    load_checkpoint,
    merge_reports,
    save_checkpoint,
)
from nvflare_unlearn.data import digits_dataset
from nvflare_unlearn.fl import (
    ALLOW_LIST_ENTRY,
    ActivationAggregator,
    PretrainRecipe,
    RetrainRecipe,
    UnlearningExecutor,
    UnlearningModelPersistor,
    UnlearningRecipe,
    authorize_site_config,
    client_api,
    read_job_result,
)
from nvflare_unlearn.fl.defs import META_FORGET, META_PLAN, META_TEACHER_PLAN, METRICS_FILE
from nvflare_unlearn.fl.model_state import load_numpy_state, plan_from_meta, rebuild_model, state_to_numpy
from nvflare_unlearn.fl.site_data import load_site_split, site_index
from nvflare_unlearn.method.graph import conv_channels
from nvflare_unlearn.method.tfidf import tfidf_scores

K = 10


# ----------------------------------------------------------------------------------------------- fixtures
def _report(model, n: int, offset: int = 0):
    data = digits_dataset("train").subset(np.arange(offset, offset + n))
    return collect_class_activations(model, DataLoader(data, batch_size=64), K)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("small_cnn", K).eval()


@pytest.fixture(scope="module")
def plan(model):
    """A real one-class plan: TF-IDF scores of class 3 on the untrained CNN, 20 % of channels."""
    scores = tfidf_scores(_report(model, 300).means(), 3)
    return build_pruning_plan(model, scores, 0.2, forget_class=3, model_name="small_cnn")


def _ctx(site: str = "site-1", run_dir: str | None = None) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    if run_dir is not None:

        class _Workspace:
            def get_run_dir(self, job_id):
                return run_dir

        class _Engine:
            def get_workspace(self):
                return _Workspace()

        ctx.set_prop(ReservedKey.ENGINE, _Engine(), private=True, sticky=True)
        ctx.set_prop(ReservedKey.RUN_NUM, "job", private=False, sticky=True)
    return ctx


def _task(net, meta=None, rnd=0):
    fl_model = FLModel(params_type=ParamsType.FULL, params=state_to_numpy(net), current_round=rnd, meta=meta or {})
    return FLModelUtils.to_shareable(fl_model)


def _pruned(model, plan):
    import copy

    from nvflare_unlearn import apply_pruning_plan

    return apply_pruning_plan(copy.deepcopy(model), plan)


# ----------------------------------------------------------------------------------------------- executor
def test_executor_serves_activation_train_and_validate_tasks(model, plan):
    ex = UnlearningExecutor(
        "small_cnn", K, site_data={"num_clients": 2}, training={"local_epochs": 1, "lr": 0.01, "batch_size": 64}
    )
    pruned = _pruned(model, plan)
    meta = {META_PLAN: plan.to_json(), META_FORGET: [3]}
    ctx, sig = _ctx("site-2"), Signal()
    local_train = load_site_split("site-2", "train", {"num_clients": 2})

    reply = ex.execute("class_activations", _task(pruned, meta), ctx, sig)
    dxo = from_shareable(reply)
    assert dxo.data_kind == DataKind.COLLECTION
    assert set(dxo.data["sums"]) == set(conv_channels(pruned))
    assert dxo.data["counts"].tolist() == local_train.class_counts().tolist()  # statistics of THIS site only
    assert all(v.shape == (K, conv_channels(pruned)[n]) for n, v in dxo.data["sums"].items())

    reply = ex.execute("train", _task(pruned, meta, rnd=1), ctx, sig)
    dxo = from_shareable(reply)
    assert dxo.data_kind == DataKind.WEIGHTS
    assert dxo.get_meta_prop(FLMetaKey.NUM_STEPS_CURRENT_ROUND) == int((local_train.targets != 3).sum())
    assert {k: v.shape for k, v in dxo.data.items()} == {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    changed = any(not np.allclose(dxo.data[k], v.numpy()) for k, v in pruned.state_dict().items())
    assert changed, "local training did not change the weights"

    reply = ex.execute("validate", _task(pruned, meta), ctx, sig)
    dxo = from_shareable(reply)
    assert dxo.data_kind == DataKind.METRICS
    local_test = load_site_split("site-2", "test", {"num_clients": 2})
    assert dxo.data["total"] == local_test.class_counts().tolist()
    assert 0 <= sum(dxo.data["correct"]) <= sum(dxo.data["total"])


def test_mask_mode_training_keeps_pruned_channels_at_zero(model, plan):
    import copy

    from nvflare_unlearn import apply_pruning_plan

    masked = apply_pruning_plan(copy.deepcopy(model), plan, mode="mask")
    meta = {META_PLAN: plan.to_json(), "prune_mode": "mask", META_FORGET: [3]}
    ex = UnlearningExecutor("small_cnn", K, site_data={"num_clients": 2}, training={"local_epochs": 1, "lr": 0.05})
    dxo = from_shareable(ex.execute("train", _task(masked, meta), _ctx("site-1"), Signal()))
    assert {k: v.shape for k, v in dxo.data.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, idxs in plan.pruned_channels().items():
        w = dxo.data[f"{name}.weight"]
        assert np.all(w[idxs] == 0), f"masked channels of {name} grew back during local training"
        kept = [c for c in range(w.shape[0]) if c not in set(idxs)]
        assert np.any(w[kept] != 0)


def test_site_with_only_forget_class_data_returns_zero_weight(model):
    ex = UnlearningExecutor("small_cnn", K, site_data={"num_clients": 1})
    reply = ex.execute("train", _task(model, {META_FORGET: list(range(K))}), _ctx(), Signal())
    dxo = from_shareable(reply)
    assert reply.get_return_code() == ReturnCode.OK
    assert dxo.get_meta_prop(FLMetaKey.NUM_STEPS_CURRENT_ROUND) == 0
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(dxo.data[k], v.numpy())


def test_min_count_keeps_small_classes_out_of_the_report(model):
    site = load_site_split("site-1", "train", {"num_clients": 2})
    counts = site.class_counts()
    threshold = int(np.sort(counts)[2])  # the two smallest classes fall below it
    ex = UnlearningExecutor("small_cnn", K, site_data={"num_clients": 2}, privacy={"min_count": threshold})
    dxo = from_shareable(ex.execute("class_activations", _task(model), _ctx("site-1"), Signal()))
    expected = np.where(counts < threshold, 0, counts)
    assert dxo.data["counts"].tolist() == expected.tolist() and (expected == 0).any()
    for arr in dxo.data["sums"].values():
        assert np.all(arr[counts < threshold] == 0)
    with pytest.raises(ValueError, match="min_count"):
        UnlearningExecutor("small_cnn", K, privacy={"min_count": -1})


def test_executor_rejects_bad_task_data_and_unknown_tasks(model, plan):
    ex = UnlearningExecutor("small_cnn", K)
    # unpruned weights sent with a plan: the rebuilt architecture does not fit them
    reply = ex.execute("validate", _task(model, {META_PLAN: plan.to_json()}), _ctx(), Signal())
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA
    reply = ex.execute("validate", _task(model, {META_PLAN: "{not json"}), _ctx(), Signal())
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA
    assert ex.execute("no_such_task", _task(model), _ctx(), Signal()).get_return_code() == ReturnCode.TASK_UNKNOWN


def test_executor_constructor_validates_options():
    with pytest.raises(ValueError, match="dataset must be one of"):
        UnlearningExecutor("small_cnn", K, site_data={"dataset": "mnist"})
    with pytest.raises(ValueError, match="partition"):
        UnlearningExecutor("small_cnn", K, site_data={"partition": "random"})
    with pytest.raises(ValueError, match="lr"):
        UnlearningExecutor("small_cnn", K, training={"lr": 0})
    with pytest.raises(ValueError, match="unknown training option"):
        UnlearningExecutor("small_cnn", K, training={"learning_rate": 0.1})
    with pytest.warns(FutureWarning, match="flat option keywords are deprecated"):  # version 0.1's form still works
        legacy = UnlearningExecutor("small_cnn", K, dataset="digits", lr=0.02, n_sites=3)
    assert legacy.training["lr"] == 0.02 and legacy.site_data["num_clients"] == 3


def test_site_slices_are_disjoint_and_named_by_site_number():
    parts = [load_site_split(f"site-{i}", "train", {"num_clients": 3}) for i in (1, 2, 3)]
    assert sum(len(p) for p in parts) == len(digits_dataset("train"))
    assert site_index("site-3", 3) == 2
    with pytest.raises(ValueError, match="ending in a number"):
        site_index("hospital", 3)
    with pytest.raises(ValueError, match="num_clients"):
        site_index("site-4", 3)


# ----------------------------------------------------------------------------------------------- aggregator
def _result(report, site):
    return FLModel(params_type=ParamsType.FULL, params=report.to_dict(), meta={"client_name": site})


def test_aggregator_merges_count_weighted_and_rejects_bad_reports(model):
    r1, r2 = _report(model, 200, 0), _report(model, 100, 200)
    agg = ActivationAggregator(num_classes=K, aggregation="mean")  # the paper's exact mean (default: median)
    agg.set_expected_layers(conv_channels(model))
    assert agg.accept_model(_result(r1, "site-1"))
    assert agg.accept_model(_result(r2, "site-2"))

    bad_nan = r1.to_dict()
    name = next(iter(bad_nan["sums"]))
    bad_nan["sums"][name] = bad_nan["sums"][name].copy()
    bad_nan["sums"][name][0, 0] = np.nan
    assert not agg.accept_model(FLModel(params=bad_nan, meta={"client_name": "site-3"}))
    bad_shape = r1.to_dict()
    bad_shape["sums"][name] = bad_shape["sums"][name][:, :-1]
    assert not agg.accept_model(FLModel(params=bad_shape, meta={"client_name": "site-4"}))
    assert not agg.accept_model(FLModel(params={"garbage": 1}, meta={"client_name": "site-5"}))
    assert not agg.accept_model(_result(r1, "site-1")), "a second report from one site must not count twice"
    assert set(agg.rejected) == {"site-1", "site-3", "site-4", "site-5"}
    assert "NaN" in agg.rejected["site-3"] and "shape" in agg.rejected["site-4"]

    out = agg.aggregate_model()
    expected = merge_reports([r1, r2]).means()
    assert out.meta["sites"] == ["site-1", "site-2"]
    assert out.meta["counts"] == (r1.counts + r2.counts).tolist()
    for layer, arr in expected.items():
        np.testing.assert_allclose(out.params[layer], arr)


def test_aggregator_without_valid_reports_fails_clearly(model):
    agg = ActivationAggregator(num_classes=K)
    with pytest.raises(RuntimeError, match="set_expected_layers"):
        agg.accept_model(FLModel(params={}))
    agg.set_expected_layers(conv_channels(model))
    agg.accept_model(FLModel(params={"sums": {}}, meta={"client_name": "site-1"}))
    with pytest.raises(RuntimeError, match="no valid activation report"):
        agg.aggregate_model()
    with pytest.raises(ValueError, match="aggregation must be one of"):
        ActivationAggregator(num_classes=K, aggregation="max")
    with pytest.warns(FutureWarning, match="'method' is deprecated"):  # version 0.1's keyword still works
        assert ActivationAggregator(num_classes=K, method="median").aggregation == "median"


def test_robust_aggregation_bounds_a_poisoned_site(model):
    honest = [_report(model, 150, i * 150) for i in range(4)]
    poisoned = _report(model, 150, 600)
    poisoned.sums = {k: v * 1000 for k, v in poisoned.sums.items()}
    agg = ActivationAggregator(num_classes=K, aggregation="median")
    agg.set_expected_layers(conv_channels(model))
    for i, r in enumerate(honest + [poisoned]):
        agg.accept_model(_result(r, f"site-{i + 1}"))
    means = agg.aggregate_model().params
    site_means = [r.means() for r in honest]
    for layer in means:
        hi = np.max([m[layer] for m in site_means], axis=0)
        assert np.all(means[layer] <= hi + 1e-9), "one poisoned site moved the median beyond the honest range"


# ----------------------------------------------------------------------------------------------- persistor
def test_persistor_round_trip_of_a_pruned_model(tmp_path, model, plan):
    pruned = _pruned(model, plan)
    original = tmp_path / "orig.pt"
    save_checkpoint(original, pruned, plan, "small_cnn", K)
    before = original.read_bytes()
    p = UnlearningModelPersistor("small_cnn", K, initial_ckpt=str(original))
    learnable = p.load_model(_ctx())
    assert json.loads(learnable[ModelLearnableKey.META][META_PLAN]) == json.loads(plan.to_json())

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    p.save_model(learnable, _ctx(run_dir=str(run_dir)))
    p.save_model(learnable, _ctx(run_dir=str(run_dir)))  # later rounds replace the file
    rebuilt, plan2, meta = load_checkpoint(run_dir / "unlearned_model.pt")
    assert plan2.to_json() == plan.to_json() and meta["prune_mode"] == "remove"
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), pruned.eval()(x))
    assert original.read_bytes() == before
    with pytest.raises(ValueError, match="refusing to overwrite"):
        p.save_to(str(original), learnable)
    # the plan enters the persistor as text in the model's meta: parsed there once, a bad one is a clear ValueError
    bad = {**learnable, ModelLearnableKey.META: {**learnable[ModelLearnableKey.META], META_PLAN: "{not json"}}
    with pytest.raises(ValueError, match="not valid JSON"):
        p.save_to(str(run_dir / "bad.pt"), bad)
    assert not (run_dir / "bad.pt").exists()


def test_the_plan_is_parsed_once_from_the_meta_and_passed_typed(model, plan):
    assert plan_from_meta({}) is None and plan_from_meta(None) is None
    parsed = plan_from_meta({META_PLAN: plan.to_json()})
    assert parsed.to_dict() == plan.to_dict()
    assert plan_from_meta({META_TEACHER_PLAN: plan.to_json()}, META_TEACHER_PLAN).to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match="not valid JSON"):
        plan_from_meta({META_PLAN: "{not json"})
    with pytest.raises(ValueError, match="must be JSON text, got dict"):
        plan_from_meta({META_PLAN: plan.to_dict()})
    rebuilt = rebuild_model("small_cnn", K, parsed)
    assert conv_channels(rebuilt) == conv_channels(_pruned(model, plan))
    with pytest.raises(ValueError, match="takes a PruningPlan or None, got str"):
        rebuild_model("small_cnn", K, plan.to_json())


def test_persistor_loads_plain_state_dicts_fresh_models_and_rejects_wrong_ones(tmp_path, model):
    sd = tmp_path / "plain.pt"
    torch.save(model.state_dict(), sd)
    learnable = UnlearningModelPersistor("small_cnn", K, initial_ckpt=str(sd)).load_model(_ctx())
    assert META_PLAN not in learnable[ModelLearnableKey.META]
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(learnable[ModelLearnableKey.WEIGHTS][k], v.numpy())
    nvflare_format = tmp_path / "FL_global_model.pt"
    torch.save({"model": model.state_dict(), "meta_props": {}}, nvflare_format)
    UnlearningModelPersistor("small_cnn", K, initial_ckpt=str(nvflare_format)).load_model(_ctx())

    fresh = UnlearningModelPersistor("small_cnn", K, seed=7).load_model(_ctx())
    again = UnlearningModelPersistor("small_cnn", K, seed=7).load_model(_ctx())
    for k in fresh[ModelLearnableKey.WEIGHTS]:
        np.testing.assert_array_equal(fresh[ModelLearnableKey.WEIGHTS][k], again[ModelLearnableKey.WEIGHTS][k])

    with pytest.raises(ValueError):
        UnlearningModelPersistor("small_cnn", 5, initial_ckpt=str(sd)).load_model(_ctx())
    with pytest.raises(ValueError, match="does not exist"):
        UnlearningModelPersistor("small_cnn", K, initial_ckpt=str(tmp_path / "nope.pt")).load_model(_ctx())
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        UnlearningModelPersistor("small_cnn", K, initial_ckpt=str(junk)).load_model(_ctx())
    with pytest.raises(ValueError, match="output_file"):
        UnlearningModelPersistor("small_cnn", K, output_file="../escape.pt")


def test_load_numpy_state_names_the_mismatch(model, plan):
    pruned = _pruned(model, plan)
    with pytest.raises(ValueError, match="shape"):
        load_numpy_state(build_model("small_cnn", K), state_to_numpy(pruned))
    with pytest.raises(ValueError, match="missing"):
        load_numpy_state(build_model("small_cnn", K), {"fc.weight": np.zeros((K, 64))})


# ----------------------------------------------------------------------------------------------- client API
def test_client_api_helpers_answer_the_three_tasks(model, plan):
    pruned = _pruned(model, plan)
    received = FLModel(params=state_to_numpy(pruned), meta={META_PLAN: plan.to_json(), META_FORGET: [3, 5]})
    rebuilt = client_api.model_from_flmodel(received, "small_cnn", K)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), pruned.eval()(x))
    train = digits_dataset("train")
    kept = client_api.retained(train, received)
    assert set(np.unique(kept.targets)) == set(range(K)) - {3, 5}
    act = client_api.activation_result(rebuilt, DataLoader(train, batch_size=128), K, received)
    assert act.params["counts"].tolist() == train.class_counts().tolist()
    assert client_api.weights_result(rebuilt, 0).meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] == 0
    val = client_api.validation_result(rebuilt, DataLoader(digits_dataset("test"), batch_size=256), K)
    assert sum(val.metrics["total"]) == len(digits_dataset("test"))
    with pytest.raises(ValueError, match="num_samples"):
        client_api.weights_result(rebuilt, -1)


# ----------------------------------------------------------------------------------------------- recipes
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "trained.pt"
    save_checkpoint(path, model, None, "small_cnn", K)
    return str(path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(forget_classes=[10]), "not a class id of this model"),
        (dict(forget_classes=[-1]), "not a class id of this model"),
        (dict(forget_classes=[]), "at least one class"),
        (dict(forget_classes=list(range(K))), "cannot forget all"),
        (dict(forget_classes=[2, 2]), "duplicates"),
        (dict(forget_classes=["3"]), "integer"),
        (dict(prune_ratio=0.0), "prune_ratio"),
        (dict(prune_ratio=1.0), "prune_ratio"),
        (dict(num_rounds=-1), "num_rounds"),
        (dict(local_epochs=-1), "local_epochs"),
        (dict(lr=0), "lr"),
        (dict(initial_ckpt="/no/such/model.pt"), "does not exist"),
        (dict(model="resnet1000"), "unknown model"),
        (dict(model=torch.nn.Conv2d(1, 2, 3)), "not built by nvflare_unlearn.build_model"),
        (dict(min_clients=3, num_clients=2), "exceeds"),
        (dict(dataset="imagenet"), "dataset must be one of"),
        (dict(scope="everywhere"), "scope"),
        (dict(idf="bm25"), "idf"),
        (dict(prune_mode="zero"), "prune_mode"),
        (dict(target_r_acc=95), "target_r_acc"),
        (dict(stop_cond="r_acc > high"), "stop_cond"),
        (dict(aggregation="max"), "aggregation must be one of"),
        (dict(plan={"prune_ratio": 0.2}, prune_ratio=0.3), "given both"),
        (dict(plan={"ratio_typo": 0.2}), "unknown plan option"),
    ],
)
def test_unlearning_recipe_rejects_bad_options(ckpt, kwargs, message):
    args = dict(initial_ckpt=ckpt, forget_classes=[3])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        UnlearningRecipe(**args)


def test_other_recipes_validate_too(ckpt):
    with pytest.raises(ValueError, match="at least one class"):
        RetrainRecipe(forget_classes=[])
    with pytest.raises(ValueError, match="from scratch"):
        RetrainRecipe(forget_classes=[1], initial_ckpt=ckpt)
    with pytest.raises(ValueError, match="num_rounds"):
        PretrainRecipe(num_rounds=-2)


def _configs(job_dir, name):
    out = {}
    for app in os.listdir(os.path.join(job_dir, name)):
        cfg = os.path.join(job_dir, name, app, "config")
        if os.path.isdir(cfg):
            for f in os.listdir(cfg):
                with open(os.path.join(cfg, f)) as fh:
                    out[f] = json.load(fh)
    return out


def test_unlearning_recipe_exports_a_job_referencing_the_installed_package(tmp_path, ckpt):
    recipe = UnlearningRecipe(
        name="forget3",
        initial_ckpt=ckpt,
        forget_classes=[3],
        prune_ratio=0.2,
        num_rounds=2,
        model=build_model("small_cnn", K),
    )
    recipe.export(str(tmp_path))
    cfg = _configs(tmp_path, "forget3")
    server, client = cfg["config_fed_server.json"], cfg["config_fed_client.json"]
    wf = server["workflows"][0]
    assert wf["path"] == "nvflare_unlearn.fl.unlearning_controller.UnlearningController"
    args = wf["args"]
    assert (
        args["forget_classes"] == [3] and args["plan"]["prune_ratio"] == 0.2 and args["federation"]["num_rounds"] == 2
    )
    comps = {c["id"]: c for c in server["components"]}
    assert comps["activation_aggregator"]["path"] == "nvflare_unlearn.fl.aggregator.ActivationAggregator"
    assert comps["persistor"]["path"] == "nvflare_unlearn.fl.persistor.UnlearningModelPersistor"
    assert comps["persistor"]["args"]["initial_ckpt"] == ckpt
    ex = client["executors"][0]
    assert ex["executor"]["path"] == "nvflare_unlearn.fl.executor.UnlearningExecutor"
    assert sorted(ex["tasks"]) == ["class_activations", "train", "validate", "verify"]
    apps = os.listdir(tmp_path / "forget3")
    assert not any(os.path.isdir(os.path.join(tmp_path, "forget3", a, "custom")) for a in apps), "must not be BYOC"


def test_bundle_code_makes_a_byoc_job(tmp_path):
    PretrainRecipe(name="pre", bundle_code=True).export(str(tmp_path))
    customs = [os.path.join(tmp_path, "pre", a, "custom") for a in os.listdir(tmp_path / "pre")]
    assert any(os.path.isfile(os.path.join(c, "nvflare_unlearn", "fl", "executor.py")) for c in customs)


def test_authorize_site_config_adds_the_plugin_once_and_keeps_the_defaults(tmp_path):
    path = authorize_site_config(str(tmp_path / "local"))
    authorize_site_config(str(tmp_path / "local"))
    with open(path) as f:
        allow = json.load(f)["class_allow_list"]
    assert allow.count(ALLOW_LIST_ENTRY) == 1
    assert "nvflare.app_common.workflows.fedavg.FedAvg" in allow


# ----------------------------------------------------------------------------------------------- results
def test_read_job_result_refuses_failed_or_missing_jobs(tmp_path):
    with pytest.raises(RuntimeError, match="does not exist"):
        read_job_result(str(tmp_path / "none"))
    log_dir = tmp_path / "job" / "server" / "simulate_job"
    log_dir.mkdir(parents=True)
    (log_dir / "log.txt").write_text(
        "ERROR - Component 'nvflare_unlearn.fl.x.Y' at config path '' is not in allow_list\n"
    )
    with pytest.raises(RuntimeError, match="class_allow_list"):
        read_job_result(str(tmp_path / "job"))
    (log_dir / METRICS_FILE).write_text(json.dumps({"status": "failed", "error": "boom"}))
    with pytest.raises(RuntimeError, match="boom"):
        read_job_result(str(tmp_path / "job"))
    (log_dir / METRICS_FILE).write_text(json.dumps({"status": "completed", "job_kind": "unlearn"}))
    with pytest.raises(RuntimeError, match="model file"):
        read_job_result(str(tmp_path / "job"))
