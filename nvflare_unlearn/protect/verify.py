"""Checking an unlearning record against the files an auditor holds (:func:`verify_record`).

A signed record only proves who wrote it; these checks prove it describes the files in hand: forget classes = the
plan's new steps, the prune ratio = the units each step removed, parameter counts = the model files, metrics = the
job's metrics file, the original checkpoint unchanged. Each check is a small function below, run in a fixed order;
every failure names its reason, and what cannot be checked with the files given is listed as skipped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from nvflare_unlearn.protect.record import plan_sha256, pruned_channels, read_record, record_digest, sha256_file
from nvflare_unlearn.protect.signing import load_public_key, signature_problem

_METRIC_KEYS = ("u_acc", "r_acc", "acc")


@dataclass
class VerificationResult:
    """Outcome of :func:`verify_record`: ``ok`` only when every check passed; ``mismatches`` say what did not,
    ``skipped`` what could not be checked with the files given."""

    ok: bool
    mismatches: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [("OK" if self.ok else "MISMATCH") + f": {len(self.checks)} check(s), {len(self.mismatches)} failed"]
        lines += [f"  ok   {c}" for c in self.checks if not any(m.startswith(c + ":") for m in self.mismatches)]
        lines += [f"  FAIL {m}" for m in self.mismatches]
        lines += [f"  skip {m}" for m in self.skipped]
        return "\n".join(lines)

    def check(self, name: str, passed: bool, why: str) -> None:
        """Count check ``name``; a failure keeps ``why`` (``ok`` is settled when all checks ran)."""
        self.checks.append(name)
        if not passed:
            self.mismatches.append(f"{name}: {why}")


def _expected_units(plan: Any, index: int) -> int | None:
    """Units step ``index`` of ``plan`` must remove by its own options (the rule of ``method.selection``)."""
    step = plan.steps[index]
    opts = step.get("options") or {}
    ratio, scope, min_channels = opts.get("ratio"), opts.get("scope", "global"), int(opts.get("min_channels", 1))
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
        return None
    if scope == "global":
        return max(1, int(round(ratio * sum(plan.convs[k] for k in plan.group_keys))))
    before = plan.pruned_units(index)
    return sum(
        min(int(round(ratio * plan.convs[k])), max(plan.convs[k] - len(before[k]) - min_channels, 0))
        for k in plan.group_keys
    )


def _plan_beside(record_path: Path, want_sha: str) -> tuple[Any, str | None]:
    """(the plan in ``pruning_plan.json`` beside the record if it hashes to the recorded plan, else None; why not)."""
    from nvflare_unlearn.method.plan import PruningPlan

    side = record_path.parent / "pruning_plan.json"
    if not side.is_file():
        return None, "the model carries no plan and there is no pruning_plan.json beside the record"
    try:
        text = side.read_text(encoding="utf-8")
        if plan_sha256(text) != want_sha:
            return None, "pruning_plan.json beside the record is not the recorded plan"
        return PruningPlan.from_json(text), None
    except (OSError, ValueError) as exc:
        return None, f"pruning_plan.json beside the record is unreadable: {str(exc)[:120]}"


def _find_metrics(record_path: Path) -> Path | None:
    for name in ("unlearning_metrics.json", "job_metrics.json"):
        if (record_path.parent / name).is_file():
            return record_path.parent / name
    return None


# ------------------------------------------------------------------------------------------------ the checks
def _check_signature(out: VerificationResult, record: Mapping[str, Any], public_key: Any) -> None:
    """The signature against the auditor's own key: without one this check fails (the digest proves nothing)."""
    if public_key is None:
        out.check("signature", False, "no public key given: pass the server's public key you hold (--public-key)")
        return
    try:
        key = load_public_key(public_key) if isinstance(public_key, (str, os.PathLike)) else public_key
        problem = signature_problem(record, key)
    except (ValueError, FileNotFoundError) as exc:
        problem = str(exc)
    out.check("signature", problem is None, problem or "")


def _check_digest_and_model(out: VerificationResult, record: Mapping[str, Any], model: Path) -> None:
    """The record's own digest, and the model file in hand = the record's final model (not its original)."""
    digest = record_digest(record)
    out.check(
        "record content digest",
        record.get("content_sha256") == digest,
        f"the record was edited after it was written (stored {record.get('content_sha256')}, computed {digest})",
    )
    actual = sha256_file(model)
    want = record["models"]["final"]["sha256"]
    why = f"{str(model)!r} has SHA-256 {actual}, the record's final model {want}"
    if actual == record["models"]["original"]["sha256"]:
        why += " (this is the ORIGINAL model, not the unlearned one)"
    out.check("final model SHA-256", actual == want, why)


def _check_plan(out: VerificationResult, record: Mapping[str, Any], record_path: Path, embedded: Any):
    """The plan in the checkpoint (or, for a dense model, ``pruning_plan.json`` beside the record) = the recorded
    plan, with the same pruned channels. Returns (the plan to read the steps from or None, why there is none)."""
    parameters = (record.get("request") or {}).get("parameters") or {}
    plan_obj, problem = embedded, None
    if embedded is None:
        plan_obj, problem = _plan_beside(record_path, record["plan"]["sha256"])
        if record["plan"].get("num_pruned", 1) == 0:
            out.checks.append("embedded plan SHA-256")  # nothing pruned, nothing embedded: consistent
        elif ((parameters.get("plan") or {}).get("prune_mode")) == "reinit" and plan_obj is not None:
            out.skipped.append("embedded plan SHA-256: a reinit model is dense; its plan is pruning_plan.json")
        else:
            out.check("embedded plan SHA-256", False, "the checkpoint carries no pruning plan")
    else:
        got = plan_sha256(embedded)
        out.check(
            "embedded plan SHA-256",
            got == record["plan"]["sha256"],
            f"the checkpoint's plan hashes to {got}, the record's plan to {record['plan']['sha256']}",
        )
    if plan_obj is not None:
        out.check(
            "pruned channels",
            pruned_channels(plan_obj) == record["plan"]["pruned_channels"],
            "the record's pruned channels per layer differ from the checkpoint's plan",
        )
    return plan_obj, problem


def _method_prunes(name: Any) -> bool:
    """Whether the record's method pruned (the registry's declaration; a name this install does not know is
    checked as a pruning method, the strictest reading)."""
    from nvflare_unlearn.unlearning import all_methods

    found = all_methods().get(name) if isinstance(name, str) else None
    return True if found is None else found.prunes


def _check_steps(out: VerificationResult, record: Mapping[str, Any], plan_obj: Any, problem: str | None) -> None:
    """Forget classes = the plan's new steps (none for a method that does not prune), and each new step removed
    the units its ratio gives, at the ratio the request names."""
    request = record.get("request") or {}
    parameters = request.get("parameters") or {}
    before = int(record["plan"].get("steps_before", 0) or 0)
    new_steps = plan_obj.steps[before:] if plan_obj is not None else []
    planned = sorted(int(st["forget_class"]) for st in new_steps if st.get("forget_class") is not None)
    method = (parameters.get("unlearning") or {}).get("method", "prune")
    prunes = _method_prunes(method)
    expected = sorted(request.get("forget_classes") or []) if prunes else []
    if plan_obj is None and prunes and record["plan"].get("num_pruned", 0) > 0:
        out.skipped.append(f"forget classes = plan steps: {problem or 'no plan to read the steps from'}")
        return
    out.check(
        "forget classes = plan steps",
        planned == expected and len(planned) == len(new_steps),
        f"the request ({method}) names classes {request.get('forget_classes')}, the plan's new steps forgot {planned}",
    )
    ratio = (parameters.get("plan") or {}).get("prune_ratio")
    problems = []
    for i in range(before, len(plan_obj.steps) if plan_obj is not None else 0):
        st = plan_obj.steps[i]
        units = sum(len(v) for v in st["pruned"].values())
        expected_units = _expected_units(plan_obj, i)
        step_ratio = (st.get("options") or {}).get("ratio")
        if ratio is not None and step_ratio != ratio:
            problems.append(f"step {i} used ratio {step_ratio}, the request {ratio}")
        if expected_units is None or units != expected_units:
            problems.append(f"step {i} removed {units} units, its ratio gives {expected_units}")
    out.check("prune ratio = units pruned", not problems, "; ".join(problems[:3]))


def _check_params_after(out: VerificationResult, record: Mapping[str, Any], net: Any) -> None:
    recorded = record["models"]["final"].get("params")
    if recorded is None:
        out.skipped.append("parameters after: the record has no parameter count")
        return
    count = sum(p.numel() for p in net.parameters())
    out.check("parameters after", count == recorded, f"the model file has {count} parameters, the record {recorded}")


def _check_final_model(
    out: VerificationResult, record: Mapping[str, Any], record_path: Path, model: Path, allow_import: Sequence[str]
) -> None:
    """Everything read from the final checkpoint: its plan, the steps and ratio, its parameter count."""
    from nvflare_unlearn.method.checkpoint import load_checkpoint

    try:
        net, embedded, _ = load_checkpoint(model, allow_import=allow_import)
    except Exception as exc:  # any failure to load is a verification failure, reported, not raised
        out.check("embedded plan", False, f"cannot load the checkpoint's plan: {type(exc).__name__}: {str(exc)[:300]}")
        return
    plan_obj, problem = _check_plan(out, record, record_path, embedded)
    _check_steps(out, record, plan_obj, problem)
    _check_params_after(out, record, net)


def _check_original(
    out: VerificationResult, record: Mapping[str, Any], original: str | os.PathLike, allow_import: Sequence[str]
) -> None:
    """The original checkpoint unchanged (its hash), and its parameter count = the record's. Its model is built by
    the recorded name: an import path is imported only when ``allow_import`` lists its module."""
    from nvflare_unlearn.method.checkpoint import load_checkpoint
    from nvflare_unlearn.models.registry import import_path_module, is_import_path

    orig = sha256_file(original)
    out.check(
        "original model unchanged",
        orig == record["models"]["original"]["sha256"],
        f"{str(original)!r} has SHA-256 {orig}, recorded {record['models']['original']['sha256']}",
    )
    request = record.get("request") or {}
    recorded = record["models"]["original"].get("params")
    name = request.get("model_name")
    if recorded is None or not isinstance(name, str):
        out.skipped.append("parameters before: the record has no parameter count or model name")
    elif is_import_path(name) and not any(
        import_path_module(name) == m or import_path_module(name).startswith(m + ".") for m in allow_import
    ):
        out.check("parameters before", False, f"the record's model {name[:80]!r} is an import path: allow its module")
    else:
        try:
            orig_net, _, _ = load_checkpoint(original, model_name=name, num_classes=request.get("num_classes"))
            count = sum(p.numel() for p in orig_net.parameters())
            out.check("parameters before", count == recorded, f"the original has {count}, the record {recorded}")
        except Exception as exc:
            out.check("parameters before", False, f"cannot load the original: {type(exc).__name__}: {str(exc)[:200]}")


def _check_metrics(out: VerificationResult, record: Mapping[str, Any], mpath: Path | None) -> None:
    """The record's metrics = the job's metrics file (``unlearning_metrics.json`` or the CLI's ``job_metrics.json``)."""
    if mpath is None:
        out.skipped.append("metrics: no metrics file beside the record (pass --metrics)")
        return
    try:
        job = json.loads(mpath.read_text(encoding="utf-8"))
        diffs = [
            f"{stage}.{k}: record {record['metrics'][which].get(k)}, metrics file {job[stage].get(k)}"
            for which, stage in (("before", "original"), ("after", "unlearned"))
            for k in _METRIC_KEYS
            if k in record["metrics"][which]
            and not math.isclose(float(record["metrics"][which][k]), float(job[stage].get(k)), abs_tol=1e-12)
        ]
        out.check("metrics = job's metrics file", not diffs, "; ".join(diffs[:3]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        out.check("metrics = job's metrics file", False, f"{str(mpath)!r} is unreadable: {type(exc).__name__}")


def verify_record(
    record_path: str | os.PathLike,
    model_path: str | os.PathLike,
    original_model_path: str | os.PathLike | None = None,
    *,
    public_key: Any = None,
    metrics_path: str | os.PathLike | None = None,
    allow_import: Sequence[str] = (),
) -> VerificationResult:
    """Check a record's signature and its consistency with the model file (and the original, the metrics).

    Checks, each failure naming its reason: the signature against ``public_key`` (a key object or a PEM / certificate
    path: the auditor's own copy; without one the check fails); the record digest; the model file's SHA-256; the
    plan embedded in the checkpoint (hash, pruned channels); forget classes = the plan's new steps; the prune ratio
    = the units each new step removed; the parameter count of the final model (and, with ``original_model_path``,
    of the original) = the record's; the metrics = the job's metrics file (``metrics_path``, or
    ``unlearning_metrics.json`` / ``job_metrics.json`` beside the record; skipped when there is none); the original
    file unchanged. Loading a model never imports a module named in a file unless ``allow_import`` lists it.
    """
    record_path = Path(record_path)
    record = read_record(record_path)
    out = VerificationResult(ok=False)
    _check_signature(out, record, public_key)
    _check_digest_and_model(out, record, Path(model_path))
    _check_final_model(out, record, record_path, Path(model_path), allow_import)
    if original_model_path is not None:
        _check_original(out, record, original_model_path, allow_import)
    else:
        out.skipped.append("original model unchanged: no --original given")
    _check_metrics(out, record, Path(metrics_path) if metrics_path is not None else _find_metrics(record_path))
    out.ok = not out.mismatches
    return out
