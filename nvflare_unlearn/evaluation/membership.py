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

Array-level attacks (per-example losses, logits or features in, numbers out), so that saved arrays
(``evaluation.artifacts``) can be attacked again offline and a federated verification can reuse them:

- ``membership_auc(losses_in, losses_out)``: the threshold-free loss attack, AUC with a bootstrap interval and
  TPR at 1 % FPR;
- ``loss_attack_power(losses_in, losses_out)``: the loss threshold calibrated on one half, accuracy on the other
  (the attack's POWER when the groups are retained members vs non-members);
- ``lira_offline(...)``: offline LiRA (Carlini et al., S&P 2022) with reference models that never saw the queried
  images: for class unlearning the retrained models are exactly such "out" references for every forget-class
  image, so each image's difficulty is calibrated by how models that never saw it score it;
- ``feature_membership_attack(features_in, features_out)``: a cross-validated logistic-regression shadow classifier
  on penultimate features. It reads the features, not the outputs, so output-level hiding (a reset classifier row,
  a suppressed logit) cannot pass it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from nvflare_unlearn.evaluation.stats import auc_ci, tpr_at_fpr
from nvflare_unlearn.runtime.batches import as_tensors

__all__ = [
    "ATTACKS",
    "feature_membership_attack",
    "lira_offline",
    "logit_confidence",
    "loss_attack_power",
    "membership_auc",
    "membership_inference",
    "model_outputs",
]

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


# ------------------------------------------------------------------------------------------ array-level attacks
def _vector(name: str, values: Any) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size < 2:
        raise ValueError(f"{name} needs at least 2 values, got {a.size}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds non-finite values")
    return a


def membership_auc(
    losses_in: Any, losses_out: Any, n_boot: int = 1000, seed: int = 0, fpr: float = 0.01
) -> dict[str, Any]:
    """Threshold-free loss attack: how often a member (``losses_in``) has a LOWER loss than a non-member.

    Returns ``auc`` with its bootstrap interval (``low``, ``high``), ``tpr_at_fpr`` (at ``fpr``, default 1 %),
    the group sizes and mean losses. 0.5 = no membership signal; for forget-class training vs test images of a
    model retrained without the class, that is what a forgotten class should show.
    """
    li, lo = _vector("losses_in", losses_in), _vector("losses_out", losses_out)
    ci = auc_ci(-li, -lo, n_boot=n_boot, seed=seed)
    return {
        **ci,
        "tpr_at_fpr": tpr_at_fpr(-li, -lo, fpr),
        "fpr": fpr,
        "mean_loss_in": float(li.mean()),
        "mean_loss_out": float(lo.mean()),
    }


def loss_attack_power(losses_in: Any, losses_out: Any, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """The Yeom et al. loss threshold, calibrated on a random half of each group and scored on the other half.

    ``accuracy`` is the balanced accuracy on the held-out halves (chance 0.5): with retained members vs
    non-members it is the attack's POWER (an attack below ~0.6 decides nothing about forgetting). ``auc`` (with
    its interval) is threshold-free, on all samples.
    """
    li, lo = _vector("losses_in", losses_in), _vector("losses_out", losses_out)
    rng = np.random.default_rng(seed)
    ia, ib, oa, ob = _balanced_halves(li.size, lo.size, rng)
    t = _best_threshold(-li[ia], -lo[oa])
    acc = 0.5 * (float(np.mean(-li[ib] >= t)) + float(np.mean(-lo[ob] < t)))
    return {
        "accuracy": acc,
        "threshold_loss": float(-t),
        "n_eval": int(ib.size + ob.size),
        **membership_auc(li, lo, n_boot=n_boot, seed=seed),
    }


def logit_confidence(logits: Any, labels: Any) -> np.ndarray:
    """LiRA's per-example statistic: the logit-scaled true-class probability ``log(p_y / (1 - p_y))``.

    Computed stably from the logits as ``z_y - logsumexp_{j != y} z_j``; unlike the probability it is roughly
    Gaussian across models, which is what the likelihood-ratio test assumes.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if z.ndim != 2 or z.shape[0] != y.size:
        raise ValueError(f"logits must be [N, K] with N = len(labels), got {z.shape} and {y.size} labels")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in 0..{z.shape[1] - 1}")
    zy = z[np.arange(y.size), y]
    rest = z.copy()
    rest[np.arange(y.size), y] = -np.inf
    m = rest.max(axis=1, keepdims=True)
    return zy - (m[:, 0] + np.log(np.exp(rest - m).sum(axis=1)))


def lira_offline(
    target_in: Any,
    target_out: Any,
    refs_in: Any,
    refs_out: Any,
    per_example_variance: bool = False,
    fpr: float = 0.01,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Offline LiRA (Carlini et al., S&P 2022, "Membership Inference Attacks From First Principles").

    ``target_in`` / ``target_out``: the target model's ``logit_confidence`` on candidate members (e.g. forget-class
    TRAINING images) and on non-members (forget-class TEST images). ``refs_in`` / ``refs_out``: [R, n] the same
    statistic of R reference models that saw NONE of these images (for class unlearning: models retrained without
    the class). Each image's score is ``(phi_target - mu_out(image)) / sigma``: how much more confident the target
    is than models that never saw it. ``sigma`` is one pooled scale by default (the "fixed variance" variant,
    right for few references; with one reference the ranking is that of ``phi_target - phi_ref``), or
    per image with ``per_example_variance`` (needs >= 2 references).

    Returns ``auc`` with its bootstrap interval, ``tpr_at_fpr`` at ``fpr`` (default 1 %), ``n_refs`` and the
    per-image ``scores_in`` / ``scores_out`` (for saving).
    """
    ti, to = _vector("target_in", target_in), _vector("target_out", target_out)
    ri = np.atleast_2d(np.asarray(refs_in, dtype=np.float64))
    ro = np.atleast_2d(np.asarray(refs_out, dtype=np.float64))
    if ri.shape[1] != ti.size or ro.shape[1] != to.size or ri.shape[0] != ro.shape[0] or ri.shape[0] < 1:
        raise ValueError(
            f"refs_in / refs_out must be [R, n] with R >= 1 and n matching the target's ({ti.size}, {to.size}), "
            f"got {ri.shape} and {ro.shape}"
        )
    if not (np.all(np.isfinite(ri)) and np.all(np.isfinite(ro))):
        raise ValueError("reference statistics hold non-finite values")
    n_refs = ri.shape[0]
    if per_example_variance and n_refs < 2:
        raise ValueError("per_example_variance needs at least 2 reference models")
    mu_i, mu_o = ri.mean(axis=0), ro.mean(axis=0)
    if n_refs >= 2:
        var_i, var_o = ri.var(axis=0, ddof=1), ro.var(axis=0, ddof=1)
        pooled = float(np.sqrt(np.mean(np.r_[var_i, var_o])))
        pooled = pooled if pooled > 0 else 1.0
        if per_example_variance:
            floor = 0.1 * pooled  # an image all references agree on must not get an infinite score
            sd_i, sd_o = np.maximum(np.sqrt(var_i), floor), np.maximum(np.sqrt(var_o), floor)
        else:
            sd_i = sd_o = pooled
    else:
        pooled, sd_i, sd_o = 1.0, 1.0, 1.0
    s_in, s_out = (ti - mu_i) / sd_i, (to - mu_o) / sd_o
    return {
        "reference": "offline LiRA, Carlini et al. S&P 2022 (out references only)",
        **auc_ci(s_in, s_out, n_boot=n_boot, seed=seed),
        "tpr_at_fpr": tpr_at_fpr(s_in, s_out, fpr),
        "fpr": fpr,
        "n_refs": int(n_refs),
        "variance": "per_example" if per_example_variance else "global",
        "sigma_pooled": pooled,
        "scores_in": s_in,
        "scores_out": s_out,
    }


def feature_membership_attack(
    features_in: npt.ArrayLike,
    features_out: npt.ArrayLike,
    folds: int = 5,
    C: float = 1.0,
    n_boot: int = 1000,
    seed: int = 0,
    fpr: float = 0.01,
) -> dict[str, Any]:
    """A shadow classifier on penultimate features: can members be told from non-members by what the model
    computes internally, whatever its output says?

    Standardised logistic regression (balanced class weights) on the features plus their L2 norm, scored
    out-of-fold with ``folds``-fold stratified cross-validation, so every image is scored by a classifier that
    did not see it. Returns ``auc`` with its bootstrap interval, ``balanced_accuracy`` (at the classifier's own
    threshold) and ``tpr_at_fpr``. 0.5 = the features carry no membership signal.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fi = np.asarray(features_in, dtype=np.float64)
    fo = np.asarray(features_out, dtype=np.float64)
    if fi.ndim != 2 or fo.ndim != 2 or fi.shape[1] != fo.shape[1]:
        raise ValueError(f"features must be [n, D] arrays of equal D, got {fi.shape} and {fo.shape}")
    if min(fi.shape[0], fo.shape[0]) < folds or folds < 2:
        raise ValueError(f"need folds >= 2 and at least {folds} samples per group, got {fi.shape[0]}, {fo.shape[0]}")
    if not (np.all(np.isfinite(fi)) and np.all(np.isfinite(fo))):
        raise ValueError("features hold non-finite values")
    x = np.concatenate([fi, fo])
    x = np.concatenate([x, np.linalg.norm(x, axis=1, keepdims=True)], axis=1)
    y = np.r_[np.ones(fi.shape[0]), np.zeros(fo.shape[0])].astype(int)
    scores = np.empty(y.size)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(C=C, max_iter=2000, class_weight="balanced", random_state=seed)
        )
        clf.fit(x[tr], y[tr])
        scores[te] = clf.decision_function(x[te])
    s_in, s_out = scores[y == 1], scores[y == 0]
    return {
        "reference": "cross-validated logistic regression on penultimate features (+ norm)",
        **auc_ci(s_in, s_out, n_boot=n_boot, seed=seed),
        "balanced_accuracy": 0.5 * (float(np.mean(s_in > 0)) + float(np.mean(s_out <= 0))),
        "tpr_at_fpr": tpr_at_fpr(s_in, s_out, fpr),
        "fpr": fpr,
        "folds": int(folds),
    }
