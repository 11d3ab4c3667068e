"""Pruned checkpoints: weights + plan JSON + model name, so the model rebuilds from the factory alone.

The file is a ``torch.save`` of a plain dict (tensors, strings, numbers; the plan as JSON text), loadable with
``torch.load(weights_only=True)``: no pickled classes, nothing executes on load. The model name stored in the file
is not trusted either: a name that is an import path (``"package.module:factory"``) would import and run that
module, so loading rebuilds it only when the caller names the same model or allow-lists its module
(``allow_import``). Sizes read from the file (classes, input channels, the plan) are bounded before anything is
built. Writes are atomic (``nvflare_unlearn._io``): a crash never leaves a truncated checkpoint under its name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from nvflare_unlearn import _io
from nvflare_unlearn._validation import check_num_classes
from nvflare_unlearn.method.graph import conv_modules
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.method.prune import apply_pruning_plan, enforce_masks, masked_plan
from nvflare_unlearn.models.registry import (
    INPUT_SHAPE_ATTR,
    MAX_INPUT_CHANNELS,
    MODEL_NAMES,
    build_model,
    check_model_name,
    import_path_module,
    is_import_path,
)

_FORMAT = "nvflare_unlearn.checkpoint"  # the on-disk format name (stable across package layouts)
_VERSION = 1
#: A checkpoint's class count is allocated (the classifier) before its weights are checked: bounded.
MAX_CLASSES = 100_000


def _check_plain(value: Any, where: str) -> None:
    """``extra`` must survive ``weights_only=True`` loading: only plain containers, scalars, strings, tensors."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where}: dict keys must be str or int, got {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise ValueError(f"{where} has type {type(value).__name__}; checkpoints store only plain data and tensors")


def _in_channels(model: nn.Module) -> int:
    shape = getattr(model, INPUT_SHAPE_ATTR, None)
    if shape:
        return int(shape[0])
    first = next(iter(conv_modules(model).values()), None)
    if first is None:
        raise ValueError("cannot save a model without Conv2d layers")
    return int(first.in_channels)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    plan: PruningPlan | None,
    model_name: str,
    num_classes: int,
    extra: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s weights with the plan that shaped them, atomically; refuses to overwrite (FileExistsError)
    unless ``overwrite`` (the persistor's round-by-round global model).

    ``plan`` must be fully applied to ``model`` (removed, or masked with mask mode); ``None`` for an unpruned model.
    """
    path = Path(path)
    if not isinstance(model_name, str) or (model_name not in MODEL_NAMES and not is_import_path(model_name)):
        raise ValueError(
            f"model_name must be one of {', '.join(MODEL_NAMES)} or an import path 'package.module:factory' "
            f"(load rebuilds from it), got {model_name!r}"
        )
    check_model_name(model_name)  # an import path must import: the checkpoint is useless otherwise
    num_classes = check_num_classes(num_classes)
    if plan is not None and not isinstance(plan, PruningPlan):
        raise ValueError(f"plan must be a PruningPlan or None, got {type(plan).__name__}")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise ValueError("extra must be a dict of plain values")
        _check_plain(dict(extra), "extra")
    masked = masked_plan(model)
    convs = conv_modules(model)
    if plan is None:
        if masked is not None:
            raise ValueError("the model is masked: pass the plan it was masked with")
        mode = "none"
    else:
        missing = [n for n in plan.convs if n not in convs]
        if missing:
            raise ValueError(f"the plan names layer(s) {missing} the model does not have")
        actual = {n: convs[n].out_channels for n in plan.convs}
        if masked is not None:
            if masked.pruned_channels() != plan.pruned_channels():
                raise ValueError("the model is masked with a different plan than the one given")
            mode = "mask"
        elif actual == plan.widths():
            mode = "remove" if plan.steps else "none"
        else:
            raise ValueError("the model's widths do not match the plan: apply the whole plan before saving")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; checkpoints are never overwritten: choose a new path")
    if not path.parent.exists():
        raise FileNotFoundError(f"directory {path.parent} does not exist")
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "model_name": model_name,
        "num_classes": num_classes,
        "in_channels": _in_channels(model),
        "prune_mode": mode,
        "plan": plan.to_json() if plan is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra) if extra is not None else {},
    }
    # exclusive unless overwriting: never clobbers a file that appeared meanwhile
    return _io.torch_save(path, payload, exclusive=not overwrite)


def _read(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (UnpicklingError, IndexError, ...) on garbage
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(
            f"{path} is not a readable checkpoint (corrupt, truncated or not a torch file): {reason}"
        ) from None


def _state_dict_of(obj: Any) -> dict[str, torch.Tensor] | None:
    if (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return dict(obj)
    return None


def _check_allow_import(allow_import: Sequence[str]) -> tuple[str, ...]:
    if isinstance(allow_import, str) or not all(isinstance(m, str) and m for m in allow_import):
        raise ValueError(f"allow_import must be a list of module names, e.g. ['my_pkg.nets'], got {allow_import!r}")
    return tuple(allow_import)


def _may_import(path: Path, stored: Any, given: str | None, allow_import: tuple[str, ...]) -> None:
    """Refuse a stored import-path model name the caller neither named nor allow-listed (it would run its module)."""
    if not isinstance(stored, str) or not is_import_path(stored) or stored == given:
        return
    module = import_path_module(stored)  # parsed and bounded, not imported
    if any(module == m or module.startswith(m + ".") for m in allow_import):
        return
    raise ValueError(
        f"{path} names its model by import path, so rebuilding it would import and run module {module!r}, a choice "
        f"made by the file: pass model_name='{stored}' if that is the model you expect, or allow_import=['{module}'] "
        "if you trust that module"
    )


def load_checkpoint(
    path: str | os.PathLike,
    model_name: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    *,
    allow_import: Sequence[str] = (),
) -> tuple[nn.Module, PruningPlan | None, dict[str, Any]]:
    """Rebuild ``(model, plan, meta)`` from ``build_model`` + the stored plan, then load the weights.

    Also reads a plain (unpruned) state_dict, or NVFlare's ``{"model": state_dict, ...}`` file; those need
    ``model_name`` and ``num_classes``. A stored import-path model name is rebuilt only if it equals ``model_name``
    or its module (or a parent package) is in ``allow_import``. Raises FileNotFoundError (missing), ValueError
    (corrupt, wrong architecture, plan that does not match the weights, a module the caller did not allow).
    """
    path = Path(path)
    allow_import = _check_allow_import(allow_import)
    data = _read(path)
    if isinstance(data, Mapping) and data.get("format") == _FORMAT:
        if data.get("version") != _VERSION:
            raise ValueError(f"{path}: unsupported checkpoint version {data.get('version')!r}")
        try:
            name, k, c = data["model_name"], data["num_classes"], data["in_channels"]
            state, mode = data["state_dict"], data["prune_mode"]
        except KeyError as exc:
            raise ValueError(f"{path}: checkpoint lacks field {exc}") from None
        for what, value, high in (("num_classes", k, MAX_CLASSES), ("in_channels", c, MAX_INPUT_CHANNELS)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{path}: stored {what} must be an integer in [1, {high}], got {str(value)[:40]!r}")
        try:
            plan = PruningPlan.from_json(data["plan"]) if data.get("plan") else None
        except ValueError as exc:
            raise ValueError(f"{path}: stored pruning plan is invalid: {exc}") from None
        extra = data.get("extra", {})
        for arg, stored in (("model_name", name), ("num_classes", k), ("in_channels", c)):
            given = {"model_name": model_name, "num_classes": num_classes, "in_channels": in_channels}[arg]
            if given is not None and given != stored:
                raise ValueError(f"{path} holds {arg}={repr(stored)[:100]}, but {repr(given)[:100]} was requested")
        _may_import(path, name, model_name, allow_import)
    else:
        state = _state_dict_of(data)
        if state is None and isinstance(data, Mapping):
            state = _state_dict_of(data.get("model"))
        if state is None:
            raise ValueError(f"{path} is neither an nvflare_unlearn checkpoint nor a state_dict of tensors")
        if model_name is None or num_classes is None:
            raise ValueError(f"{path} is a plain state_dict: pass model_name and num_classes to rebuild it")
        name, k, c, plan, mode, extra = model_name, num_classes, in_channels, None, "none", {}
    if plan is not None and plan.model_name and plan.model_name != name:
        raise ValueError(f"{path}: plan was made for {plan.model_name!r} but the checkpoint says {name!r}")
    if mode not in ("none", "remove", "mask"):
        raise ValueError(f"{path}: unknown prune_mode {mode!r}")
    model = build_model(name, k, in_channels=c)
    if plan is not None and mode != "none":
        apply_pruning_plan(model, plan, mode=mode)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        raise ValueError(
            f"{path}: the weights do not fit {name!r}"
            + (" pruned by the stored plan" if plan is not None else "")
            + f" ({detail})"
        ) from None
    if mode == "mask":
        enforce_masks(model)
    meta = {
        "model_name": name,
        "num_classes": int(k),
        "in_channels": getattr(model, INPUT_SHAPE_ATTR)[0],
        "prune_mode": mode,
        "extra": extra,
    }
    return model, plan, meta


__all__ = ["save_checkpoint", "load_checkpoint"]
