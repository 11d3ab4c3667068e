"""Unlearning methods: one registry, one module per method, one site path, one default (pure torch).

Owns what an unlearning method is (``base.UnlearningMethod``: what it needs, the terms a site adds to its loss, a
hook between backward and step), the registry that finds every module in ``methods/`` (``registry``), the method's
option group (``options.MethodOptions``), the batch loss and the report a site sends (``objective``), the one
function the executor, the Client API helpers and the in-process federation build it with (``site``), and the
job's default method with the rule that picks it from the committed evidence (``defaults``). May import
``options``, ``models``, ``data``, ``method``, ``runtime``; never ``protect``, ``evaluation``, ``fl``, ``cli`` or
nvflare. Adding a method: one module in ``methods/`` and its test (docs/design.md).
"""

from nvflare_unlearn.unlearning.base import FORGET_LOSS_CAP, UnlearningMethod
from nvflare_unlearn.unlearning.defaults import MethodDefault, measured_defaults
from nvflare_unlearn.unlearning.objective import (
    OBJECTIVE_HINT,
    UnlearningObjective,
    objective_check,
    reported_loss,
    site_losses,
)
from nvflare_unlearn.unlearning.options import JOB_GROUPS, RECOVERIES, MethodOptions
from nvflare_unlearn.unlearning.registry import (
    all_methods,
    get_method,
    method_names,
    parse_variant,
    register,
    variant_label,
)
from nvflare_unlearn.unlearning.site import site_objective

__all__ = [
    "FORGET_LOSS_CAP",
    "JOB_GROUPS",
    "OBJECTIVE_HINT",
    "RECOVERIES",
    "MethodDefault",
    "MethodOptions",
    "UnlearningMethod",
    "UnlearningObjective",
    "all_methods",
    "get_method",
    "measured_defaults",
    "method_names",
    "objective_check",
    "parse_variant",
    "register",
    "reported_loss",
    "site_losses",
    "site_objective",
    "variant_label",
]
