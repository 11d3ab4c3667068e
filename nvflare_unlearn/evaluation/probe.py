"""Linear probe: is the forgotten class still linearly separable in the model's penultimate features?

Output-level tricks (resetting the classifier row, suppressing a logit) reach 0 % forget-class accuracy while
the features still encode the class; a probe on the features the classifier reads catches that. Compare the
result with the retrained model's: retraining never saw the class, so its separability is the floor that
genuinely "forgotten" features should reach (generic features still separate a class somewhat).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from nvflare_unlearn.evaluation.stats import auc_ci
from nvflare_unlearn.models import final_linear_name
from nvflare_unlearn.runtime.batches import as_tensors

__all__ = ["final_linear_name", "forward_outputs", "linear_probe", "linear_probe_features", "penultimate_features"]


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def forward_outputs(
    model: nn.Module, data: Any, feature_layer: str | None = None, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [N, D] float32, logits [N, K] float32, labels [N]) from ONE eval-mode pass over ``data``.

    Features are the input of ``feature_layer`` (default: the final Linear), captured by a forward pre-hook; the
    model's mode and hooks are restored. Every per-example test (probe, attacks, saved arrays) reads these.
    """
    name = feature_layer or final_linear_name(model)
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"feature_layer {name!r} is not a module of the model")
    dev = _device_of(model)
    x, y = as_tensors(data)
    chunks: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        chunks.append(torch.flatten(inputs[0], 1).detach().float().cpu())

    handle = modules[name].register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, x.shape[0], batch_size):
            logits.append(model(x[s : s + batch_size].to(dev)).detach().float().cpu())
    finally:
        handle.remove()
        model.train(was_training)
    if not chunks:
        raise ValueError("data is empty")
    return torch.cat(chunks).numpy(), torch.cat(logits).numpy(), y.cpu().numpy()


def penultimate_features(
    model: nn.Module, data: Any, feature_layer: str | None = None, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float32, labels [N]) captured by a forward pre-hook on `feature_layer`'s input.

    Default layer: the final Linear. The model runs in eval mode; its mode and hooks are restored.
    """
    feats, _logits, labels = forward_outputs(model, data, feature_layer, batch_size)
    return feats, labels


def linear_probe(
    model: nn.Module,
    train_ds: Any,
    test_ds: Any,
    forget_classes: int | Iterable[int],
    feature_layer: str | None = None,
    C: float = 1.0,
    max_iter: int = 2000,
    seed: int = 0,
    control_classes: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Fit standardised logistic regression "forget class vs rest" on probe-train features; score probe-test.

    Returns balanced accuracy (chance 0.5) and ROC AUC (chance 0.5) on probe-test, plus the sizes used.
    Class weights are balanced so a probe cannot score well by always answering "rest".

    `control_classes` (retained classes) get the same one-vs-rest probe on the same features. A generally
    weaker feature extractor (heavy pruning, short fine-tuning) lowers every class's AUC; forgetting lowers the
    forget class's alone. `control_auc_mean` and `auc_minus_control` let a reader tell the two apart.
    """
    f_tr, y_tr = penultimate_features(model, train_ds, feature_layer)
    f_te, y_te = penultimate_features(model, test_ds, feature_layer)
    return linear_probe_features(f_tr, y_tr, f_te, y_te, forget_classes, C, max_iter, seed, control_classes)


def linear_probe_features(
    f_tr: np.ndarray,
    y_tr: np.ndarray,
    f_te: np.ndarray,
    y_te: np.ndarray,
    forget_classes: int | Iterable[int],
    C: float = 1.0,
    max_iter: int = 2000,
    seed: int = 0,
    control_classes: Iterable[int] | None = None,
    n_boot: int = 0,
) -> dict[str, Any]:
    """``linear_probe`` on features already computed (``forward_outputs``), so one forward pass serves every test.

    ``n_boot > 0`` adds a bootstrap interval of the AUC (``auc_low`` / ``auc_high``, probe-test images resampled
    within each group; the probe itself is not refitted).
    """
    forget = (
        [int(forget_classes)] if isinstance(forget_classes, (int, np.integer)) else [int(c) for c in forget_classes]
    )
    if not forget:
        raise ValueError("forget_classes must name at least one class")
    controls = [int(c) for c in control_classes] if control_classes is not None else []
    if set(controls) & set(forget):
        raise ValueError(f"control_classes {controls} overlap forget_classes {forget}")
    out: dict[str, Any] = _one_vs_rest(f_tr, y_tr, f_te, y_te, forget, C, max_iter, seed, n_boot)
    out.update(n_train=int(y_tr.size), n_test=int(y_te.size), feature_dim=int(f_tr.shape[1]))
    if controls:
        ctrl = {c: _one_vs_rest(f_tr, y_tr, f_te, y_te, [c], C, max_iter, seed)["auc"] for c in controls}
        out["control_auc"] = {str(c): a for c, a in ctrl.items()}
        out["control_auc_mean"] = float(np.mean(list(ctrl.values())))
        out["auc_minus_control"] = out["auc"] - out["control_auc_mean"]
    return out


def _one_vs_rest(
    f_tr: np.ndarray,
    y_tr: np.ndarray,
    f_te: np.ndarray,
    y_te: np.ndarray,
    positive: list[int],
    C: float,
    max_iter: int,
    seed: int,
    n_boot: int = 0,
) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    b_tr, b_te = np.isin(y_tr, positive), np.isin(y_te, positive)
    for what, b in (("probe-train", b_tr), ("probe-test", b_te)):
        if b.all() or not b.any():
            raise ValueError(f"{what} set must hold both samples of classes {positive} and other samples")
    clf = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced", random_state=seed),
    )
    clf.fit(f_tr, b_tr.astype(int))
    score = clf.decision_function(f_te)
    pred = (score > 0).astype(int)
    out = {
        "balanced_accuracy": float(balanced_accuracy_score(b_te.astype(int), pred)),
        "auc": float(roc_auc_score(b_te.astype(int), score)),
    }
    if n_boot:
        ci = auc_ci(score[b_te], score[~b_te], n_boot=n_boot, seed=seed)
        out.update(auc_low=ci["low"], auc_high=ci["high"])
    return out
