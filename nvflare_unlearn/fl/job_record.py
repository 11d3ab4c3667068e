"""The metrics record of a job (``unlearning_metrics.json``; the CLI's ``report.json`` is built from it), typed.

The controllers fill named fields instead of a free-form dict, so a key cannot be misspelt or forgotten; ``to_dict``
gives the file its keys (a field never set is left out, as before). The record is also what a resumed job restores:
``UnlearningRecord.resume_state`` is saved with every round's model, and :func:`resume_problem` is the one check,
at the recipe (before the job) and at the controller (against the files the server holds), that a saved state
belongs to the request that resumes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence


@dataclass
class JobRecord:
    """What every job records about its model; ``to_dict`` is the metrics file's content."""

    model_name: Optional[str] = None
    num_classes: Optional[int] = None
    forget_classes: Optional[list[int]] = None

    def to_dict(self) -> dict[str, Any]:
        """The fields set so far, in declaration order (a job that fails half-way writes what it has)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class TrainingRecord(JobRecord):
    """Pretraining / retraining (``FedAvgEvalController``): the starting model's evaluation, every round's, the last."""

    federation: Optional[dict] = None
    started_at: Optional[float] = None
    params: Optional[int] = None
    params_full: Optional[int] = None
    initial: Optional[dict] = None
    per_round: Optional[list[dict]] = None
    rounds: Optional[int] = None
    final: Optional[dict] = None


@dataclass
class UnlearningRecord(JobRecord):
    """An unlearning job (``UnlearningController``): the request, the original, the prepared (``pruned``) and the
    unlearned model's evaluations, the statistics passes, the rounds, the sites' losses and the forgetting check."""

    #: what a resumed job takes over from the job it continues (the rest is its own)
    RESUMED: ClassVar[tuple[str, ...]] = (
        "original",
        "pruned",
        "activation_rounds",
        "plan_summary",
        "params_before",
        "params_after",
        "steps_before",
    )

    options: Optional[dict] = None
    quorum: Optional[dict] = None
    started_at: Optional[float] = None
    params_before: Optional[int] = None
    original_model: Optional[dict] = None
    resumed: Optional[dict] = None
    steps_before: Optional[int] = None
    original: Optional[dict] = None
    verification_original: Optional[dict] = None
    activation_rounds: Optional[list[dict]] = None
    plan_summary: Optional[dict] = None
    params_after: Optional[int] = None
    pruned: Optional[dict] = None
    per_round: Optional[list[dict]] = None
    rounds: Optional[int] = None
    unlearned: Optional[dict] = None
    objective: Optional[dict] = None
    verification: Optional[dict] = None
    files: Optional[dict] = None
    seconds: Optional[float] = None

    def resume_state(self, rounds_done: int, history: Sequence[dict], prune_mode: str, options: dict) -> Optional[dict]:
        """What a later job needs to go on after ``rounds_done`` fine-tuning rounds (saved with the model); None
        before the model is prepared (nothing to go on from)."""
        if self.pruned is None:
            return None
        record = {k: getattr(self, k) for k in self.RESUMED if getattr(self, k) is not None}
        record["per_round"] = list(history)
        return dict(
            round=int(rounds_done),
            forget_classes=list(self.forget_classes or []),
            prune_mode=prune_mode,
            options=options,
            original_sha256=(self.original_model or {}).get("sha256"),
            started_at=self.started_at,
            record=record,
        )

    def restore(self, state: Mapping[str, Any]) -> list[dict]:
        """Take over the saved record of ``state`` (from :meth:`resume_state`); returns the rounds it holds."""
        saved = dict(state.get("record") or {})
        for name in self.RESUMED:
            if name in saved:
                setattr(self, name, saved[name])
        return list(saved.get("per_round", []))[: int(state["round"])]


def resume_problem(
    state: Mapping[str, Any],
    forget_classes: Sequence[int],
    num_rounds: int,
    *,
    original_sha256: Optional[str] = None,
    prune_mode: Optional[str] = None,
    source: str = "resume_from",
) -> Optional[str]:
    """Why the saved job ``state`` cannot be continued by this request (None: it can). The original's hash and the
    prune mode are checked when given (the server knows them; the recipe may not have the file)."""
    if list(state.get("forget_classes") or []) != list(forget_classes):
        return (
            f"{source} was saved by a job forgetting {state.get('forget_classes')}, this job forgets "
            f"{list(forget_classes)}: resume with the same request"
        )
    if original_sha256 is not None and state.get("original_sha256") != original_sha256:
        return (
            f"{source} was saved from another original model (SHA-256 differs from initial_ckpt's): "
            "give the original checkpoint of the interrupted job as initial_ckpt"
        )
    if prune_mode is not None and state.get("prune_mode") != prune_mode:
        return f"{source} was pruned in {state.get('prune_mode')!r} mode, this job uses {prune_mode!r}"
    if int(state["round"]) >= num_rounds:
        return (
            f"{source} already holds {state['round']} fine-tuning round(s) and num_rounds={num_rounds}: it leaves "
            "nothing to do (raise num_rounds to fine-tune further)"
        )
    return None
