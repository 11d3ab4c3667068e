"""The one registry of unlearning methods: name -> ``UnlearningMethod``, found in ``unlearning/methods/``.

Every module in ``unlearning/methods/`` is imported once, on first use, and each ``UnlearningMethod`` subclass it
defines with a ``name`` is registered: a new method is one new module there (and its test), nothing else.
``register`` adds a method from elsewhere (a user's own, before the job is built: the sites must import the
same module, e.g. through the job's custom code).

(The function is ``all_methods``, not ``methods``: importing the subpackage ``unlearning.methods`` binds that name on
the package.)

A *variant* is a method plus options, written ``<method>[@<prune_ratio>][+kd]`` in benchmark tables (e.g.
``prune@0.2+kd``): ``variant_label`` and ``parse_variant`` are the one spelling, both ways.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Any

from nvflare_unlearn.unlearning.base import NEEDS, UnlearningMethod

__all__ = ["all_methods", "get_method", "method_names", "parse_variant", "register", "variant_label"]

_REGISTRY: dict[str, UnlearningMethod] = {}
_LOADED = False


def register(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    """Add ``cls`` to the registry (usable as a class decorator); a second class with the same name is an error."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"{cls.__name__}.name must be a lower-case identifier, got {name!r}")
    unknown = set(cls.needs) - NEEDS
    if unknown:
        raise ValueError(f"{cls.__name__}.needs names {sorted(unknown)}; a method may need {sorted(NEEDS)}")
    other = _REGISTRY.get(name)
    if other is not None and type(other) is not cls:
        raise ValueError(f"method name {name!r} is taken by {type(other).__module__}.{type(other).__name__}")
    _REGISTRY[name] = cls()
    return cls


def _load_builtins() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = importlib.import_module("nvflare_unlearn.unlearning.methods")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, UnlearningMethod) and obj.__module__ == module.__name__:
                if obj.name:
                    register(obj)


def all_methods() -> dict[str, UnlearningMethod]:
    """Every registered method by name, in registration order (built-ins alphabetically by module)."""
    _load_builtins()
    return dict(_REGISTRY)


def method_names() -> tuple[str, ...]:
    return tuple(all_methods())


def get_method(name: str) -> UnlearningMethod:
    """The method called ``name``; an unknown name raises ValueError listing the registered ones."""
    found = all_methods().get(name)
    if found is None:
        raise ValueError(f"unknown unlearning method {name!r}; registered: {', '.join(method_names())}")
    return found


#: benchmark spellings of version 0.1 that are a method plus options (kept so committed results read the same)
VARIANT_ALIASES: dict[str, dict[str, Any]] = {
    "row_reset": {"method": "finetune", "reset_rows": True},
    "prune_reinit": {"method": "prune", "prune_mode": "reinit"},
    "prune_deep": {"method": "prune", "deep_fraction": 1.0 / 3.0},
}
_VARIANT = re.compile(r"(?P<base>[a-z][a-z0-9_]*)(@(?P<ratio>[0-9]*\.?[0-9]+))?(?P<kd>\+kd)?")


def parse_variant(text: str) -> dict[str, Any]:
    """``"prune@0.2+kd"`` -> ``{"method": "prune", "prune_ratio": 0.2, "recovery": "kd"}`` (flat options)."""
    m = _VARIANT.fullmatch(str(text).strip())
    if m is None:
        raise ValueError(f"method variant {text!r} must read <method>[@<prune_ratio>][+kd], e.g. prune@0.2+kd")
    base = m["base"]
    flat = dict(VARIANT_ALIASES.get(base, {"method": base}))
    method = get_method(flat["method"])  # unknown name: the registry's error
    if m["ratio"] is not None:
        if not method.prunes:
            raise ValueError(f"{text!r}: @<ratio> is a pruning ratio, and {method.name!r} does not prune")
        flat["prune_ratio"] = float(m["ratio"])
    flat["recovery"] = "kd" if m["kd"] or method.always_distils else "ce"
    return flat


def variant_label(flat: dict[str, Any]) -> str:
    """The inverse of ``parse_variant`` for options it can spell (the table label of a method and its options)."""
    base = str(flat["method"])
    for alias, spec in VARIANT_ALIASES.items():
        if all(flat.get(k) == v for k, v in spec.items()):
            base = alias
    ratio = flat.get("prune_ratio")
    label = base + (f"@{ratio:g}" if ratio is not None else "")
    kd = flat.get("recovery") == "kd" and not get_method(str(flat["method"])).always_distils
    return label + ("+kd" if kd else "")
