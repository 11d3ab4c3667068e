"""Membership inference with its POWER reported, and the forget-class control.

Two attacks, both black-box on the model's outputs:
- ``loss``: the loss-threshold attack of Yeom et al. (2018), "Privacy Risk in Machine Learning: Analyzing the
  Connection to Overfitting" (CSF): a sample is called a member when its cross-entropy loss is below a
  threshold. The threshold is calibrated on one half of (retained members, non-members) and evaluated on the
  other half, so the reported power is out of sample.
- ``mlp``: the paper's reference variant (its released code, after Shokri et al. 2017): an MLP trained on the
  model's softmax outputs (sorted, so it is label-agnostic) of retained members vs non-members.

Power = balanced accuracy on held-out retained members vs non-members: if it is near 0.5 the attack cannot see
membership at all, and a "success rate" on forget-class samples would only echo whether the model still
predicts the class. The control asks the question that matters: can the attack tell forget-class TRAINING
images (members of the original model) from forget-class TEST images? A model that truly forgot the class
(like one retrained without it) should leave that at chance (0.5).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nvflare_unlearn.evaluation.data import as_tensors

__all__ = ["membership_inference", "model_outputs", "ATTACKS"]

ATTACKS = ("loss", "mlp")


@torch.no_grad()
def model_outputs(model: nn.Module, data: Any, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(softmax [N, K], per-example cross-entropy loss [N]) in eval mode; the model's mode is restored."""
    dev = next(model.parameters()).device
    x, y = as_tensors(data)
    probs, losses = [], []
    was_training = model.training
    model.eval()
    try:
        for s in range(0, x.shape[0], batch_size):
            logits = model(x[s : s + batch_size].to(dev)).float()
            yb = y[s : s + batch_size].to(dev)
            probs.append(F.softmax(logits, 1).double().cpu())
            losses.append(F.cross_entropy(logits, yb, reduction="none").double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(losses).numpy()


def _balanced_halves(n_pos: int, n_neg: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Equal-size random samples of both sets, each cut in two halves: (pos_a, pos_b, neg_a, neg_b)."""
    n = min(n_pos, n_neg)
    if n < 4:
        raise ValueError(f"membership inference needs at least 4 samples in each set, got {n_pos} and {n_neg}")
    pos, neg = rng.permutation(n_pos)[:n], rng.permutation(n_neg)[:n]
    h = n // 2
    return pos[:h], pos[h:], neg[:h], neg[h:]


def _best_threshold(score_pos: np.ndarray, score_neg: np.ndarray) -> float:
    """Threshold on `score` (member if score >= t) that maximises balanced accuracy on the given sets."""
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(score_pos.size), np.zeros(score_neg.size)]
    fpr, tpr, thr = roc_curve(y, np.r_[score_pos, score_neg])
    best = int(np.argmax(tpr - fpr))
    return float(min(thr[best], np.finfo(np.float64).max))


def _score_eval(pred_pos: np.ndarray, pred_neg: np.ndarray, s_pos: np.ndarray, s_neg: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    acc = 0.5 * (float(np.mean(pred_pos)) + float(np.mean(~pred_neg)))
    auc = float(roc_auc_score(np.r_[np.ones(s_pos.size), np.zeros(s_neg.size)], np.r_[s_pos, s_neg]))
    return {"accuracy": acc, "auc": auc}


def _mlp_features(probs: np.ndarray) -> np.ndarray:
    srt = -np.sort(-probs, axis=1)
    return np.log(np.clip(srt, 1e-12, 1.0))


def membership_inference(
    model: nn.Module,
    members_ds: Any,
    nonmembers_ds: Any,
    forget_train_ds: Any,
    forget_test_ds: Any,
    attacks: tuple[str, ...] = ATTACKS,
    seed: int = 0,
) -> dict[str, Any]:
    """Run each attack; return per attack its power (retained members vs non-members, held-out half) and control.

    Keys per attack: ``power_accuracy``, ``power_auc`` (held-out retained members vs non-members);
    ``forget_accuracy``, ``forget_auc`` (the retained-calibrated attack applied to forget-class train vs test:
    0.5 = no membership signal left); ``forget_train_member_rate`` (the paper's "success": share of forget-class
    training images judged members) and ``forget_test_member_rate`` (the same on never-seen forget-class images,
    the baseline that success must be read against). The ``loss`` attack adds ``forget_selfcal_accuracy``: a
    threshold calibrated on half of the forget-class train/test sets themselves, tested on the other half (the
    strongest version of the control).
    """
    for a in attacks:
        if a not in ATTACKS:
            raise ValueError(f"unknown attack {a!r}; choose from {ATTACKS}")
    rng = np.random.default_rng(seed)
    p_m, l_m = model_outputs(model, members_ds)
    p_n, l_n = model_outputs(model, nonmembers_ds)
    p_ft, l_ft = model_outputs(model, forget_train_ds)
    p_fe, l_fe = model_outputs(model, forget_test_ds)
    ma, mb, na, nb = _balanced_halves(l_m.size, l_n.size, rng)
    fta, ftb, fea, feb = _balanced_halves(l_ft.size, l_fe.size, rng)
    ft_all, fe_all = np.r_[fta, ftb], np.r_[fea, feb]
    out: dict[str, Any] = {
        "n_power_eval": int(mb.size + nb.size),
        "n_forget_eval": int(ft_all.size + fe_all.size),
        "mean_loss": {
            "members": float(l_m.mean()),
            "nonmembers": float(l_n.mean()),
            "forget_train": float(l_ft.mean()),
            "forget_test": float(l_fe.mean()),
        },
    }
    if "loss" in attacks:
        s_m, s_n, s_ft, s_fe = -l_m, -l_n, -l_ft, -l_fe  # lower loss -> more likely a member
        t = _best_threshold(s_m[ma], s_n[na])
        power = _score_eval(s_m[mb] >= t, s_n[nb] >= t, s_m[mb], s_n[nb])
        ctrl = _score_eval(s_ft[ft_all] >= t, s_fe[fe_all] >= t, s_ft[ft_all], s_fe[fe_all])
        t_self = _best_threshold(s_ft[fta], s_fe[fea])
        selfcal = _score_eval(s_ft[ftb] >= t_self, s_fe[feb] >= t_self, s_ft[ftb], s_fe[feb])
        out["loss"] = {
            "reference": "Yeom et al. 2018 loss-threshold attack",
            "threshold_loss": float(-t),
            "power_accuracy": power["accuracy"],
            "power_auc": power["auc"],
            "forget_accuracy": ctrl["accuracy"],
            "forget_auc": ctrl["auc"],
            "forget_train_member_rate": float(np.mean(s_ft[ft_all] >= t)),
            "forget_test_member_rate": float(np.mean(s_fe[fe_all] >= t)),
            "forget_selfcal_accuracy": selfcal["accuracy"],
        }
    if "mlp" in attacks:
        from sklearn.neural_network import MLPClassifier

        f_m, f_n, f_ft, f_fe = (_mlp_features(p) for p in (p_m, p_n, p_ft, p_fe))
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed, early_stopping=True)
        clf.fit(np.r_[f_m[ma], f_n[na]], np.r_[np.ones(ma.size), np.zeros(na.size)])
        prob = lambda f: clf.predict_proba(f)[:, 1]  # noqa: E731
        sm, sn, sft, sfe = prob(f_m[mb]), prob(f_n[nb]), prob(f_ft[ft_all]), prob(f_fe[fe_all])
        power = _score_eval(sm >= 0.5, sn >= 0.5, sm, sn)
        ctrl = _score_eval(sft >= 0.5, sfe >= 0.5, sft, sfe)
        out["mlp"] = {
            "reference": "MLP on sorted softmax outputs (the paper's released-code attack, after Shokri et al. 2017)",
            "power_accuracy": power["accuracy"],
            "power_auc": power["auc"],
            "forget_accuracy": ctrl["accuracy"],
            "forget_auc": ctrl["auc"],
            "forget_train_member_rate": float(np.mean(sft >= 0.5)),
            "forget_test_member_rate": float(np.mean(sfe >= 0.5)),
        }
    return out
