"""The forgetting check every unlearning job ends with, computed at the sites on their own data from aggregates.

Two questions, each answered without any image, label or per-example value leaving a site:

1. **Membership** - does the model still treat the forget classes' TRAINING images differently from held-out images
   of the same classes? Each site histograms the per-example cross-entropy of its forget-class training images and
   of its forget-class test images over fixed log-loss bins (``LOG_LOSS_EDGES``, the same at every site so
   histograms add up). The server computes the threshold-free membership AUC, P(loss_train < loss_test), from the
   merged histograms (ties inside a bin count one half). A model that never saw the class gives 0.5.
2. **Features** - is the forget class still linearly separable in the penultimate features the classifier reads?
   Round 1: each site sends per-class sums of its training images' features, the counts and the sum of outer
   products; the server fits a two-class linear discriminant (forget vs retained, pooled within-class covariance
   with shrinkage). Round 2: the server sends the direction; each site histograms the scores of its TEST images,
   forget vs retained; the server computes the probe's held-out AUC from the merged histograms.

What leaves a site: two loss histograms (``len(LOG_LOSS_EDGES)+1`` counts each), per-class feature sums ``[K, D]``
and counts ``[K]``, one ``[D, D]`` moment matrix, and two score histograms. docs/nvflare.md states it.
Pure numpy/torch; the NVFlare executor and the Client API helpers call the site functions, the controller the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nvflare_unlearn.models import final_linear_name

__all__ = [
    "LOG_LOSS_EDGES",
    "SCORE_BINS",
    "auc_from_histograms",
    "fit_probe",
    "merge_site_stats",
    "site_probe_histograms",
    "site_stats",
    "site_verification",
    "verification_summary",
]

#: log(cross-entropy) bin edges: losses from ~1e-7 to ~400 at 0.1-nat resolution in log space
LOG_LOSS_EDGES = np.round(np.arange(-16.0, 6.0 + 1e-9, 0.1), 6)
SCORE_BINS = 400


def _batches(loader: Iterable) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch["x"], batch["y"])
        yield torch.as_tensor(x), torch.as_tensor(y, dtype=torch.int64)


@torch.no_grad()
def _losses_and_features(model: nn.Module, loader: Iterable, device: torch.device):
    """Per-example losses, labels and penultimate features (the final Linear's input) over ``loader``."""
    layer = dict(model.named_modules())[final_linear_name(model)]
    feats: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, inp: feats.append(torch.flatten(inp[0], 1).float().cpu()))
    losses, labels = [], []
    was_training = model.training
    model.eval()
    try:
        for x, y in _batches(loader):
            logits = model(x.to(device)).float()
            losses.append(F.cross_entropy(logits, y.to(device), reduction="none").cpu().double())
            labels.append(y)
    finally:
        handle.remove()
        model.train(was_training)
    if not labels:
        return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros((0, 0))
    return torch.cat(losses).numpy(), torch.cat(labels).numpy(), torch.cat(feats).double().numpy()


def _loss_histogram(losses: np.ndarray) -> np.ndarray:
    logs = np.log(np.maximum(losses, 1e-30))
    return np.bincount(np.searchsorted(LOG_LOSS_EDGES, logs, side="right"), minlength=len(LOG_LOSS_EDGES) + 1)


def site_stats(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    forget_classes: Sequence[int],
    num_classes: int,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Round 1 at one site: forget-class loss histograms (train, test) and training-feature moments."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    forget = np.asarray(sorted(int(c) for c in forget_classes))
    tr_loss, tr_y, tr_feat = _losses_and_features(model, train_loader, dev)
    te_loss, te_y, _ = _losses_and_features(model, test_loader, dev)
    d = tr_feat.shape[1] if tr_feat.size else 0
    sums = np.zeros((num_classes, d))
    if tr_feat.size:
        np.add.at(sums, tr_y, tr_feat)
    return {
        "loss_hist_train": _loss_histogram(tr_loss[np.isin(tr_y, forget)]).astype(np.int64),
        "loss_hist_test": _loss_histogram(te_loss[np.isin(te_y, forget)]).astype(np.int64),
        "feature_sums": sums,
        "feature_counts": np.bincount(tr_y, minlength=num_classes).astype(np.int64),
        "feature_moment": tr_feat.T @ tr_feat if tr_feat.size else np.zeros((0, 0)),
    }


def merge_site_stats(stats: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Sum the sites' round-1 statistics (exact: every entry is a sum or a count)."""
    if not stats:
        raise ValueError("no site statistics to merge")
    keys = ("loss_hist_train", "loss_hist_test", "feature_sums", "feature_counts", "feature_moment")
    out = {k: np.asarray(stats[0][k], dtype=np.float64).copy() for k in keys}
    for i, s in enumerate(stats[1:], start=1):
        for k in keys:
            v = np.asarray(s[k], dtype=np.float64)
            if v.shape != out[k].shape:
                raise ValueError(f"site statistics {i}: {k} has shape {v.shape}, expected {out[k].shape}")
            out[k] += v
    for k in ("loss_hist_train", "loss_hist_test", "feature_counts"):
        out[k] = np.rint(out[k]).astype(np.int64)
    return out


def fit_probe(merged: dict[str, np.ndarray], forget_classes: Sequence[int], shrinkage: float = 0.1) -> dict[str, Any]:
    """Two-class LDA direction (forget vs retained) from merged class sums, counts and the moment matrix."""
    counts = merged["feature_counts"].astype(np.float64)
    forget = sorted(int(c) for c in forget_classes)
    kept = [c for c in range(len(counts)) if c not in set(forget)]
    if counts[forget].sum() < 2 or counts[kept].sum() < 2:
        raise ValueError("the probe needs training images of both the forget and the retained classes")
    present = counts > 0
    means = merged["feature_sums"][present] / counts[present][:, None]
    n, k = counts.sum(), int(present.sum())
    within = (merged["feature_moment"] - (means.T * counts[present]) @ means) / max(n - k, 1.0)
    d = within.shape[0]
    within = (1 - shrinkage) * within + shrinkage * (np.trace(within) / d) * np.eye(d)
    mu_f = merged["feature_sums"][forget].sum(0) / counts[forget].sum()
    mu_r = merged["feature_sums"][kept].sum(0) / counts[kept].sum()
    w = np.linalg.solve(within, mu_f - mu_r)
    sd = math.sqrt(max(float(w @ within @ w), 1e-30))
    lo, hi = min(w @ mu_f, w @ mu_r) - 8 * sd, max(w @ mu_f, w @ mu_r) + 8 * sd
    return {"w": w, "b": -float(w @ (mu_f + mu_r)) / 2, "edges": np.linspace(lo, hi, SCORE_BINS + 1)}


@torch.no_grad()
def site_probe_histograms(
    model: nn.Module,
    test_loader: Iterable,
    probe: dict[str, Any],
    forget_classes: Sequence[int],
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """Round 2 at one site: histograms of the probe's scores on its test images, forget vs retained classes."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    _, y, feats = _losses_and_features(model, test_loader, dev)
    edges = np.asarray(probe["edges"], dtype=np.float64)
    w = np.asarray(probe["w"], dtype=np.float64)
    if feats.size and feats.shape[1] != w.shape[0]:
        raise ValueError(f"probe direction has {w.shape[0]} entries, the model's features {feats.shape[1]}")
    scores = feats @ w if feats.size else np.zeros(0)
    is_forget = np.isin(y, sorted(int(c) for c in forget_classes))

    def hist(v: np.ndarray) -> np.ndarray:
        return np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1).astype(np.int64)

    return {"score_hist_forget": hist(scores[is_forget]), "score_hist_retained": hist(scores[~is_forget])}


def site_verification(
    model: nn.Module,
    request: dict[str, Any] | None,
    forget_classes: Sequence[int],
    num_classes: int,
    train_loader: Iterable,
    test_loader: Iterable,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """A site's answer to one round of the check (``request["round"]``: "stats", then "scores"): the one dispatch
    the NVFlare executor and a user's Client API script share."""
    request = request or {}
    forget = sorted(int(c) for c in forget_classes)
    if not forget:
        raise ValueError("the verify task names no forget class")
    if request.get("round") == "scores":
        return site_probe_histograms(model, test_loader, request, forget, device=device)
    if request.get("round") == "stats":
        return site_stats(model, train_loader, test_loader, forget, num_classes, device=device)
    raise ValueError(f"verify round must be 'stats' or 'scores', got {request.get('round')!r}")


def auc_from_histograms(positive: np.ndarray, negative: np.ndarray) -> dict[str, float | int | None]:
    """P(positive scores higher than negative) from two histograms over the same bins, ties in a bin counting 1/2.

    With the Hanley-McNeil standard error and a normal 95 % interval; None when a side is empty.
    """
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    n1, n0 = float(pos.sum()), float(neg.sum())
    if n1 == 0 or n0 == 0:
        return {"auc": None, "se": None, "ci95": None, "n_positive": int(n1), "n_negative": int(n0)}
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in lower bins
    auc = float((pos * (below + 0.5 * neg)).sum() / (n1 * n0))
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    se = math.sqrt(max(auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc), 0.0) / (n1 * n0))
    return {"auc": auc, "se": se, "ci95": [auc - 1.96 * se, auc + 1.96 * se], "n_positive": int(n1),
            "n_negative": int(n0)}  # fmt: skip


def membership_auc(merged: dict[str, np.ndarray]) -> dict[str, Any]:
    """AUC of "forget-class training image" vs "held-out forget-class image" by lower loss (0.5 = no signal)."""
    # lower loss = member: reverse the bins so "higher score" means "lower loss"
    return auc_from_histograms(merged["loss_hist_train"][::-1], merged["loss_hist_test"][::-1])


def verification_summary(
    after: dict[str, Any], before: dict[str, Any] | None = None, reference: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A verdict from the unlearned model's check, compared with the original's and, when known, a reference.

    ``after``/``before``: ``{"membership": {...}, "probe": {...}}`` as the controller records them.
    ``reference``: the same for a retrained model of this setting, or its numbers with their noise floor
    (``{"membership_auc": x, "probe_auc": y, "floor": z}``), e.g. from docs/benchmarks.md.
    Verdict, without a reference: "forgotten at the feature level" when the membership AUC's 95 % interval holds
    0.5 AND the probe lost significantly against the original (its interval lies below the original's estimate).
    With a reference: both AUCs within the reference's value + its noise floor. Otherwise "no".
    """
    mem, probe = after["membership"], after["probe"]
    evidence = [f"membership AUC {_fmt(mem)}", f"feature probe AUC {_fmt(probe)}"]
    if before:
        evidence.append(f"original: membership {_fmt(before['membership'])}, probe {_fmt(before['probe'])}")
    if mem.get("auc") is None or probe.get("auc") is None:
        return {"forgotten": None, "verdict": "unknown: too few forget-class images at the sites", "evidence": evidence}
    if reference:
        floor = float(reference.get("floor", 0.0))
        ok = mem["auc"] <= reference["membership_auc"] + floor and probe["auc"] <= reference["probe_auc"] + floor
        evidence.append(
            f"reference: membership {reference['membership_auc']:.3f}, probe {reference['probe_auc']:.3f} "
            f"(+ noise floor {floor:.3f})"
        )
    else:
        no_membership = mem["ci95"][0] <= 0.5 <= mem["ci95"][1] or mem["auc"] < 0.5
        probe_dropped = (
            before is not None
            and before["probe"].get("auc") is not None
            and (probe["ci95"][1] < before["probe"]["auc"])
        )
        ok = bool(no_membership and probe_dropped)
    word = "yes" if ok else "no"
    return {"forgotten": bool(ok), "verdict": f"forgotten at the feature level: {word}", "evidence": evidence}


def _fmt(entry: dict[str, Any]) -> str:
    if entry.get("auc") is None:
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{entry['auc']:.3f} [{lo:.3f}, {hi:.3f}]"
