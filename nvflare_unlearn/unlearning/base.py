"""What an unlearning method is: a name, what it needs, and the terms a site adds to its training loss.

A method is one small subclass of ``UnlearningMethod`` in ``unlearning/methods/`` (the way torch-pruning extends
``Importance`` and NVFlare extends aggregators). The registry finds it by its ``name``; everything else (option
validation, CLI help, the job's phases, the sites' objective, the docs table, the benchmark's method list) reads
these declarations, so adding a method touches no other module.

The contract, per training round at a site:

- ``retained_term`` on every retained batch (default: cross-entropy, plus distillation from the original model
  when the method distils: it ``needs`` the ``teacher``, or ``recovery="kd"``);
- ``forget_term`` on a forget-class batch drawn alongside, when it ``needs`` ``forget_data`` (added with
  ``forget_weight``);
- ``before_step`` between ``backward()`` and the optimizer step (e.g. a saliency mask on the gradients);
- the server prepares the model first: a method that ``needs`` a ``plan`` gets the activation + TF-IDF phase.

Pure torch: no NVFlare, so the executor, the Client API helpers and the in-process federation share it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FORGET_LOSS_CAP", "NEEDS", "RECOVERIES", "ObjectiveView", "UnlearningMethod"]

#: what a method may need beyond the retained data: forget-class images at the sites, the original model as
#: teacher (whatever ``recovery`` says), a pruning plan from the sites' activation statistics
NEEDS = frozenset({"forget_data", "teacher", "plan"})

#: what a site's retained term can be: cross-entropy, or cross-entropy + distillation from the original model
RECOVERIES = ("ce", "kd")

#: cap (in multiples of ln K, chance-level cross-entropy) beyond which an ascent term stops pushing
FORGET_LOSS_CAP = 2.0


class ObjectiveView(Protocol):
    """What a method's terms may read of the site's objective (``objective.UnlearningObjective``) this round."""

    options: Any  # the round's resolved MethodOptions: kd_temperature, kd_weight, forget_weight
    teacher: nn.Module | None
    forget: list[int]
    retained: list[int]
    num_classes: int
    generator: torch.Generator  # the site's seeded generator (reproducible draws)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor: ...

    def distillation(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class UnlearningMethod:
    """One unlearning method. Subclasses set the class attributes and override the terms they change."""

    #: the name users write (``method="..."``, ``--method ...``); unique in the registry
    name: ClassVar[str] = ""
    #: one line for the CLI's help and the docs' method table
    summary: ClassVar[str] = ""
    #: what the method needs beyond the sites' retained data (``NEEDS``); the job provides exactly these
    needs: ClassVar[frozenset[str]] = frozenset()

    # -- declarations the job reads ----------------------------------------------------------------------------
    @property
    def uses_forget_data(self) -> bool:
        """The sites also train on the forget classes they hold (``forget_term``)."""
        return "forget_data" in self.needs

    @property
    def always_distils(self) -> bool:
        """Distils from the original model whatever ``recovery`` says (the teacher travels with the train task)."""
        return "teacher" in self.needs

    @property
    def prunes(self) -> bool:
        """The server scores channels on the sites' activation statistics and applies a pruning plan first."""
        return "plan" in self.needs

    def uses_teacher(self, recovery: str) -> bool:
        """Whether the sites need the original model (the teacher) this round."""
        return self.always_distils or recovery == "kd"

    def site_loss(self, recovery: str) -> str:
        """The loss a site minimises with ``recovery``, by name: what it reports and the server compares. A method
        with a forget term is ``<name>+<recovery>``, or its name alone when it always distils (its recovery is
        fixed); one without is its recovery (``ce``, ``kd``): it trains like fine-tuning."""
        if not self.uses_forget_data:
            return str(recovery)
        return self.name if self.always_distils else f"{self.name}+{recovery}"

    def site_losses(self) -> set[str]:
        """Every loss name this method can make a site report (the server rejects any other)."""
        return {self.site_loss(r) for r in RECOVERIES}

    # -- the site's loss terms ------------------------------------------------------------------------------
    def retained_term(self, obj: ObjectiveView, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor):
        """Cross-entropy on a retained batch, plus masked distillation when the method distils."""
        loss = F.cross_entropy(logits, y)
        if obj.teacher is not None:
            loss = loss + obj.options.kd_weight * obj.distillation(logits, x)
        return loss

    def forget_term(self, obj: ObjectiveView, model: nn.Module, xf: torch.Tensor, yf: torch.Tensor):
        """The term on a forget-class batch (only called when ``uses_forget_data``)."""
        raise NotImplementedError(f"method {self.name!r} declares uses_forget_data but has no forget_term")

    def before_step(self, obj: ObjectiveView, model: nn.Module) -> None:
        """Runs after ``backward()`` and before the optimizer step of every batch (default: nothing)."""

    # -- helpers the terms share ----------------------------------------------------------------------------------
    @staticmethod
    def capped_ascent(values: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``-mean(min(values, cap))``: push a per-example loss up, but not past ``FORGET_LOSS_CAP`` x chance."""
        return -torch.clamp(values, max=FORGET_LOSS_CAP * math.log(num_classes)).mean()
