"""One per-class unlearning step for every caller: centralized, the NVFlare controller and the benchmark.

Mask mode keeps pruned channels in the model (held at zero), remove mode cuts them out; scored the same way (on the
channels still present), both must choose the same channels class after class. Before ``unlearning_step`` existed,
the federated mask path scored the full-width masked means, so the zeroed channels moved the IDF thresholds and
``tf_norm="width"`` used the original widths: these tests fail on that code.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from core_helpers import trained_digits_cnn
from torch.utils.data import DataLoader

from nvflare_unlearn import apply_pruning_plan, save_checkpoint, unlearn_centralized
from nvflare_unlearn.data import load_dataset
from nvflare_unlearn.evaluation import as_tensors
from nvflare_unlearn.evaluation.baselines import PruneOptions, federated_pruning_plan
from nvflare_unlearn.evaluation.fedsim import Federation
from nvflare_unlearn.fl.site_data import load_site_split
from nvflare_unlearn.method.graph import conv_channels
from nvflare_unlearn.method.unlearning import unlearning_step
from nvflare_unlearn.models import build_model
from nvflare_unlearn.options import PlanOptions, ScoringOptions

FORGET = [0, 5]
SCORING = ScoringOptions(tf_norm="width", aggregation="mean")  # the paper's exact mean, what every caller computes
PLAN = PlanOptions(prune_ratio=0.2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _units(plan) -> dict[str, list[int]]:
    return {k: v for k, v in plan.pruned_units().items() if v}


def _random_means(model, rng, k=10):
    return {n: rng.random((k, c)) * (rng.random(c) > 0.2) for n, c in conv_channels(model).items()}


@pytest.mark.parametrize("tf_norm", ["share", "width"])
def test_mask_and_remove_choose_the_same_channels_on_the_same_statistics(tf_norm):
    """Second step: the masked model's means (zeros at masked channels) vs the removed model's (those cut out)."""
    rng = np.random.default_rng(0)
    model = build_model("resnet20", 10)
    scoring = ScoringOptions(tf_norm=tf_norm)
    first = unlearning_step(model, _random_means(model, rng), 0, scoring, PLAN)
    masked = apply_pruning_plan(copy.deepcopy(model), first, mode="mask")
    removed = apply_pruning_plan(copy.deepcopy(model), first, mode="remove")
    full = _random_means(model, rng)
    kept = first.kept_channels()
    full_masked = {n: np.where(np.isin(np.arange(a.shape[1]), kept[n]), a, 0.0) for n, a in full.items()}
    current = {n: a[:, kept[n]] for n, a in full.items()}
    via_mask = unlearning_step(masked, full_masked, 5, scoring, PlanOptions(prune_ratio=0.2, prune_mode="mask"), first)
    via_remove = unlearning_step(removed, current, 5, scoring, PLAN, first)
    assert _units(via_mask) == _units(via_remove)
    assert via_mask.steps[-1]["pruned"] == via_remove.steps[-1]["pruned"]


def test_a_class_without_samples_cannot_be_scored():
    model = build_model("small_cnn", 10)
    counts = np.ones(10, dtype=int)
    counts[3] = 0
    with pytest.raises(ValueError, match="no sample of forget class 3"):
        unlearning_step(model, _random_means(model, np.random.default_rng(1)), 3, SCORING, PLAN, class_counts=counts)


def test_deep_fraction_keeps_the_step_in_the_deepest_layers():
    model = build_model("resnet20", 10)
    plan = unlearning_step(
        model,
        _random_means(model, np.random.default_rng(2)),
        1,
        SCORING,
        PlanOptions(prune_ratio=0.05, deep_fraction=1 / 3),
    )
    convs = list(conv_channels(model))
    deep = set(convs[-round(len(convs) / 3) :])
    touched = {n for n, idx in plan.pruned_channels().items() if idx}
    assert touched and all(any(m in deep for g in plan.groups if n in g for m in g) for n in touched)
    assert plan.steps[-1]["options"]["deep_fraction"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------ the three callers, one job
def _digits_train():
    return load_dataset("digits", split="train")


def _centralized(model, mode: str):
    loader = DataLoader(_digits_train(), batch_size=64)
    _, plan = unlearn_centralized(
        copy.deepcopy(model), "small_cnn", loader, 10, FORGET, PLAN.prune_ratio, tf_norm=SCORING.tf_norm, mode=mode
    )
    return plan


def _benchmark(model, mode: str):
    """The benchmark's in-process federation: the same two site slices the NVFlare executor loads."""
    slices = [load_site_split(f"site-{i}", "train", {"num_clients": 2}) for i in (1, 2)]
    xs, ys = zip(*(as_tensors(s) for s in slices))
    x, y = torch.cat(xs), torch.cat(ys)
    bounds = np.cumsum([0] + [len(s) for s in slices])
    fed = Federation(x, y, [np.arange(bounds[i], bounds[i + 1]) for i in range(2)], 10)
    opts = PruneOptions(plan=PlanOptions(prune_ratio=PLAN.prune_ratio, prune_mode=mode), scoring=SCORING)
    _, plan, _ = federated_pruning_plan(copy.deepcopy(model), fed, [0, 1], FORGET, opts)
    return plan


@pytest.fixture(scope="module")
def model():
    return trained_digits_cnn()


def test_centralized_and_benchmark_callers_agree_in_both_modes(model):
    plans = {
        (who, mode): fn(model, mode)
        for who, fn in (("central", _centralized), ("benchmark", _benchmark))
        for mode in ("remove", "mask")
    }
    reference = _units(plans[("central", "remove")])
    assert len(plans[("central", "remove")].steps) == len(FORGET)
    for key, plan in plans.items():
        assert _units(plan) == reference, key


@pytest.mark.sim
def test_federated_jobs_in_mask_and_remove_mode_prune_what_the_other_callers_prune(model, tmp_path):
    """Two real NVFlare simulator jobs (2 sites, forget 0 and 5, width TF): the same channels as in-process."""
    from nvflare.recipe.sim_env import SimEnv

    from nvflare_unlearn.fl import UnlearningRecipe, quiet_log_config, read_job_result
    from nvflare_unlearn.method.plan import PruningPlan

    ckpt = tmp_path / "trained.pt"
    save_checkpoint(ckpt, model, None, "small_cnn", 10)
    units = {}
    for mode in ("remove", "mask"):
        recipe = UnlearningRecipe(
            name=f"step_{mode}",
            model="small_cnn",
            num_classes=10,
            in_channels=1,
            initial_ckpt=str(ckpt),
            forget_classes=FORGET,
            scoring=SCORING,
            plan=PlanOptions(prune_ratio=PLAN.prune_ratio, prune_mode=mode),
            num_rounds=0,
            num_clients=2,
            tensorboard=False,
        )
        env = SimEnv(
            num_clients=2,
            num_threads=2,
            workspace_root=str(tmp_path / mode),
            log_config=quiet_log_config(str(tmp_path / mode)),
        )
        result = read_job_result(recipe.execute(env).get_result())
        with open(result.plan_path) as f:
            units[mode] = _units(PruningPlan.from_json(f.read()))
    assert units["mask"] == units["remove"]
    assert units["remove"] == _units(_centralized(model, "remove")) == _units(_benchmark(model, "remove"))
