"""What a forgetting evaluation leaves on disk: per-example arrays (npz) and JSON, each written atomically.

Attacks improve after a benchmark has run; saving every model's per-example losses, logits and penultimate
features on the sets the attacks read (forget-class train and test images, retained train and test samples) lets
anyone rerun or replace an attack offline, without the models or the CPU hours behind them:

    arrays = load_arrays("..._original.npz")
    membership_auc(arrays["u_train"]["loss"], arrays["u_test"]["loss"])

Features are stored as float16 (half the bytes, ample for a linear classifier), losses and logits as float32.
Writes go to a temporary file in the same folder and are renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nvflare_unlearn import _io
from nvflare_unlearn.evaluation.probe import forward_outputs

__all__ = ["load_arrays", "per_example_arrays", "save_arrays", "write_json"]

_SEP = "__"  # npz key = <set>__<field>
FIELDS = ("labels", "loss", "logits", "features")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (numpy scalars and arrays converted), written atomically (folders created: a
    benchmark's results folder is its own)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _io.write_text(path, json.dumps(obj, indent=1, default=_jsonable))


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


@torch.no_grad()
def per_example_arrays(
    model: nn.Module, data: Any, feature_layer: str | None = None, batch_size: int = 512
) -> dict[str, np.ndarray]:
    """``{"labels", "loss", "logits", "features"}`` of one eval-mode pass (``probe.forward_outputs``)."""
    feats, logits, labels = forward_outputs(model, data, feature_layer, batch_size)
    loss = F.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels).long(), reduction="none")
    return {
        "labels": labels.astype(np.int64),
        "loss": loss.numpy().astype(np.float32),
        "logits": logits.astype(np.float32),
        "features": feats.astype(np.float32),
    }


def save_arrays(path: str | os.PathLike, sets: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """One compressed npz holding every set's arrays (features as float16); atomic (folders created)."""
    flat: dict[str, np.ndarray] = {}
    for name, arrays in sets.items():
        if _SEP in name or not name:
            raise ValueError(f"set name {name!r} must be non-empty and must not contain {_SEP!r}")
        unknown = sorted(set(arrays) - set(FIELDS))
        if unknown:
            raise ValueError(f"set {name!r}: unknown array(s) {unknown}; allowed {list(FIELDS)}")
        for field, a in arrays.items():
            a = np.asarray(a)
            flat[f"{name}{_SEP}{field}"] = a.astype(np.float16) if field == "features" else a
    buf = io.BytesIO()
    np.savez_compressed(buf, **flat)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _io.write_bytes(path, buf.getvalue())


def load_arrays(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """The sets written by ``save_arrays`` (features back as float32)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            name, _, field = key.partition(_SEP)
            a = z[key]
            out.setdefault(name, {})[field] = a.astype(np.float32) if field == "features" else a
    return out
