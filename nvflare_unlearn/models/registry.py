"""Model factory and input-shape registry: one name -> one architecture, so a plan can be replayed anywhere.

A model is named by a string that every machine can turn back into the same architecture:

- a registry name (``small_cnn``, ``resnet20``, ``vgg11``, ...), or
- YOUR model as an import path ``"package.module:factory"``: ``factory(num_classes=K)`` returns an ``nn.Module``,
  and the module is importable wherever the model is rebuilt (server and every site). The input shape (C, H, W),
  needed to trace the model for coupled pruning, comes from ``factory.input_shape`` or is written into the name
  as ``"package.module:factory@CxHxW"`` (what ``model_spec(factory, input_shape=...)`` returns).

Names are plain strings, so they survive export to an NVFlare job folder and are stored in checkpoints and plans;
nothing has to be registered at run time.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import re
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from nvflare_unlearn._validation import check_num_classes
from nvflare_unlearn.models.resnet import RESNET_DEPTHS, CifarResNet
from nvflare_unlearn.models.small_cnn import SmallCNN
from nvflare_unlearn.models.vgg import VGG_CONFIGS, CifarVGG

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


#: Separates the module from the factory in an import path (``"package.module:factory"``), as in entry points.
IMPORT_SEP = ":"
#: Introduces an explicit input shape in an import path (``"package.module:factory@1x28x28"``).
SHAPE_SEP = "@"
_IMPORT_PATH_RE = re.compile(
    r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
    r"(?:@(?P<shape>\d{1,7}x\d{1,7}x\d{1,7}))?$"
)
#: Bounds on a model name and on an input shape (C, H, W). Names and shapes arrive from files and job configs; a
#: shape is allocated (example inputs for tracing), so it is bounded before anything is built.
MAX_NAME_CHARS = 512
MAX_INPUT_CHANNELS = 4096
MAX_INPUT_SIDE = 16384
MAX_INPUT_ELEMENTS = 1 << 24  # 16.7 M values (64 MiB as float32), e.g. 3 x 2048 x 2048


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_import_path(name: object) -> bool:
    """True for a user model named ``"package.module:factory"`` (not necessarily importable here)."""
    return isinstance(name, str) and IMPORT_SEP in name


def _unknown_name(name: object) -> ValueError:
    return ValueError(
        f"unknown model name {_short(name)}; known models: {', '.join(MODEL_NAMES)}; or name your own model by import "
        "path 'package.module:factory' (factory(num_classes=...) returns the nn.Module)"
    )


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in _BUILDERS:
        raise _unknown_name(name)
    return name


def check_input_shape(shape: Any, where: str = "input_shape") -> tuple[int, int, int]:
    """A (C, H, W) of three positive integers within the bounds above (it is allocated for tracing)."""
    if (
        isinstance(shape, str)
        or not isinstance(shape, Sequence)
        or len(shape) != 3
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in shape)
    ):
        raise ValueError(f"{where} must be (C, H, W): three positive integers, got {_short(shape)}")
    c, h, w = (int(v) for v in shape)
    if c > MAX_INPUT_CHANNELS or h > MAX_INPUT_SIDE or w > MAX_INPUT_SIDE or c * h * w > MAX_INPUT_ELEMENTS:
        raise ValueError(
            f"{where} {c}x{h}x{w} is too large: at most {MAX_INPUT_CHANNELS} channels, {MAX_INPUT_SIDE} pixels a "
            f"side and {MAX_INPUT_ELEMENTS} values per image"
        )
    return c, h, w


def _parse_import_path(spec: str) -> tuple[str, str, tuple[int, int, int] | None]:
    match = _IMPORT_PATH_RE.match(spec.strip()) if len(spec) <= MAX_NAME_CHARS else None
    if match is None:
        raise ValueError(
            f"model {_short(spec)} is not an import path: write 'package.module:factory' (optionally "
            "'package.module:factory@CxHxW' to give the input shape), e.g. 'my_pkg.nets:build_net@1x28x28'"
        )
    shape = match.group("shape")
    return (
        match.group("module"),
        match.group("attr"),
        check_input_shape([int(v) for v in shape.split("x")], f"input shape of model {_short(spec)}")
        if shape
        else None,
    )


def import_path_module(name: str) -> str:
    """The module an import-path model name would import (``"pkg.nets:f@1x8x8"`` -> ``"pkg.nets"``), not imported."""
    return _parse_import_path(name)[0]


def _import_factory(module_name: str, attr: str) -> Callable[..., Any]:
    """The callable ``module_name:attr``, imported; clear errors when it is missing or not a model factory."""
    path = f"{module_name}{IMPORT_SEP}{attr}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"cannot import module {module_name!r} of model {path!r} ({exc}): the module must be importable on the "
            "server and on every site (pip-install it there, or ship it with the job as custom code)"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (model {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"model {path!r} names a {type(obj).__name__}, not a factory: give a function or nn.Module class called "
            "as factory(num_classes=...)"
        )
    if isinstance(obj, type) and not issubclass(obj, nn.Module):
        raise ValueError(f"model {path!r} is a class but not an nn.Module subclass")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = None
    if (
        params is not None
        and "num_classes" not in params
        and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    ):
        raise ValueError(f"model factory {path!r} must accept a num_classes= keyword argument")
    return obj


def _declared_shape(factory: Callable[..., Any], path: str) -> tuple[int, int, int] | None:
    shape = getattr(factory, "input_shape", None)
    if shape is None or isinstance(shape, property):
        return None
    return check_input_shape(shape, f"{path}.input_shape")


def _missing_shape(path: str) -> ValueError:
    module, attr = path.split(IMPORT_SEP, 1)
    return ValueError(
        f"the input shape of model {path!r} is unknown, so it cannot be traced for pruning: set "
        f"`{attr}.input_shape = (C, H, W)` in {module!r}, or pass input_shape=(C, H, W) to the recipe "
        f"(or name the model '{path}@CxHxW')"
    )


def _resolve_import_path(spec: str) -> tuple[Callable[..., Any], tuple[int, int, int], str]:
    """(factory, input shape, canonical name) of an import-path model name."""
    module_name, attr, shape = _parse_import_path(spec)
    path = f"{module_name}{IMPORT_SEP}{attr}"
    factory = _import_factory(module_name, attr)
    declared = _declared_shape(factory, path)
    if shape is None:
        if declared is None:
            raise _missing_shape(path)
        return factory, declared, path
    # The declared shape needs no suffix: one model, one canonical name.
    return factory, shape, path if shape == declared else f"{path}{SHAPE_SEP}{'x'.join(map(str, shape))}"


def _callable_import_path(obj: Callable[..., Any]) -> str:
    """``"module:qualname"`` of a module-level function or class, importable on other machines."""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    module = getattr(obj, "__module__", None)
    if getattr(obj, "__name__", None) == "<lambda>":
        raise ValueError(
            "a lambda cannot be rebuilt on the server and the sites: define the model factory as a module-level "
            "function (def build_net(num_classes=10): ...) in a module they can import"
        )
    if not name or not module:
        raise ValueError(
            f"{obj!r} has no importable name: give the model as 'package.module:factory' or a module-level function"
        )
    if "<locals>" in name:
        raise ValueError(
            f"model factory {name!r} is defined inside a function, so the server and the sites cannot import it: "
            "move it to module level"
        )
    if module == "__main__":
        raise ValueError(
            f"model factory {name!r} is defined in the script being run (__main__), which the server and the sites "
            "cannot import: put it in its own module (e.g. my_net.py) and import it from there"
        )
    path = f"{module}{IMPORT_SEP}{name}"
    try:
        found = _import_factory(module, name)
    except ValueError as exc:
        raise ValueError(f"model factory {obj!r} is not importable as {path!r}: {exc}") from None
    if found is not obj and getattr(found, "__wrapped__", None) is not obj:
        raise ValueError(f"{path!r} does not name {obj!r} (shadowed or re-bound): give the import path explicitly")
    return path


def model_spec(model: str | Callable[..., Any], input_shape: Sequence[int] | None = None) -> str:
    """The canonical string naming a model on every machine: a registry name, or ``"package.module:factory"``
    (plus ``"@CxHxW"`` when the input shape is not ``factory.input_shape``).

    ``model`` is a registry name, an import path, the factory itself (a module-level function or nn.Module
    class; lambdas, local functions and functions defined in ``__main__`` are refused: other machines could not
    import them), or a module made by ``build_model`` (an arbitrary module instance is refused: the sites could not
    rebuild it). The import path is imported here, so a typo fails now, not on a site.
    """
    if input_shape is not None:
        input_shape = check_input_shape(input_shape, "input_shape")
    if isinstance(model, nn.Module):
        built = model_name_of(model)
        if built is None:
            raise ValueError(
                f"{type(model).__name__} was not built by nvflare_unlearn.build_model: every site must rebuild the "
                f"same architecture from a name; give a registry name ({', '.join(MODEL_NAMES)}) or your model's "
                "factory as an import path 'package.module:factory'"
            )
        model = built
    if not isinstance(model, str):
        if not callable(model):
            raise ValueError(
                f"model must be a registry name, an import path 'package.module:factory' or the factory function; "
                f"got {type(model).__name__}"
            )
        model = _callable_import_path(model)
    if not is_import_path(model):
        name = _check_name(model)
        if input_shape is not None and input_shape != registry_input_shape(name, input_shape[0]):
            raise ValueError(
                f"registry model {name!r} takes {registry_input_shape(name, input_shape[0])} inputs, not "
                f"{input_shape}: pass in_channels for another number of channels"
            )
        return name
    module_name, attr, shape = _parse_import_path(model)
    if input_shape is not None:
        if shape is not None and shape != input_shape:
            raise ValueError(f"model {model!r} names input shape {shape} but input_shape={input_shape} was given")
        model = f"{module_name}{IMPORT_SEP}{attr}{SHAPE_SEP}{'x'.join(map(str, input_shape))}"
    return _resolve_import_path(model)[2]


def registry_input_shape(name: str, in_channels: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of a registry model: digits 1x8x8 for ``small_cnn`` with one channel, CIFAR 3x32x32 otherwise."""
    name = _check_name(name)
    c = _DEFAULT_IN_CHANNELS[name] if in_channels is None else in_channels
    hw = _DIGITS_HW if (name == "small_cnn" and c == 1) else _CIFAR_HW
    return (c, *hw)


def _check_in_channels(in_channels: Any, shape: tuple[int, int, int] | None = None, name: str = "") -> None:
    if in_channels is None:
        return
    if (
        isinstance(in_channels, bool)
        or not isinstance(in_channels, numbers.Integral)
        or not 1 <= in_channels <= MAX_INPUT_CHANNELS
    ):
        raise ValueError(f"in_channels must be an integer in [1, {MAX_INPUT_CHANNELS}], got {_short(in_channels)}")
    if shape is not None and int(in_channels) != shape[0]:
        raise ValueError(
            f"model {name!r} takes {shape[0]}-channel inputs (input shape {shape}), not in_channels={in_channels}: "
            "a model given by import path fixes its input shape; change its input_shape instead"
        )


def input_shape(name: str, in_channels: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) a model expects: registry models as in ``registry_input_shape``; a model given by import path
    from its name's ``@CxHxW`` or ``factory.input_shape`` (importing the factory)."""
    if is_import_path(name):
        _factory, shape, canonical = _resolve_import_path(name)
        _check_in_channels(in_channels, shape, canonical)
        return shape
    return registry_input_shape(name, in_channels)


def build_model(name: str | Callable[..., Any], num_classes: int, in_channels: int | None = None) -> nn.Module:
    """Build a fresh model by name; the same call always yields the same architecture.

    ``name`` is a registry name, or your own model as an import path ``"package.module:factory"`` (or the factory
    itself), built as ``factory(num_classes=num_classes)``. For registry models ``in_channels`` defaults to 1 for
    ``small_cnn`` (digits) and 3 for the CIFAR ResNets/VGGs; a model given by import path fixes its input shape, so
    ``in_channels`` may only repeat it. The model carries its name and input shape as attributes so later steps
    (tracing, plans, checkpoints) need not be told again.
    """
    if not isinstance(name, (str, nn.Module)) and callable(name):
        name = model_spec(name)  # the factory itself -> its import path
    num_classes = check_num_classes(num_classes)
    if is_import_path(name):
        factory, shape, canonical = _resolve_import_path(name)
        _check_in_channels(in_channels, shape, canonical)
        model = factory(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model factory {canonical!r} returned {type(model).__name__}, not an nn.Module")
        setattr(model, NAME_ATTR, canonical)
        setattr(model, INPUT_SHAPE_ATTR, shape)
        return model
    name = _check_name(name)
    _check_in_channels(in_channels)
    c = _DEFAULT_IN_CHANNELS[name] if in_channels is None else int(in_channels)
    model = _BUILDERS[name](num_classes, c)
    setattr(model, NAME_ATTR, name)
    setattr(model, INPUT_SHAPE_ATTR, registry_input_shape(name, c))
    return model


def check_model_name(name: object) -> str:
    """``name`` if a model can be rebuilt from it (a registry name, or an import path that imports here)."""
    if isinstance(name, str) and is_import_path(name):
        _resolve_import_path(name)
        return name
    return _check_name(name)


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


def final_linear_name(model: nn.Module) -> str:
    """Name of the last `nn.Linear` in `named_modules()` order: the classifier whose input we probe."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer; pass feature_layer= explicitly")
    return names[-1]
