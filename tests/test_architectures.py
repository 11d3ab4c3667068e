"""Pruning any architecture: concatenation + BatchNorm, depthwise and grouped convs, residual adds, multi-branch heads.

Property: for random score sets, ratios, scopes and directions on every model of ``arch_zoo``, a plan is built,
applied, run, and replayed from its JSON on a fresh model with identical architecture and outputs. The removed
model computes what the masked original computes (mask mode zeroes exactly the slices removal cuts), so the right
channels went, not just some channels. Channels that cannot be removed safely are excluded with a reason, and the
exclusions are exactly the expected ones. A few seeds per model run by default; many behind ``-m slow``.
"""

from __future__ import annotations

import copy
import json

import arch_zoo
import numpy as np
import pytest
import torch
import torch.nn as nn
from core_helpers import randomize_bn

from nvflare_unlearn.method.graph import analyse_structure, conv_channels
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.method.prune import apply_pruning_plan, plan_summary
from nvflare_unlearn.method.selection import build_pruning_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FACTORIES = {**arch_zoo.HAND_MADE, **arch_zoo.TORCHVISION}

_GROUPED_MULT = "grouped conv 'mult.0' (groups=24"
_GROUPED = "grouped conv 'grouped.0' (groups=4"
_AUX1, _AUX2 = "also feed ['aux1.conv.conv'] that run only in train mode", "also feed ['aux2.conv.conv']"
#: conv -> a phrase of the reason it is excluded; every other conv of the model must be prunable.
EXPECTED_EXCLUDED: dict[str, dict[str, str]] = {
    "concat": {},
    "depthwise": {
        "input_dw": "depthwise conv 'input_dw' reads the model input",
        "bridge.0": _GROUPED_MULT,
        "mult.0": _GROUPED_MULT,
        "pw2.0": _GROUPED,
        "grouped.0": _GROUPED,
    },
    "multi_head": {},
    "odd": {
        "stem.0": "'twice' is called 2 times per forward (shared weights)",
        "twice": "'twice' is called 2 times per forward (shared weights)",
        "fixed.0": "breaks the forward pass in eval mode (RuntimeError: shape '[-1, 16]' is invalid",
        "classifier": "channels of the model's output",
    },
    "resnet18": {},
    "mobilenet_v2": {},
    "densenet121": {},
    "googlenet": {
        **{f"inception4a.{b}.conv": _AUX1 for b in ("branch1", "branch2.1", "branch3.1", "branch4.1")},
        **{f"inception4d.{b}.conv": _AUX2 for b in ("branch1", "branch2.1", "branch3.1", "branch4.1")},
        "aux1.conv.conv": "not used by the eval-mode forward pass",
        "aux2.conv.conv": "not used by the eval-mode forward pass",
    },
}


def _model(name: str, seed: int) -> nn.Module:
    """The zoo model with a seeded init and trained-like BatchNorm statistics (so every channel matters)."""
    torch.manual_seed(seed)
    return randomize_bn(FACTORIES[name](num_classes=10), seed)


def _scores(model: nn.Module, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random scores of one of three kinds: uniform, coarse (many ties), or signed heavy-tailed."""
    kind = rng.integers(3)
    out = {}
    for name, width in conv_channels(model).items():
        s = rng.random(width)
        out[name] = np.round(s, 1) if kind == 1 else (rng.standard_cauchy(width) if kind == 2 else s)
    return out


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def check_architecture(name: str, seed: int, ratio: float) -> str:
    """plan -> apply -> forward -> JSON replay on a fresh model, for one model, seed and ratio; a one-line report."""
    model = _model(name, seed)
    shape = FACTORIES[name].input_shape
    gen = torch.Generator().manual_seed(seed)
    x, batch = torch.randn(1, *shape, generator=gen), torch.randn(3, *shape, generator=gen)
    rng = np.random.default_rng(seed)
    scope = ("global", "per_layer")[seed % 2]
    direction = ("highest", "lowest")[(seed // 2) % 2]
    steps = 1 + seed % 2  # odd seeds: a second forget class, planned on the model pruned by the first
    options = {"scope": scope, "direction": direction, "example_inputs": x}

    plan = build_pruning_plan(model, _scores(model, rng), ratio, forget_class=0, **options)
    removed = apply_pruning_plan(copy.deepcopy(model), plan, example_inputs=x)
    if steps == 2:
        plan = build_pruning_plan(removed, _scores(removed, rng), ratio, forget_class=1, base_plan=plan, **options)
        apply_pruning_plan(removed, plan, example_inputs=x)

    # every conv is prunable (in exactly one group) or excluded with the expected reason
    convs = conv_channels(model)
    assert sorted(plan.convs) + sorted(plan.excluded) and not set(plan.convs) & set(plan.excluded)
    assert set(plan.convs) | set(plan.excluded) == set(convs)
    assert sorted(n for g in plan.groups for n in g) == sorted(plan.convs)
    expected = EXPECTED_EXCLUDED[name]
    assert sorted(plan.excluded) == sorted(expected), sorted(set(plan.excluded) ^ set(expected))
    for conv, phrase in expected.items():
        assert phrase in plan.excluded[conv], (conv, plan.excluded[conv])

    # the pruned model runs, has the plan's widths, and lost parameters; excluded convs kept theirs
    now = conv_channels(removed)
    assert {n: now[n] for n in plan.convs} == plan.widths()
    assert {n: now[n] for n in plan.excluded} == {n: convs[n] for n in plan.excluded}
    out = _forward(removed, batch)
    assert out.shape == _forward(model, batch).shape and torch.isfinite(out).all()
    params = sum(p.numel() for p in removed.parameters())
    assert params < sum(p.numel() for p in model.parameters())

    # removing the channels computes what zeroing them computes: the channels the plan names went, nothing else
    masked = apply_pruning_plan(copy.deepcopy(model), plan, mode="mask", example_inputs=x)
    reference = _forward(masked, batch)
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max())), float(
        (out - reference).abs().max()
    )

    # JSON replay on a fresh model (its own random init, no example input: the plan's input shape is used)
    fresh = FACTORIES[name](num_classes=10)
    apply_pruning_plan(fresh, PruningPlan.from_json(plan.to_json()))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in removed.state_dict().items()}
    fresh.load_state_dict(removed.state_dict())
    assert torch.equal(_forward(fresh.eval(), batch), out)
    units = sum(len(v) for v in plan.pruned_units().values())
    total = sum(plan.convs[k] for k in plan.group_keys)
    return (
        f"{name} seed={seed} ratio={ratio} scope={scope} direction={direction} steps={steps}: "
        f"{len(plan.groups)} groups, {len(plan.excluded)} convs excluded, {units}/{total} channels pruned, "
        f"params {sum(p.numel() for p in model.parameters()):,} -> {params:,}; replay identical"
    )


# default suite: a few cases per model, one multi-step case each, under a minute on 2 cores
DEFAULT_CASES = [
    *[(n, s, r) for n in arch_zoo.HAND_MADE for s, r in ((0, 0.1), (1, 0.3), (2, 0.5), (3, 0.2))],
    ("resnet18", 0, 0.2),
    ("resnet18", 1, 0.1),
    ("mobilenet_v2", 0, 0.3),
    ("mobilenet_v2", 3, 0.1),
    ("googlenet", 0, 0.2),
    ("googlenet", 1, 0.05),
    ("densenet121", 0, 0.1),
]
SLOW_CASES = [
    (n, s, r)
    for n in FACTORIES
    for s in range(12 if n != "densenet121" else 4)
    for r in (0.05, 0.2, 0.5)
    if (n, s, r) not in DEFAULT_CASES
]


@pytest.mark.parametrize("name, seed, ratio", DEFAULT_CASES)
def test_plan_apply_forward_replay_on_the_zoo(name, seed, ratio):
    print(check_architecture(name, seed, ratio))


@pytest.mark.slow
@pytest.mark.parametrize("name, seed, ratio", SLOW_CASES)
def test_plan_apply_forward_replay_on_the_zoo_many_seeds(name, seed, ratio):
    print(check_architecture(name, seed, ratio))


def test_plan_summary_shows_the_exclusions_with_their_reasons():
    model = _model("depthwise", 0)
    x = torch.randn(1, *arch_zoo.DepthwiseNet.input_shape)
    plan = build_pruning_plan(model, _scores(model, np.random.default_rng(0)), 0.2, example_inputs=x)
    summary = plan_summary(plan, model, example_inputs=x)
    assert summary["excluded"] == plan.excluded and sorted(summary["excluded"]) == sorted(
        EXPECTED_EXCLUDED["depthwise"]
    )
    for conv, why in summary["excluded"].items():
        print(f"depthwise: {conv} excluded: {why}")
    assert json.loads(plan.to_json())["excluded"] == plan.excluded
    # a plan written before exclusions were recorded (no "excluded" key) still reads; the summary then finds them
    old = json.loads(plan.to_json())
    del old["excluded"]
    legacy = PruningPlan.from_json(json.dumps(old))
    assert legacy.excluded is None and legacy.pruned_units() == plan.pruned_units()
    assert plan_summary(legacy, model, example_inputs=x)["excluded"] == plan.excluded
    for bad, message in ((["input_dw"], "must map conv names"), ({"stem.0": "why"}, "both prunable and excluded")):
        with pytest.raises(ValueError, match=message):
            PruningPlan.from_json(json.dumps({**old, "excluded": bad}))


def test_concat_then_batchnorm_keeps_the_right_channels():
    """The issue's case: channels of several branches removed before one BatchNorm over their concatenation. The
    BatchNorm must keep exactly the statistics of the surviving channels, in order."""
    model = _model("concat", 0)
    scores = {n: np.zeros(c) for n, c in conv_channels(model).items()}
    scores["a.0"][[1, 4]] = 1.0  # concat positions 1, 4 (a: 0..5)
    scores["b.0"][[0, 9]] = 1.0  # positions 6, 15 (b: 6..15)
    scores["stem.0"][[2]] = 1.0  # position 18 (stem: 16..23), and the inputs of a and b
    x = torch.randn(1, 3, 16, 16)
    plan = build_pruning_plan(model, scores, 5 / 36, example_inputs=x)  # 36 channels in all
    assert plan.pruned_units() == {"stem.0": [2], "a.0": [1, 4], "b.0": [0, 9], "post.0": []}
    kept = [c for c in range(24) if c not in (1, 4, 6, 15, 18)]
    before = model.norm.running_mean.clone()
    apply_pruning_plan(model, plan, example_inputs=x)
    assert torch.equal(model.norm.running_mean, before[kept])
    assert model.post[0].in_channels == 19 and model.a[0].in_channels == model.b[0].in_channels == 7
    assert _forward(model, torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_a_plan_pruning_an_excluded_conv_is_refused_and_changes_nothing():
    """A hand-edited plan that removes channels of a grouped conv, or of a conv behind a hard-coded view, is refused
    with the reason, and the model is left exactly as it was."""
    for name, conv in (("depthwise", "grouped.0"), ("odd", "fixed.0")):
        model = _model(name, 0)
        x = torch.randn(1, *FACTORIES[name].input_shape)
        plan = build_pruning_plan(model, _scores(model, np.random.default_rng(1)), 0.2, example_inputs=x)
        data = json.loads(plan.to_json())
        data["excluded"].pop(conv)
        data["convs"][conv] = conv_channels(model)[conv]
        data["groups"].append([conv])
        data["steps"][0]["pruned"][conv] = [0, 3]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        widths = conv_channels(model)
        with pytest.raises(ValueError, match="grouped conv 'grouped.0'|breaks the model's forward pass") as info:
            apply_pruning_plan(model, PruningPlan.from_json(json.dumps(data)), example_inputs=x)
        print(f"{name}: {info.value}")
        assert conv_channels(model) == widths
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert _forward(model, torch.randn(1, *FACTORIES[name].input_shape)).shape == (1, 10)


def test_a_model_with_nothing_prunable_says_why():
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # its channels are the output
    with pytest.raises(ValueError, match="no conv channel that can be pruned safely: they are channels of the model"):
        build_pruning_plan(model, {"0": np.ones(10)}, 0.1, example_inputs=torch.randn(1, 3, 8, 8))
    assert analyse_structure(model, torch.randn(1, 3, 8, 8)).excluded == {
        "0": "they are channels of the model's output (e.g. the class scores)"
    }


@pytest.mark.slow
@pytest.mark.sim
@pytest.mark.timeout(1500)
def test_densenet121_by_import_path_unlearns_in_the_simulator(tmp_path):
    """The issue's failing case end to end: torchvision's densenet121 (concatenation, then BatchNorm) given by import
    path to the unlearning job; the server prunes it, the sites replay the plan every round, and the saved model
    rebuilds from the import path + plan alone."""
    from nvflare.recipe.sim_env import SimEnv

    from nvflare_unlearn import load_checkpoint, save_checkpoint
    from nvflare_unlearn.fl import UnlearningRecipe, quiet_log_config, read_job_result
    from nvflare_unlearn.models import build_model

    name = "arch_zoo:DigitsDenseNet"
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "densenet.pt", build_model(name, 10), None, name, 10)
    recipe = UnlearningRecipe(
        name="densenet_unlearn",
        model=name,
        num_classes=10,
        initial_ckpt=str(ckpt),
        forget_classes=[3],
        prune_ratio=0.2,
        num_rounds=1,
        local_epochs=1,
        lr=0.01,
        num_clients=2,
        dataset="digits",
        train_subset=300,
        max_activation_batches=4,
    )
    ws = tmp_path / "ws"
    env = SimEnv(num_clients=2, num_threads=2, workspace_root=str(ws), log_config=quiet_log_config(str(ws)))
    result = read_job_result(recipe.execute(env).get_result())
    m = result.metrics
    print(
        f"densenet121 by import path: params {m['params_before']:,} -> {m['params_after']:,}, "
        f"rounds {m['rounds']}, unlearned U {m['unlearned']['u_acc']:.3f} R {m['unlearned']['r_acc']:.3f}, "
        f"excluded {m['plan_summary']['excluded']}"
    )
    assert m["rounds"] == 1 and m["params_after"] < m["params_before"]
    assert m["plan_summary"]["forget_classes"] == [3] and m["plan_summary"]["excluded"] == {}
    assert sorted(m["unlearned"]["sites"]) == ["site-1", "site-2"]
    for site in ("server", "site-1", "site-2"):
        assert list(ws.glob(f"densenet_unlearn/{site}/simulate_job/app_*/custom/arch_zoo.py")), site
    model, plan, meta = load_checkpoint(result.model_path)
    assert meta["model_name"] == name and plan.forget_classes == [3]
    assert sum(p.numel() for p in model.parameters()) == m["params_after"]
    norm = model.net.features.denseblock1.denselayer2.norm1  # BatchNorm over a concatenation, pruned to match
    assert norm.num_features == model.net.features.denseblock1.denselayer2.conv1.in_channels
    assert _forward(model.eval(), torch.rand(2, 1, 8, 8)).shape == (2, 10)
