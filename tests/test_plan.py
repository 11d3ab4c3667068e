"""Pruning plans: coupled groups, selection rules, original indices across steps, JSON, summaries, errors."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from nvflare_unlearn.method.graph import conv_channels, coupled_groups
from nvflare_unlearn.method.plan import PruningPlan, parse_plan
from nvflare_unlearn.method.prune import apply_pruning_plan, plan_summary
from nvflare_unlearn.method.selection import build_pruning_plan
from nvflare_unlearn.method.tfidf import tfidf_scores
from nvflare_unlearn.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _zeros(model):
    return {n: np.zeros(c) for n, c in conv_channels(model).items()}


def test_resnet20_coupled_groups():
    groups = coupled_groups(build_model("resnet20", 10))
    assert len(groups) == 12  # 3 residual groups + 9 first convs of blocks
    assert groups[0] == ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert groups[5] == ["layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"]
    assert ["layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2", "layer3.2.conv2"] in groups
    assert ["layer2.1.conv1"] in groups  # a block's first conv is coupled to nothing else
    names = [n for g in groups for n in g]
    assert sorted(names) == sorted(conv_channels(build_model("resnet20", 10)))  # every conv exactly once


def test_resnet56_and_vgg_groups():
    r56 = coupled_groups(build_model("resnet56", 10))
    assert len(r56) == 3 + 27 and len(r56[0]) == 10  # stem + 9 conv2 per stage
    vgg = coupled_groups(build_model("vgg11", 10))
    assert vgg == [[n] for n in conv_channels(build_model("vgg11", 10))]


def test_group_score_is_mean_of_members_and_global_ratio():
    model = build_model("resnet20", 10)
    scores = _zeros(model)
    # group 0 (16 channels): conv1 says channel 3 is important, layer1.0.conv2 says channel 5 more so.
    scores["conv1"][3] = 4.0  # mean over 4 members = 1.0
    scores["layer1.0.conv2"][5] = 8.0  # mean = 2.0
    scores["layer2.1.conv1"][7] = 1.5  # singleton group: mean = 1.5
    total = sum(w for g in coupled_groups(model) for w in [conv_channels(model)[g[0]]])
    plan = build_pruning_plan(model, scores, ratio=3 / total, forget_class=4)
    step = plan.steps[0]
    assert step["options"]["units"] == 3 and step["forget_class"] == 4
    assert step["pruned"] == {"conv1": [3, 5], "layer2.1.conv1": [7]}
    pruned = plan.pruned_channels()
    assert pruned["conv1"] == pruned["layer1.2.conv2"] == [3, 5]  # coupled members lose the same channels
    # "lowest" picks from the other end; ties broken by group order then channel index (deterministic)
    low = build_pruning_plan(model, {n: -v for n, v in scores.items()}, ratio=3 / total, direction="lowest")
    assert low.steps[0]["pruned"] == step["pruned"]


def test_per_layer_scope_and_min_channels():
    model = build_model("small_cnn", 10)
    rng = np.random.default_rng(0)
    scores = {n: rng.random(c) for n, c in conv_channels(model).items()}
    plan = build_pruning_plan(model, scores, 0.25, scope="per_layer")
    assert {k: len(v) for k, v in plan.pruned_units().items()} == {"features.0": 4, "features.3": 8, "features.7": 16}
    for name, idx in plan.pruned_units().items():  # the highest scores of each layer
        assert sorted(idx) == sorted(np.argsort(-scores[name])[: len(idx)].tolist())
    # global scope with one layer's scores dominating: min_channels stops it from emptying that layer
    scores["features.0"] += 100.0
    plan = build_pruning_plan(model, scores, 0.25, min_channels=3)
    units = plan.pruned_units()
    assert len(units["features.0"]) == 13 and sum(len(v) for v in units.values()) == round(0.25 * 112)


def test_base_plan_maps_current_indices_to_original_and_keeps_step_size():
    model = build_model("small_cnn", 10)
    rng = np.random.default_rng(1)
    first = build_pruning_plan(model, {n: rng.random(c) for n, c in conv_channels(model).items()}, 0.2, forget_class=1)
    apply_pruning_plan(model, first)
    current = conv_channels(model)
    # second-step scores on the pruned model: make current channel 0 of features.3 the clear winner
    scores = {n: np.zeros(c) for n, c in current.items()}
    scores["features.3"][0] = 1.0
    second = build_pruning_plan(model, scores, 0.2, forget_class=2, base_plan=first)
    assert len(second.steps) == 2 and second.steps[0] == first.steps[0]
    kept_orig = first.kept_channels()["features.3"]
    assert kept_orig[0] in second.steps[1]["pruned"]["features.3"]  # current 0 -> original index
    n1 = sum(len(v) for v in first.steps[0]["pruned"].values())
    n2 = sum(len(v) for v in second.steps[1]["pruned"].values())
    assert n1 == n2 == round(0.2 * 112)  # R counts units of the ORIGINAL model in every step
    for key in second.group_keys:  # never re-prunes a channel
        a = set(first.steps[0]["pruned"].get(key, []))
        assert not a & set(second.steps[1]["pruned"].get(key, []))
    # scores sized for the original model do not fit the pruned one
    with pytest.raises(ValueError, match="current width"):
        build_pruning_plan(model, {n: np.zeros(c) for n, c in first.convs.items()}, 0.2, base_plan=first)
    with pytest.raises(ValueError, match="not in the state base_plan describes"):
        build_pruning_plan(model, scores, 0.2, base_plan=second)


def test_json_round_trip_and_compose():
    model = build_model("resnet20", 10)
    rng = np.random.default_rng(2)
    plan = build_pruning_plan(model, {n: rng.random(c) for n, c in conv_channels(model).items()}, 0.1, forget_class=0)
    text = plan.to_json()
    data = json.loads(text)  # JSON, not pickle
    assert data["format"] == "nvflare_unlearn.pruning_plan" and data["model_name"] == "resnet20"
    back = PruningPlan.from_json(text)
    assert back == plan and back.to_json() == text
    other = PruningPlan(
        convs=plan.convs, groups=plan.groups, steps=[{"forget_class": 1, "pruned": {"layer2.1.conv1": [0]}}]
    )
    if 0 in plan.pruned_units()["layer2.1.conv1"]:
        with pytest.raises(ValueError, match="pruned twice"):
            plan.compose(other)
    else:
        composed = plan.compose(other)
        assert composed.forget_classes == [0, 1] and 0 in composed.pruned_units()["layer2.1.conv1"]
    foreign = build_pruning_plan(build_model("small_cnn", 10), _zeros(build_model("small_cnn", 10)), 0.1)
    with pytest.raises(ValueError, match="different architectures"):
        plan.compose(foreign)


def test_summary_reports_layers_params_and_flops():
    model = build_model("vgg11", 10)
    rng = np.random.default_rng(3)
    plan = build_pruning_plan(model, {n: rng.random(c) for n, c in conv_channels(model).items()}, 0.2)
    s = plan_summary(plan, model)
    assert s["params_before"] == sum(p.numel() for p in model.parameters())
    assert s["params_after"] < s["params_before"] and s["flops_after"] < s["flops_before"]
    assert s["units_pruned"] == round(0.2 * s["units_total"])
    assert sum(v["pruned"] for v in s["layers"].values()) == s["units_pruned"]
    pruned = apply_pruning_plan(copy.deepcopy(model), plan)
    assert plan_summary(plan, pruned)["params_after"] == sum(p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, float("nan"), "0.1", True])
def test_ratio_outside_open_interval(ratio):
    model = build_model("small_cnn", 10)
    with pytest.raises(ValueError, match="ratio"):
        build_pruning_plan(model, _zeros(model), ratio)


def test_bad_scores_and_options():
    model = build_model("small_cnn", 10)
    good = _zeros(model)
    cases = [
        ({**good, "features.99": np.zeros(3)}, {}, r"layer\(s\) the model does not have.*features.99"),
        (
            {k: v for k, v in good.items() if k != "features.3"},
            {},
            r"missing prunable conv layer\(s\) \['features.3'\]",
        ),
        ({**good, "features.3": np.zeros(31)}, {}, r"must have shape \(32,\)"),
        ({**good, "features.3": np.full(32, np.nan)}, {}, "NaN"),
        ({**good, "features.3": np.full(32, np.inf)}, {}, "infinite"),
        ({}, {}, "non-empty"),
        (good, {"scope": "layer"}, "scope"),
        (good, {"direction": "up"}, "direction"),
        (good, {"min_channels": 0}, "min_channels"),
        (good, {"forget_class": "3"}, "forget_class"),
        (good, {"ratio": 0.99, "min_channels": 8}, "lower the ratio"),
    ]
    for scores, kwargs, match in cases:
        kwargs = {"ratio": 0.1, **kwargs}
        with pytest.raises(ValueError, match=match):
            build_pruning_plan(model, scores, **kwargs)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        build_pruning_plan(
            nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), {"x": np.zeros(2)}, 0.1, example_inputs=torch.rand(1, 4)
        )
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        coupled_groups(nn.Sequential(nn.Linear(4, 2)), example_inputs=torch.rand(1, 4))


def test_from_json_rejects_bad_plans():
    model = build_model("small_cnn", 10)
    data = json.loads(build_pruning_plan(model, _zeros(model), 0.1).to_json())

    def mutated(fn):
        d = copy.deepcopy(data)
        fn(d)
        return json.dumps(d)

    cases = [
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "x"}), "not a pruning plan"),
        (mutated(lambda d: d.update(version=99)), "unsupported pruning plan version"),
        (mutated(lambda d: d["steps"][0]["pruned"].update({"features.0": list(range(16))})), "would empty layer"),
        (mutated(lambda d: d["steps"][0]["pruned"].update({"features.0": [16]})), r"outside \[0, 16\)"),
        (mutated(lambda d: d["steps"][0]["pruned"].update({"features.0": [1, 1]})), "pruned twice"),
        (mutated(lambda d: d["steps"][0]["pruned"].update({"nope": [1]})), "unknown group"),
        (mutated(lambda d: d["groups"].append(["ghost"])), "missing from the plan's convs"),
        (mutated(lambda d: d["steps"][0]["pruned"].update({"features.0": [0.5]})), "non-integer"),
    ]
    for text, match in cases:
        with pytest.raises(ValueError, match=match):
            PruningPlan.from_json(text)
        with pytest.raises(ValueError, match=match):  # the boundary parser gives the same messages
            parse_plan(text)


def test_parse_plan_reads_optional_text_once_at_the_boundary():
    model = build_model("small_cnn", 10)
    plan = build_pruning_plan(model, _zeros(model), 0.1)
    assert parse_plan(None) is None and parse_plan("") is None  # no plan: an unpruned model
    assert parse_plan(plan.to_json()).to_dict() == plan.to_dict()
    for value in (b"{}", 3, {"format": "nvflare_unlearn.pruning_plan"}, plan):
        with pytest.raises(ValueError, match="pruning plan must be JSON text, got"):
            parse_plan(value)


def test_resnet56_scoring_plan_and_apply_is_fast():
    model = build_model("resnet56", 10).eval()
    rng = np.random.default_rng(4)
    means = {n: rng.random((10, c)) for n, c in conv_channels(model).items()}
    start = time.perf_counter()
    scores = tfidf_scores(means, 3)
    plan = build_pruning_plan(model, scores, 0.1, forget_class=3)
    apply_pruning_plan(model, plan)
    elapsed = time.perf_counter() - start
    print(f"ResNet56 scoring + plan + apply: {elapsed:.2f}s")
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert elapsed < 10.0  # target 2 s on an idle 2-core machine; generous so it cannot flake under load


# ----------------------------------------------------------------------------------------------- hostile plans
def _valid_plan_dict():
    model = build_model("small_cnn", 10)
    return json.loads(build_pruning_plan(model, _zeros(model), 0.1).to_json())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(groups=[1, 2]),
        lambda d: d.update(groups=[[["x"]]]),
        lambda d: d.update(groups="abc"),
        lambda d: d.update(convs={"a": "b"}),
        lambda d: d.update(convs={"x" * 10_000: 3}),
        lambda d: d.update(convs={f"c{i}": 2 for i in range(5000)}),
        lambda d: d.update(steps=[1]),
        lambda d: d.update(steps={"a": 1}),
        lambda d: d["steps"][0].update(pruned=[1]),
        lambda d: d["steps"][0].update(forget_class="three"),
        lambda d: d["steps"][0].update(options=[]),
        lambda d: d["steps"][0]["pruned"].update({"features.0": list(range(-100_000, 0))}),
        lambda d: d["steps"][0]["pruned"].update({"features.0": "0,1"}),
        lambda d: d["steps"][0]["pruned"].update({"features.0": [[1]]}),
        lambda d: d.update(steps=d["steps"] * 2000),
        lambda d: d.update(input_shape=7),
        lambda d: d.update(input_shape=[1, 60000, 60000]),
        lambda d: d.update(input_shape={"a": 1}),
        lambda d: d.update(original_params="many"),
        lambda d: d.update(original_flops=-1),
        lambda d: d.update(model_name=["x"]),
        lambda d: d.update(convs=None),
        lambda d: d.pop("steps"),
    ],
)
def test_every_malformed_plan_is_a_short_value_error(mutate):
    """Before issue 11 some raised TypeError (a traceback in the CLI) and one message reached 689 kB."""
    data = _valid_plan_dict()
    mutate(data)
    with pytest.raises(ValueError) as exc:
        PruningPlan.from_json(json.dumps(data))
    assert len(str(exc.value)) < 300, str(exc.value)[:400]


def test_random_corruptions_never_escape_as_other_errors():
    text = json.dumps(_valid_plan_dict())
    rng = np.random.default_rng(0)
    for _ in range(300):
        chars = list(text)
        for _ in range(int(rng.integers(1, 6))):
            chars[int(rng.integers(len(chars)))] = chr(int(rng.choice([ord(c) for c in '[]{}":,0123456789-e'])))
        try:
            PruningPlan.from_json("".join(chars))
        except ValueError as exc:
            assert len(str(exc)) < 300
    for text in ("[" * 100_000, "1" * 10_000, b"\xff\xfe", None, 12):
        with pytest.raises(ValueError):
            PruningPlan.from_json(text)
    with pytest.raises(ValueError, match="at most"):
        PruningPlan.from_json(" " * (17 * 1024 * 1024))


def test_parsing_is_linear_in_the_number_of_steps():
    def plan_text(n):
        return json.dumps(
            {
                "format": "nvflare_unlearn.pruning_plan",
                "version": 1,
                "convs": {"a": 4 * n, "b": 4 * n},
                "groups": [["a", "b"]],
                "steps": [{"forget_class": i, "pruned": {"a": [2 * i, 2 * i + 1]}} for i in range(n)],
            }
        )

    def best_of_three(text):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            plan = PruningPlan.from_json(text)
            plan.kept_channels()
            times.append(time.perf_counter() - start)
        return min(times)

    small, large = best_of_three(plan_text(128)), best_of_three(plan_text(1024))  # 8x the steps
    assert large < 30 * small + 0.05, (small, large)  # quadratic would be ~64x
