"""Moving a (possibly pruned) model across NVFlare: rebuild from name + plan, and weights <-> numpy dicts.

Weights cross the wire as numpy arrays (NVFlare's NUMPY exchange), never as a pickled module: every site rebuilds
the architecture itself from the model name (a registry name or a "package.module:factory" import path) and the
plan in the task's meta (parsed once, by ``plan_from_meta``, where the task arrives), then loads the arrays.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch
from torch import nn

from nvflare_unlearn.fl.defs import META_PLAN, META_PRUNE_MODE, META_TEACHER_PLAN, TEACHER_PREFIX
from nvflare_unlearn.method.plan import PruningPlan, parse_plan
from nvflare_unlearn.models import build_model
from nvflare_unlearn.options import PRUNE_MODES

__all__ = [
    "count_params",
    "load_numpy_state",
    "model_key",
    "parse_plan",
    "plan_from_meta",
    "rebuild_model",
    "split_teacher",
    "state_to_numpy",
    "teacher_from",
]


def plan_from_meta(meta: Mapping[str, object] | None, key: str = META_PLAN) -> Optional[PruningPlan]:
    """The plan a task's meta carries under ``key`` (the model's own, or ``META_TEACHER_PLAN``), parsed once where
    it enters the site or the server; None for an unpruned model. Malformed text is a ValueError."""
    return parse_plan((meta or {}).get(key))


def rebuild_model(
    model_name: str,
    num_classes: int,
    plan: Optional[PruningPlan] = None,
    mode: str = "remove",
    in_channels: Optional[int] = None,
) -> nn.Module:
    """A fresh model of the named architecture (registry name or import path) with the plan replayed on it
    (weights to be loaded after). ``plan`` is already parsed (``plan_from_meta``), never JSON text."""
    if mode not in PRUNE_MODES:
        raise ValueError(f"prune mode must be one of {list(PRUNE_MODES)}, got {mode!r}")
    if plan is not None and not isinstance(plan, PruningPlan):
        raise ValueError(
            f"rebuild_model takes a PruningPlan or None, got {type(plan).__name__} (parse the task's meta once with "
            "plan_from_meta)"
        )
    model = build_model(model_name, num_classes, in_channels=in_channels)
    if plan is not None:
        from nvflare_unlearn.method.prune import apply_pruning_plan

        model = apply_pruning_plan(model, plan, mode=mode)
    return model


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The full state dict (parameters and BatchNorm buffers) as numpy arrays, ready for a DXO."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: nn.Module, params: Mapping[str, object]) -> nn.Module:
    """Load a numpy/tensor state dict, naming the first key or shape that does not match the architecture.

    FedAvg averages integer buffers (``num_batches_tracked``) into floats; values are cast back to each buffer's
    own dtype, so the aggregated dict loads as is.
    """
    if not isinstance(params, Mapping) or not params:
        raise ValueError("received model weights are empty or not a dict of arrays")
    state = model.state_dict()
    missing = sorted(set(state) - set(params))
    unexpected = sorted(set(params) - set(state))
    if missing or unexpected:
        raise ValueError(
            "received weights do not match the model rebuilt from its plan: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
            "was the plan sent with the weights (meta 'pruning_plan')?"
        )
    new_state = {}
    for key, target in state.items():
        value = torch.as_tensor(np.asarray(params[key]))
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"weight {key!r} has shape {tuple(value.shape)} but the model rebuilt from its plan expects "
                f"{tuple(target.shape)}: the plan and the weights belong to different models"
            )
        if not target.dtype.is_floating_point:
            value = torch.round(value.to(torch.float64))
        new_state[key] = value.to(dtype=target.dtype)
    model.load_state_dict(new_state, strict=True)
    from nvflare_unlearn.method.prune import enforce_masks

    return enforce_masks(model)  # mask mode: pruned channels read zero even if the sender's were not


def model_key(params: Mapping[str, object] | None, plan_json: Optional[str]) -> str:
    """SHA-256 (hex, first 32 characters) of a model as received: its weights (sorted by name) and its plan; how a
    site's privacy ledger names the model a release was computed on."""
    import hashlib

    h = hashlib.sha256((plan_json or "").encode("utf-8"))
    for key in sorted(params or {}):
        arr = np.ascontiguousarray(np.asarray(params[key]))
        h.update(key.encode("utf-8"))
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:32]


def count_params(model: nn.Module) -> int:
    """Trainable + frozen parameter count (what "smaller model" means in the job's metrics)."""
    return int(sum(p.numel() for p in model.parameters()))


def split_teacher(params: Mapping[str, object]) -> tuple[dict, dict]:
    """(the model's own weights, the teacher's weights) from a task's params (teacher keys carry TEACHER_PREFIX)."""
    own = {k: v for k, v in params.items() if not k.startswith(TEACHER_PREFIX)}
    teacher = {k[len(TEACHER_PREFIX) :]: v for k, v in params.items() if k.startswith(TEACHER_PREFIX)}
    return own, teacher


def teacher_from(meta: Mapping[str, object], teacher_params: Mapping[str, object], model_name: str, num_classes: int,
                 in_channels: Optional[int] = None) -> nn.Module:  # fmt: skip
    """The original model a distilling objective learns from: its weights came with the task (``split_teacher``),
    its plan (when the original had been pruned before) in ``META_TEACHER_PLAN``."""
    if not teacher_params:
        raise ValueError("this method distils from the original model, but the task carries no teacher weights")
    mode = meta.get(META_PRUNE_MODE, "remove")
    plan = plan_from_meta(meta, META_TEACHER_PLAN)
    teacher = rebuild_model(
        model_name, num_classes, plan, mode if mode in ("remove", "mask") else "remove", in_channels
    )
    return load_numpy_state(teacher, teacher_params)


def global_model(
    params: Mapping[str, object] | None,
    meta: Mapping[str, object] | None,
    model_name: str,
    num_classes: int,
    in_channels: Optional[int] = None,
    *,
    teacher: bool = False,
) -> nn.Module:
    """This round's global model from a task's params and meta: the plan replayed (in its prune mode), the model's
    own weights loaded; with ``teacher=True`` the original model the task carries for a distilling method
    (``teacher_from``). The executor, the Client API helpers and ``SiteLoop`` all rebuild it here."""
    meta = meta or {}
    own, teacher_params = split_teacher(params or {})
    if teacher:
        return teacher_from(meta, teacher_params, model_name, num_classes, in_channels)
    mode = str(meta.get(META_PRUNE_MODE, "remove"))
    model = rebuild_model(model_name, num_classes, plan_from_meta(meta), mode, in_channels)
    return load_numpy_state(model, own)
