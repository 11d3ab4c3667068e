"""prune_retarget (issue 22, H5): the registry composes pruning's server phase with retarget's site loss."""

from __future__ import annotations

import copy

import torch
from core_helpers import digits_tensors, loader, trained_digits_cnn

from nvflare_unlearn.unlearning import get_method, parse_variant, site_objective


def test_it_needs_a_plan_forget_data_and_the_teacher_and_spells_a_ratio():
    m = get_method("prune_retarget")
    assert m.prunes and m.uses_forget_data and m.always_distils
    assert parse_variant("prune_retarget@0.2") == {"method": "prune_retarget", "prune_ratio": 0.2, "recovery": "kd"}


def test_its_site_loss_is_retargets_term_and_reports_its_own_name():
    model = trained_digits_cnn()
    xtr, ytr, _, _ = digits_tensors()
    held = ytr == 3
    obj = site_objective({"method": "prune_retarget"}, [3], 10, copy.deepcopy(model), loader(xtr[held], ytr[held], 32))
    ref = site_objective({"method": "retarget"}, [3], 10, copy.deepcopy(model), loader(xtr[held], ytr[held], 32))
    x, y = xtr[~held][:64], ytr[~held][:64]
    with torch.no_grad():
        assert float(obj.batch_loss(model, x, y)) == float(ref.batch_loss(model, x, y))
    assert obj.report()["loss"] == "prune_retarget" and obj.report()["forget_steps"] == 1
