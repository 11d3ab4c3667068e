"""The audit record of one unlearning request (``unlearning_record.json``): its schema, how it is assembled from a
job's outcome, written and read back. Signing is :mod:`.signing`, checking a record against its files :mod:`.verify`.

Unlearning is a compliance action: afterwards someone must be able to show which request was served, on which
model, with which plan, by which sites, with what effect, and that the model file in hand is the one produced.
The record holds SHA-256 digests of the original and final model files and of the pruning plan (canonical JSON),
the parameter counts before and after, and the metrics; ``content_sha256`` catches accidental edits (the signature,
not the digest, is what proves who wrote it).
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
from pathlib import Path
from typing import Any, Mapping, Sequence

from nvflare_unlearn import _io
from nvflare_unlearn.options import PrivacyOptions

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


def canonical_json(obj: Any) -> bytes:
    """The bytes digests and signatures are computed over: equal data gives equal bytes however it was written."""
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
    return hashlib.sha256(canonical_json(_plan_obj(plan))).hexdigest()


def pruned_channels(plan: Any) -> dict[str, list[int]]:
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
    """SHA-256 of the record's canonical JSON without its ``content_sha256`` and ``signature`` fields."""
    body = {k: v for k, v in record.items() if k not in ("content_sha256", "signature")}
    return hashlib.sha256(canonical_json(body)).hexdigest()


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
    model_name: str | None = None,
    params_before: int | None = None,
    params_after: int | None = None,
    steps_before: int = 0,
    capped_sites: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``unlearning_record.json`` content for one request, with digests of both model files and the plan.

    ``parameters``: the request's settings (prune ratio, rounds, aggregation method, min_count, epsilon/delta, ...),
    stored as given (must be JSON). ``site_counts``: per-class counts each participating site reported, after
    min-count (empty for a method that collects no statistics). ``trained_sites``: the sites whose updates entered
    the fine-tuning average. ``rejected_sites``: site -> reason for sites whose report was screened out;
    ``capped_sites``: site -> why its weight was capped. ``metrics_*``: ``u_acc`` and ``r_acc`` as fractions,
    ``mia`` when measured. Pruned channels per layer come from the plan itself.
    ``verification``: the forgetting check the job ran at the sites (``runtime.verification``), as plain JSON.
    ``model_name``, ``params_before`` / ``params_after`` (parameter counts of the original and final model) and
    ``steps_before`` (plan steps the original checkpoint already had) let :func:`verify_record` check the record
    against the files.
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
        params = json.loads(canonical_json(dict(parameters)))
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
    pruned = pruned_channels(plan)
    for what, value in (("params_before", params_before), ("params_after", params_after)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{what} must be a positive integer (parameter count) or None; got {value!r}")
    steps = plan_data.get("steps") if isinstance(plan_data, Mapping) else None
    if isinstance(steps_before, bool) or not isinstance(steps_before, numbers.Integral) or steps_before < 0:
        raise ValueError(f"steps_before must be a non-negative integer; got {steps_before!r}")
    if not isinstance(steps, list) or len(steps) - int(steps_before) not in (0, len(classes)):
        raise ValueError(
            f"the plan's new steps ({'?' if not isinstance(steps, list) else len(steps) - int(steps_before)}) must "
            f"be one per forget class ({len(classes)}), or none for a method that does not prune"
        )
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
            "steps_before": int(steps_before),
        },
        "sites": {
            "participating": _site_counts(site_counts, int(num_classes)),
            "rejected": {str(k): str(v) for k, v in (rejected_sites or {}).items()},
            "trained": sorted(str(s) for s in (trained_sites or [])),
            "capped": {str(k): str(v) for k, v in (capped_sites or {}).items()},
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
            record["verification"] = json.loads(canonical_json(dict(verification)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"verification must be plain JSON data: {exc}") from None
    if model_name is not None:
        record["request"]["model_name"] = str(model_name)
    if params_before is not None:
        record["models"]["original"]["params"] = int(params_before)
    if params_after is not None:
        record["models"]["final"]["params"] = int(params_after)
    record["content_sha256"] = record_digest(record)
    return record


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write the record as JSON, atomically; refuses to overwrite an existing file (each run keeps its own record)."""
    p = Path(path)
    if not isinstance(record, Mapping) or record.get("schema") != SCHEMA:
        raise ValueError(f"not an unlearning record (schema {SCHEMA!r} expected); build it with build_record()")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"directory {str(p.parent)!r} does not exist; create the run's output folder first")
    try:
        return _io.write_json(p, dict(record), indent=2, sort_keys=True, exclusive=True)
    except FileExistsError:
        raise FileExistsError(
            f"{str(p)!r} already exists: an audit record is never overwritten; write each run to a new directory"
        ) from None


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


# ------------------------------------------------------------------------------------------------ from a job
#: the stage metrics a record keeps (``mia`` when measured)
_STAGE_METRICS = ("u_acc", "r_acc", "acc", "mia")


def dp_noise(privacy: PrivacyOptions, activation_rounds: Sequence[Mapping[str, Any]], passes: int) -> dict[str, Any]:
    """The DP budget of each statistics pass and the noise each pass drew (``{}`` without DP): the request states
    what it asked for, so an auditor can check the noise against the budget. Sigma depends on the channels still
    present at each pass (the model shrinks pass by pass)."""
    from nvflare_unlearn.protect.privacy import gaussian_sigma, sensitivity, split_budget

    if not privacy.dp:
        return {}
    eps, delta = split_budget(privacy.dp_epsilon, privacy.dp_delta, passes)
    noise_counts = privacy.dp_unit == "add_remove_image"
    return {
        "dp_per_pass": {"epsilon": eps, "delta": delta, "passes": passes},
        "dp_sigma": [
            gaussian_sigma(eps, delta, sensitivity(a["channels"], privacy.clip_bound, noise_counts))
            for a in activation_rounds
        ],
    }


def site_outcomes(
    activation_rounds: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, list[int]], dict[str, str], dict[str, str]]:
    """(per-class counts of each site that reported, why each site was rejected, why each site's weight was capped),
    over every statistics pass: a site that sent nothing in a pass counts as rejected in it."""
    site_counts: dict[str, list[int]] = {}
    rejected: dict[str, list[str]] = {}
    capped: dict[str, list[str]] = {}
    for a in activation_rounds:
        site_counts.update(a["site_counts"])
        for site, why in a.get("capped", {}).items():
            capped.setdefault(site, []).append(f"class {a['forget_class']}: {why}")
        for site, why in a["rejected"].items():
            rejected.setdefault(site, []).append(f"class {a['forget_class']}: {why}")
        for site in a["no_result"]:
            rejected.setdefault(site, []).append(
                f"class {a['forget_class']}: no result (the site failed or timed out, see its log)"
            )
    return (
        site_counts,
        {s: "; ".join(v) for s, v in sorted(rejected.items())},
        {s: "; ".join(v) for s, v in sorted(capped.items())},
    )


def build_job_record(
    job: Mapping[str, Any],
    *,
    options: Mapping[str, Any],
    original_model_path: str | os.PathLike,
    final_model_path: str | os.PathLike,
    plan: Any,
    started_at: _dt.datetime | str | float,
    finished_at: _dt.datetime | str | float | None = None,
) -> dict[str, Any]:
    """:func:`build_record` from an unlearning job's metrics record (``unlearning_metrics.json`` content, plain
    JSON) and the option groups it ran with (``options``, as dicts). The parameters add what the sites vouch they
    applied (privacy per pass, the loss they minimised: a script may ignore the request), the resume it continued,
    and the DP noise of each pass."""
    rounds = list(job.get("activation_rounds", []))
    params: dict[str, Any] = dict(options)
    # None: the site's code did not say what it applied (e.g. a script without the client_api helpers)
    params["privacy_applied"] = {f"class {a['forget_class']}": a.get("privacy_applied") or {} for a in rounds}
    params["objective_applied"] = job.get("objective")
    if job.get("resumed"):
        params["resumed"] = job["resumed"]
    params.update(dp_noise(PrivacyOptions.from_dict(options.get("privacy")), rounds, len(job["forget_classes"])))
    site_counts, rejected, capped = site_outcomes(rounds)
    return build_record(
        forget_classes=job["forget_classes"],
        num_classes=job["num_classes"],
        parameters=params,
        original_model_path=original_model_path,
        final_model_path=final_model_path,
        plan=plan,
        site_counts=site_counts,
        metrics_before={k: job["original"][k] for k in _STAGE_METRICS if k in job["original"]},
        metrics_after={k: job["unlearned"][k] for k in _STAGE_METRICS if k in job["unlearned"]},
        started_at=started_at,
        finished_at=finished_at,
        rejected_sites=rejected,
        verification=job.get("verification"),
        trained_sites=sorted({s for e in job.get("per_round", []) for s in e.get("trained_sites", [])}),
        model_name=job["model_name"],
        params_before=job["params_before"],
        params_after=job["params_after"],
        steps_before=job.get("steps_before", 0),  # plan steps the original already had (pruned before)
        capped_sites=capped,
    )
