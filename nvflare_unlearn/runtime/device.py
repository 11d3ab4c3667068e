"""Device choice in one place: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["pick_device", "model_device"]


def pick_device() -> torch.device:
    """`cuda` when a GPU is visible, else `cpu`."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
