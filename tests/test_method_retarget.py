"""retarget (issue 22, H1): forget-class images are sent where the original model's retained-class ranking sends
them, as retraining does, instead of anywhere the loss is high (NegGrad+)."""

from __future__ import annotations

import copy

import pytest
import torch
from core_helpers import digits_tensors, loader, trained_digits_cnn

from nvflare_unlearn.runtime import train_epochs
from nvflare_unlearn.unlearning import get_method, site_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FORGET = 3


def _unlearn(method: str) -> dict:
    """Two local epochs of ``method`` (with KD) on the trained digits CNN; U, R and where the forget class goes."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_tensors()
    model = trained_digits_cnn()
    teacher = copy.deepcopy(model).eval()
    held = ytr == FORGET
    obj = site_objective({"method": method, "recovery": "kd"}, [FORGET], 10, teacher,
                         loader(xtr[held], ytr[held], 32, shuffle=True))  # fmt: skip
    train_epochs(model, loader(xtr[~held], ytr[~held], 64, shuffle=True), 2, 0.01, loss_fn=obj.batch_loss,
                 before_step=obj.before_step)  # fmt: skip
    model.eval()
    f = yte == FORGET
    with torch.no_grad():
        pred = model(xte[f]).argmax(1)
        second = teacher(xte[f]).index_fill(1, torch.tensor([FORGET]), float("-inf")).argmax(1)
        r_acc = float((model(xte[~f]).argmax(1) == yte[~f]).float().mean())
    return {
        "u_acc": float((pred == FORGET).float().mean()),
        "r_acc": r_acc,
        "follows_original": float((pred == second).float().mean()),
        "report": obj.report(),
    }


def test_retarget_declares_what_it_needs():
    m = get_method("retarget")
    assert m.uses_forget_data and m.always_distils and not m.prunes


def test_retarget_forgets_keeps_the_rest_and_routes_the_class_like_the_original_ranks_it():
    got = _unlearn("retarget")
    assert got["u_acc"] < 0.05 and got["r_acc"] > 0.95, got
    assert got["follows_original"] >= 0.7, got  # the original's choice among the retained classes
    assert got["report"]["loss"] == "retarget" and got["report"]["forget_steps"] == got["report"]["steps"] > 0
    neggrad = _unlearn("neggrad")  # the ascent misroutes more of the class (CoUn, Table 5)
    assert got["follows_original"] > neggrad["follows_original"], (got, neggrad)


def test_retarget_puts_no_target_mass_on_the_forget_class():
    """With the student equal to its teacher, the forget term's gradient lowers the forget logit."""
    model = trained_digits_cnn()
    xtr, ytr, _, _ = digits_tensors()
    xf, yf = xtr[ytr == FORGET][:32], ytr[ytr == FORGET][:32]
    obj = site_objective({"method": "retarget"}, [FORGET], 10, copy.deepcopy(model), [(xf, yf)])
    model.zero_grad()
    get_method("retarget").forget_term(obj, model, xf, yf).backward()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert float(head.bias.grad[FORGET]) > 0  # gradient descent lowers the forget class's bias
