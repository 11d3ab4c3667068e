"""The unlearning method's option group, validated against the registry (``options`` holds the other groups).

``method`` and ``recovery`` default to None: "the job's measured default", resolved once when the job is built
(``unlearning.defaults.measured_defaults``), so a request that names no method and the exported job, the metrics and
the record all carry the concrete method. Code that builds options outside a job calls ``resolved()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nvflare_unlearn._validation import check_choice
from nvflare_unlearn.options import GROUPS, OptionGroup, _opt, _real
from nvflare_unlearn.unlearning.base import RECOVERIES, UnlearningMethod
from nvflare_unlearn.unlearning.registry import get_method, method_names

__all__ = ["JOB_GROUPS", "RECOVERIES", "MethodOptions"]


@dataclass(frozen=True)
class MethodOptions(OptionGroup):
    """Which unlearning method runs (the registry, ``unlearning.methods``), and how the model recovers."""

    GROUP: ClassVar[str] = "unlearning"
    method: str | None = _opt(None, "the unlearning method (`nvflare-unlearn methods` lists them); unset: the "
                              "measured best (unlearning.defaults)")  # fmt: skip
    recovery: str | None = _opt(
        None, "fine-tuning objective on retained data: ce, or kd (distil from the original); unset: the default's"
    )
    reset_rows: bool = _opt(False, "also re-initialise the forget classes' classifier rows before fine-tuning")
    kd_temperature: float = _opt(4.0, "distillation temperature (recovery=kd, and methods that always distil)")
    kd_weight: float = _opt(1.0, "weight of the distillation term (recovery=kd, and methods that always distil)")
    forget_weight: float = _opt(1.0, "weight of the forget-class term (methods that use forget-class data)")
    verify: bool = _opt(True, "end the job with the forgetting check at the sites (membership AUC, feature probe)")

    def __post_init__(self) -> None:
        if self.method is not None:
            check_choice(self.method, "method", method_names())
        if self.recovery is not None:
            check_choice(self.recovery, "recovery", RECOVERIES)
        for name in ("reset_rows", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _real("kd_temperature", self.kd_temperature, low=0.0, low_open=True)
        _real("kd_weight", self.kd_weight, low=0.0, low_open=False)
        _real("forget_weight", self.forget_weight, low=0.0, low_open=False)

    def resolved(self) -> MethodOptions:
        """These options with an unset method or recovery filled by the measured default."""
        if self.method is not None and self.recovery is not None:
            return self
        from nvflare_unlearn.unlearning.defaults import measured_defaults

        given = {k for k in ("method", "recovery") if getattr(self, k) is not None}
        values = {**measured_defaults(given).values, **{k: getattr(self, k) for k in given}}
        return MethodOptions.from_dict({**self.to_dict(), **values})

    @property
    def spec(self) -> UnlearningMethod:
        """The registered method these options name (the default's, when unset)."""
        return get_method(self.resolved().method)  # type: ignore[arg-type]

    @property
    def needs_teacher(self) -> bool:
        return self.spec.uses_teacher(self.resolved().recovery)

    @property
    def needs_forget_data(self) -> bool:
        return self.spec.uses_forget_data

    @property
    def site_loss(self) -> str:
        """The loss a site minimises in a fine-tuning round, by name (sites report it back; the server compares)."""
        return self.spec.site_loss(self.resolved().recovery)

    def without_forget_data(self) -> MethodOptions:
        """What a site that holds no forget-class image runs: the retained term of the same recovery."""
        return MethodOptions.from_dict({**self.resolved().to_dict(), "method": "finetune"})


#: every option group of an unlearning job (the recipe's keywords, the CLI's flags)
JOB_GROUPS: tuple[type[OptionGroup], ...] = (MethodOptions, *GROUPS)
