"""Model factory and input-shape registry: one name -> one architecture, so a plan can be replayed anywhere."""

from __future__ import annotations

import numbers
from typing import Callable

import torch
import torch.nn as nn

from .._validation import check_num_classes
from .resnet import RESNET_DEPTHS, CifarResNet
from .small_cnn import SmallCNN
from .vgg import VGG_CONFIGS, CifarVGG

#: Attribute names stamped on every model built here; ``example_input(model)`` and plans read them back.
NAME_ATTR = "nvflare_unlearn_name"
INPUT_SHAPE_ATTR = "nvflare_unlearn_input_shape"

_DIGITS_HW = (8, 8)
_CIFAR_HW = (32, 32)

_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    **{name: (lambda k, c, n=n: CifarResNet(n, k, in_channels=c)) for name, n in RESNET_DEPTHS.items()},
    **{name: (lambda k, c, cfg=cfg: CifarVGG(cfg, k, in_channels=c)) for name, cfg in VGG_CONFIGS.items()},
    "small_cnn": lambda k, c: SmallCNN(k, in_channels=c),
}
_DEFAULT_IN_CHANNELS = {name: 3 for name in _BUILDERS} | {"small_cnn": 1}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return name


def input_shape(name: str, in_channels: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) a model expects: digits 1x8x8 for ``small_cnn`` with one channel, CIFAR 3x32x32 otherwise."""
    name = _check_name(name)
    c = _DEFAULT_IN_CHANNELS[name] if in_channels is None else in_channels
    hw = _DIGITS_HW if (name == "small_cnn" and c == 1) else _CIFAR_HW
    return (c, *hw)


def build_model(name: str, num_classes: int, in_channels: int | None = None) -> nn.Module:
    """Build a fresh model by registry name; the same call always yields the same architecture.

    ``in_channels`` defaults to 1 for ``small_cnn`` (digits) and 3 for the CIFAR ResNets/VGGs. The model carries
    its registry name and input shape as attributes so later steps (tracing, plans) need not be told again.
    """
    name = _check_name(name)
    num_classes = check_num_classes(num_classes)
    if in_channels is not None and (
        isinstance(in_channels, bool) or not isinstance(in_channels, numbers.Integral) or in_channels < 1
    ):
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    c = _DEFAULT_IN_CHANNELS[name] if in_channels is None else int(in_channels)
    model = _BUILDERS[name](num_classes, c)
    setattr(model, NAME_ATTR, name)
    setattr(model, INPUT_SHAPE_ATTR, input_shape(name, c))
    return model


def model_name_of(model: nn.Module) -> str | None:
    """Registry name of a model built by :func:`build_model` (None for foreign models)."""
    return getattr(model, NAME_ATTR, None)


def example_input(name_or_model: str | nn.Module, batch: int = 1) -> torch.Tensor:
    """A deterministic dummy batch of the right shape, for tracing (DependencyGraph) and FLOP counting."""
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(name_or_model, nn.Module):
        shape = getattr(name_or_model, INPUT_SHAPE_ATTR, None)
        if shape is None:
            raise ValueError(
                f"{type(name_or_model).__name__} was not built by nvflare_unlearn.build_model, so its input shape is "
                "unknown: pass example_inputs=... explicitly"
            )
    else:
        shape = input_shape(name_or_model)
    gen = torch.Generator().manual_seed(0)
    return torch.randn((int(batch), *shape), generator=gen)
