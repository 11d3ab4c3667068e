"""The audit record of one unlearning request (``unlearning_record.json``) and its verification.

Unlearning is a compliance action: afterwards someone must be able to show which request was served, on which
model, with which plan, by which sites, with what effect, and that the model file in hand is the one produced.
The record holds SHA-256 digests of the original and final model files and of the pruning plan (canonical JSON),
so :func:`verify_record` can tell whether a model file is the one the record describes and whether the plan
embedded in that checkpoint is the plan that was recorded. ``content_sha256`` covers the rest of the record and
catches accidental or naive edits; it is not a signature (whoever can rewrite the file can recompute it), so keep
records where they cannot be rewritten, or sign them, when forgery matters.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import math
import numbers
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

SCHEMA = "nvflare_unlearn.unlearning_record/1"
_VERSIONED = {
    "nvflare_unlearn": "nvflare-unlearn",
    "nvflare": "nvflare",
    "torch": "torch",
    "torch_pruning": "torch-pruning",
    "numpy": "numpy",
}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, streamed (checkpoints can be large)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"cannot hash {str(p)!r}: no such file")
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _plan_obj(plan: Any) -> Any:
    """A plan as plain JSON data: accepts a PruningPlan (``to_json()``), its JSON text, or the decoded dict."""
    if hasattr(plan, "to_json"):
        plan = plan.to_json()
    if isinstance(plan, (str, bytes)):
        try:
            return json.loads(plan)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan is not valid JSON: {exc}") from None
    if isinstance(plan, Mapping):
        return plan
    raise ValueError(f"plan must be a PruningPlan, its JSON text or a dict; got {type(plan).__name__}")


def plan_sha256(plan: Any) -> str:
    """SHA-256 of the plan's canonical JSON (sorted keys, no whitespace): equal plans hash equal however formatted."""
    return hashlib.sha256(_canonical(_plan_obj(plan))).hexdigest()


def _pruned_channels(plan: Any) -> dict[str, list[int]]:
    """``{layer: sorted original channel indices}`` from the plan's own ``pruned_channels()``."""
    if not hasattr(plan, "pruned_channels"):
        from nvflare_unlearn.method.plan import PruningPlan

        plan = PruningPlan.from_json(json.dumps(_plan_obj(plan)))
    return {str(k): sorted(int(i) for i in v) for k, v in plan.pruned_channels().items()}


def _timestamp(value: _dt.datetime | str | float | None) -> str:
    """ISO 8601 UTC text from a tz-aware datetime, an ISO string, or ``time.time()`` seconds (None = now)."""
    if value is None:
        return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"timestamp {value!r} is not a valid time.time() value")
        return _dt.datetime.fromtimestamp(value, _dt.timezone.utc).isoformat(timespec="seconds")
    if isinstance(value, str):
        try:
            _dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"timestamp {value!r} is not ISO 8601 (e.g. 2025-01-31T12:00:00+00:00)") from None
        return value
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware (use datetime.now(timezone.utc))")
        return value.astimezone(_dt.timezone.utc).isoformat(timespec="seconds")
    raise ValueError(
        f"timestamp must be a datetime, an ISO 8601 string or time.time() seconds; got {type(value).__name__}"
    )


def _metrics(m: Mapping[str, Any] | None, which: str) -> dict[str, float | None]:
    """U/R accuracy required (fractions in [0, 1]); ``mia`` and other fractions optional."""
    if not isinstance(m, Mapping):
        raise ValueError(f"metrics_{which} must be a dict with at least 'u_acc' and 'r_acc'; got {m!r}")
    missing = [k for k in ("u_acc", "r_acc") if k not in m]
    if missing:
        raise ValueError(f"metrics_{which} lacks {missing}: U-set and R-set accuracy are required")
    out: dict[str, float | None] = {}
    for key, val in m.items():
        if val is None and key not in ("u_acc", "r_acc"):
            out[str(key)] = None
            continue
        if isinstance(val, bool) or not isinstance(val, numbers.Real) or not math.isfinite(float(val)):
            raise ValueError(f"metrics_{which}[{key!r}] must be a finite number; got {val!r}")
        if key in ("u_acc", "r_acc", "mia") and not 0.0 <= float(val) <= 1.0:
            raise ValueError(f"metrics_{which}[{key!r}] must be a fraction in [0, 1]; got {val}")
        out[str(key)] = float(val)
    return out


def _site_counts(site_counts: Mapping[str, Sequence[int]], num_classes: int | None) -> dict[str, list[int]]:
    if not isinstance(site_counts, Mapping):
        raise ValueError("site_counts must map each participating site's name to its per-class counts")
    out = {}
    for site, counts in site_counts.items():
        try:
            vals = [int(c) for c in counts]
        except (TypeError, ValueError):
            raise ValueError(f"site {site!r}: counts must be a list of integers; got {counts!r}") from None
        if any(v < 0 for v in vals) or any(float(c) != int(c) for c in counts):
            raise ValueError(f"site {site!r}: counts must be non-negative integers; got {list(counts)}")
        if num_classes is not None and len(vals) != num_classes:
            raise ValueError(f"site {site!r}: {len(vals)} counts for {num_classes} classes")
        out[str(site)] = vals
    return out


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape the result, plus Python's (None where not installed)."""
    out: dict[str, str | None] = {}
    for key, dist in _VERSIONED.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    out["python"] = platform.python_version()
    return out


def record_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON without its ``content_sha256`` field."""
    body = {k: v for k, v in record.items() if k != "content_sha256"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def build_record(
    *,
    forget_classes: Sequence[int],
    num_classes: int,
    parameters: Mapping[str, Any],
    original_model_path: str | os.PathLike,
    final_model_path: str | os.PathLike,
    plan: Any,
    site_counts: Mapping[str, Sequence[int]],
    metrics_before: Mapping[str, Any],
    metrics_after: Mapping[str, Any],
    started_at: _dt.datetime | str | float,
    finished_at: _dt.datetime | str | float | None = None,
    rejected_sites: Mapping[str, str] | None = None,
    verification: Mapping[str, Any] | None = None,
    trained_sites: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``unlearning_record.json`` content for one request, with digests of both model files and the plan.

    ``parameters``: the request's settings (prune ratio, rounds, aggregation method, min_count, epsilon/delta, ...),
    stored as given (must be JSON). ``site_counts``: per-class counts each participating site reported, after
    min-count (empty for a method that collects no statistics). ``trained_sites``: the sites whose updates entered
    the fine-tuning average. ``rejected_sites``: site -> reason for sites whose report was screened out.
    ``metrics_*``: ``u_acc`` and ``r_acc`` as fractions, ``mia`` when measured. Pruned channels per layer come from
    the plan itself.
    ``verification``: the forgetting check the job ran at the sites (``evaluation.verification``), as plain JSON.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    try:
        classes = sorted({int(c) for c in forget_classes})
    except (TypeError, ValueError):
        raise ValueError(f"forget_classes must be a list of class ids; got {forget_classes!r}") from None
    if not classes or any(not 0 <= c < num_classes for c in classes) or len(classes) >= num_classes:
        raise ValueError(
            f"forget_classes {list(forget_classes)} must be a non-empty proper subset of 0..{num_classes - 1}"
        )
    if not isinstance(parameters, Mapping):
        raise ValueError(f"parameters must be a dict of the request's settings; got {type(parameters).__name__}")
    try:
        params = json.loads(_canonical(dict(parameters)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"parameters must be plain JSON data (no NaN, no objects): {exc}") from None
    original = Path(original_model_path)
    final = Path(final_model_path)
    if original.resolve() == final.resolve():
        raise ValueError("original and final model paths are the same file: the original must never be overwritten")
    if not site_counts and not trained_sites:
        raise ValueError(
            "site_counts and trained_sites are both empty: a record must name the sites that reported statistics "
            "or trained the model"
        )
    plan_data = _plan_obj(plan)
    pruned = _pruned_channels(plan)
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "request": {"forget_classes": classes, "num_classes": int(num_classes), "parameters": params},
        "models": {
            "original": {"path": str(original), "sha256": sha256_file(original), "bytes": original.stat().st_size},
            "final": {"path": str(final), "sha256": sha256_file(final), "bytes": final.stat().st_size},
        },
        "plan": {
            "sha256": plan_sha256(plan_data),
            "pruned_channels": pruned,
            "num_pruned": sum(len(v) for v in pruned.values()),
        },
        "sites": {
            "participating": _site_counts(site_counts, int(num_classes)),
            "rejected": {str(k): str(v) for k, v in (rejected_sites or {}).items()},
            "trained": sorted(str(s) for s in (trained_sites or [])),
        },
        "metrics": {"before": _metrics(metrics_before, "before"), "after": _metrics(metrics_after, "after")},
        "timestamps": {
            "started_at": _timestamp(started_at),
            "finished_at": _timestamp(finished_at),
            "recorded_at": _timestamp(None),
        },
        "versions": versions(),
    }
    if verification is not None:
        try:
            record["verification"] = json.loads(_canonical(dict(verification)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"verification must be plain JSON data: {exc}") from None
    record["content_sha256"] = record_digest(record)
    return record


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write the record as JSON; refuses to overwrite an existing file (each run keeps its own record)."""
    p = Path(path)
    if not isinstance(record, Mapping) or record.get("schema") != SCHEMA:
        raise ValueError(f"not an unlearning record (schema {SCHEMA!r} expected); build it with build_record()")
    text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    if not p.parent.is_dir():
        raise FileNotFoundError(f"directory {str(p.parent)!r} does not exist; create the run's output folder first")
    try:
        with p.open("x", encoding="utf-8") as fh:
            fh.write(text)
    except FileExistsError:
        raise FileExistsError(
            f"{str(p)!r} already exists: an audit record is never overwritten; write each run to a new directory"
        ) from None
    return p


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """Load and structurally check a record; a malformed one raises ValueError saying what is missing."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no unlearning record at {str(p)!r}")
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(p)!r} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise ValueError(f"{str(p)!r} is not an unlearning record (schema {SCHEMA!r} expected)")
    try:
        for key in ("original", "final"):
            str(record["models"][key]["sha256"])
        str(record["plan"]["sha256"])
        dict(record["plan"]["pruned_channels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{str(p)!r} lacks a required field: {exc!r}") from None
    return record


@dataclass
class VerificationResult:
    """Outcome of :func:`verify_record`: ``ok`` only when every check passed; ``mismatches`` say what did not."""

    ok: bool
    mismatches: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [("OK" if self.ok else "MISMATCH") + f": {len(self.checks)} check(s), {len(self.mismatches)} failed"]
        lines += [f"  ok   {c}" for c in self.checks if not any(m.startswith(c + ":") for m in self.mismatches)]
        lines += [f"  FAIL {m}" for m in self.mismatches]
        return "\n".join(lines)


def verify_record(
    record_path: str | os.PathLike,
    model_path: str | os.PathLike,
    original_model_path: str | os.PathLike | None = None,
) -> VerificationResult:
    """Check a model file (and optionally the original) against an unlearning record.

    Checks: the record's own digest; the model file's SHA-256 equals the recorded final model's; the plan embedded
    in the checkpoint hashes to the recorded plan and prunes the recorded channels; with ``original_model_path``, the
    original file is byte-identical to the one recorded (it must never be modified).
    """
    record = read_record(record_path)
    model = Path(model_path)
    checks: list[str] = []
    bad: list[str] = []

    def check(name: str, passed: bool, why: str) -> None:
        checks.append(name)
        if not passed:
            bad.append(f"{name}: {why}")

    digest = record_digest(record)
    check(
        "record content digest",
        record.get("content_sha256") == digest,
        f"the record was edited after it was written (stored {record.get('content_sha256')}, computed {digest})",
    )
    actual = sha256_file(model)
    want = record["models"]["final"]["sha256"]
    why = f"{str(model)!r} has SHA-256 {actual}, the record's final model {want}"
    if actual == record["models"]["original"]["sha256"]:
        why += " (this is the ORIGINAL model, not the unlearned one)"
    check("final model SHA-256", actual == want, why)

    try:
        from nvflare_unlearn.method.checkpoint import load_checkpoint

        _, embedded, _ = load_checkpoint(model)
    except Exception as exc:  # any failure to load is a verification failure, reported, not raised
        check("embedded plan", False, f"cannot load the checkpoint's plan: {type(exc).__name__}: {exc}")
    else:
        if embedded is None:
            check("embedded plan SHA-256", False, "the checkpoint carries no pruning plan")
        else:
            got = plan_sha256(embedded)
            check(
                "embedded plan SHA-256",
                got == record["plan"]["sha256"],
                f"the checkpoint's plan hashes to {got}, the record's plan to {record['plan']['sha256']}",
            )
            channels = _pruned_channels(embedded)
            check(
                "pruned channels",
                channels == record["plan"]["pruned_channels"],
                "the record's pruned channels per layer differ from the checkpoint's plan",
            )

    if original_model_path is not None:
        orig = sha256_file(original_model_path)
        check(
            "original model unchanged",
            orig == record["models"]["original"]["sha256"],
            f"{str(original_model_path)!r} has SHA-256 {orig}, recorded {record['models']['original']['sha256']}",
        )
    return VerificationResult(ok=not bad, mismatches=bad, checks=checks)
