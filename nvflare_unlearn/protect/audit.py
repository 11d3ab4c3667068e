"""The audit record of one unlearning request (``unlearning_record.json``), its signature and its verification.

Unlearning is a compliance action: afterwards someone must be able to show which request was served, on which
model, with which plan, by which sites, with what effect, and that the model file in hand is the one produced.
The record holds SHA-256 digests of the original and final model files and of the pruning plan (canonical JSON),
the parameter counts before and after, and the metrics; ``content_sha256`` catches accidental edits.

The server SIGNS the record (:func:`sign_record`): Ed25519 with a key kept outside the run folder (a configured key
file, or in the simulator and the CLI a key of this user, created on first use in :func:`default_key_dir`), or the
provisioned server identity (``startup/server.key``, RSA-PSS) in POC and production. Whoever can rewrite the run
folder can recompute the digest, but not the signature. An auditor checks the signature against a public key they
hold (obtained from the server's operator, or the server certificate checked against the federation's root CA:
the copy written next to the outputs is a convenience, not a trust anchor) and the record's consistency with the
files (:func:`verify_record`): forget classes = the plan's new steps, the prune ratio = the units each step
removed, parameter counts = the model files, metrics = the job's metrics file, the original checkpoint unchanged.
"""

from __future__ import annotations

import base64
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

from nvflare_unlearn import _io

SCHEMA = "nvflare_unlearn.unlearning_record/1"
#: Environment variable naming the folder of this user's record-signing key (simulator and CLI runs).
KEY_DIR_ENV = "NVFLARE_UNLEARN_KEY_DIR"
KEY_FILE = "record_signing_ed25519.pem"
PUBLIC_KEY_FILE = "record_signing_ed25519.pub.pem"
_METRIC_KEYS = ("u_acc", "r_acc", "acc")
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
    """SHA-256 of the record's canonical JSON without its ``content_sha256`` and ``signature`` fields."""
    body = {k: v for k, v in record.items() if k not in ("content_sha256", "signature")}
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
            record["verification"] = json.loads(_canonical(dict(verification)))
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


# ------------------------------------------------------------------------------------------------ signing
def default_key_dir() -> Path:
    """Where this user's record-signing key lives: ``$NVFLARE_UNLEARN_KEY_DIR``, else ``~/.nvflare_unlearn/keys``
    (outside every run folder, so rewriting a run folder cannot re-sign its record)."""
    return Path(os.environ.get(KEY_DIR_ENV) or Path.home() / ".nvflare_unlearn" / "keys").expanduser()


def load_signing_key(path: str | os.PathLike):
    """A private key (PEM, unencrypted: Ed25519 or RSA, e.g. a provisioned ``server.key``) to sign records with."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"signing key {str(p)!r} does not exist")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{str(p)!r} is not an unencrypted PEM private key: {str(exc)[:120]}") from None
    if not isinstance(key, (ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"{str(p)!r} holds a {type(key).__name__}; records are signed with Ed25519 or RSA keys")
    return key


def load_or_create_signing_key(path: str | os.PathLike | None = None):
    """(key, path): this user's Ed25519 record-signing key, created (mode 0600, folder 0700) on first use, with its
    public key beside it (``record_signing_ed25519.pub.pem``) for auditors."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    p = Path(path) if path is not None else default_key_dir() / KEY_FILE
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            _io.write_bytes(p, pem, exclusive=True, mode=0o600)
        except FileExistsError:  # another process created it first: use theirs
            pass
    key = load_signing_key(p)
    pub = p.with_name(PUBLIC_KEY_FILE) if p.name == KEY_FILE else p.with_suffix(".pub.pem")
    if not pub.exists():
        _io.write_bytes(pub, public_key_pem(key))
    return key, p


def public_key_pem(key) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of a private or public key."""
    from cryptography.hazmat.primitives import serialization

    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: str | os.PathLike):
    """An auditor's public key: a PEM public key, or an X.509 certificate (e.g. the provisioned ``server.crt``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"public key {str(p)!r} does not exist")
    data = p.read_bytes()
    try:
        if b"BEGIN CERTIFICATE" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{str(p)!r} is neither a PEM public key nor a certificate: {str(exc)[:120]}") from None


def key_id(key) -> str:
    """SHA-256 (hex) of the public key's DER encoding: names the key a record was signed with."""
    from cryptography.hazmat.primitives import serialization

    public = key.public_key() if hasattr(key, "public_key") else key
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _signed_bytes(record: Mapping[str, Any]) -> bytes:
    return _canonical({k: v for k, v in record.items() if k != "signature"})


def sign_record(record: Mapping[str, Any], private_key, key_source: str = "") -> dict[str, Any]:
    """The record with a ``signature`` over its canonical JSON (everything but the signature itself)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

    if not isinstance(record, Mapping) or record.get("schema") != SCHEMA:
        raise ValueError(f"not an unlearning record (schema {SCHEMA!r} expected)")
    body = dict(record)
    body.pop("signature", None)
    data = _signed_bytes(body)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        algorithm, value = "ed25519", private_key.sign(data)
    elif isinstance(private_key, rsa.RSAPrivateKey):
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
        algorithm, value = "rsa-pss-sha256", private_key.sign(data, pss, hashes.SHA256())
    else:
        raise ValueError(f"cannot sign with a {type(private_key).__name__}; use an Ed25519 or RSA private key")
    body["signature"] = {
        "algorithm": algorithm,
        "key_id": key_id(private_key),
        "key_source": str(key_source)[:200],
        "value": base64.b64encode(value).decode("ascii"),
    }
    return body


def signature_problem(record: Mapping[str, Any], public_key) -> str | None:
    """Why the record's signature does not prove it came unchanged from the holder of ``public_key`` (None: it does)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

    sig = record.get("signature")
    if not isinstance(sig, Mapping):
        return "the record is not signed"
    if sig.get("key_id") != key_id(public_key):
        return (
            f"signed by key {str(sig.get('key_id'))[:16]}..., not by the key given ({key_id(public_key)[:16]}...): "
            "a record re-signed by someone else, or the wrong public key"
        )
    try:
        value = base64.b64decode(str(sig.get("value", "")), validate=True)
    except ValueError:
        return "the signature is not base64"
    data = _signed_bytes(record)
    try:
        if sig.get("algorithm") == "ed25519" and isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(value, data)
        elif sig.get("algorithm") == "rsa-pss-sha256" and isinstance(public_key, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
            public_key.verify(value, data, pss, hashes.SHA256())
        else:
            return f"algorithm {str(sig.get('algorithm'))[:20]!r} does not match the {type(public_key).__name__}"
    except InvalidSignature:
        return "the signature does not match the record: it was changed after it was signed"
    return None


# ------------------------------------------------------------------------------------------------ verification
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
    from nvflare_unlearn.method.checkpoint import load_checkpoint
    from nvflare_unlearn.models.registry import import_path_module, is_import_path

    record_path = Path(record_path)
    record = read_record(record_path)
    model = Path(model_path)
    checks: list[str] = []
    bad: list[str] = []
    skipped: list[str] = []

    def check(name: str, passed: bool, why: str) -> None:
        checks.append(name)
        if not passed:
            bad.append(f"{name}: {why}")

    if public_key is None:
        check("signature", False, "no public key given: pass the server's public key you hold (--public-key)")
    else:
        try:
            key = load_public_key(public_key) if isinstance(public_key, (str, os.PathLike)) else public_key
            problem = signature_problem(record, key)
        except (ValueError, FileNotFoundError) as exc:
            problem = str(exc)
        check("signature", problem is None, problem or "")

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

    request = record.get("request") or {}
    try:
        net, embedded, _ = load_checkpoint(model, allow_import=allow_import)
    except Exception as exc:  # any failure to load is a verification failure, reported, not raised
        check("embedded plan", False, f"cannot load the checkpoint's plan: {type(exc).__name__}: {str(exc)[:300]}")
        net = embedded = None
    if net is not None:
        plan_obj, problem = embedded, None
        parameters = request.get("parameters") or {}
        if embedded is None:
            plan_obj, problem = _plan_beside(record_path, record["plan"]["sha256"])
            if record["plan"].get("num_pruned", 1) == 0:
                checks.append("embedded plan SHA-256")  # nothing pruned, nothing embedded: consistent
            elif ((parameters.get("plan") or {}).get("prune_mode")) == "reinit" and plan_obj is not None:
                skipped.append("embedded plan SHA-256: a reinit model is dense; its plan is pruning_plan.json")
            else:
                check("embedded plan SHA-256", False, "the checkpoint carries no pruning plan")
        else:
            got = plan_sha256(embedded)
            check(
                "embedded plan SHA-256",
                got == record["plan"]["sha256"],
                f"the checkpoint's plan hashes to {got}, the record's plan to {record['plan']['sha256']}",
            )
        if plan_obj is not None:
            channels = _pruned_channels(plan_obj)
            check(
                "pruned channels",
                channels == record["plan"]["pruned_channels"],
                "the record's pruned channels per layer differ from the checkpoint's plan",
            )
        before = int(record["plan"].get("steps_before", 0) or 0)
        new_steps = plan_obj.steps[before:] if plan_obj is not None else []
        planned = sorted(int(st["forget_class"]) for st in new_steps if st.get("forget_class") is not None)
        method = (parameters.get("unlearning") or {}).get("method", "prune")
        expected = sorted(request.get("forget_classes") or []) if method == "prune" else []
        if plan_obj is None and method == "prune" and record["plan"].get("num_pruned", 0) > 0:
            skipped.append(f"forget classes = plan steps: {problem or 'no plan to read the steps from'}")
        else:
            check(
                "forget classes = plan steps",
                planned == expected and len(planned) == len(new_steps),
                f"the request ({method}) names classes {request.get('forget_classes')}, the plan's new steps "
                f"forgot {planned}",
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
            check("prune ratio = units pruned", not problems, "; ".join(problems[:3]))
        recorded = record["models"]["final"].get("params")
        if recorded is None:
            skipped.append("parameters after: the record has no parameter count")
        else:
            count = sum(p.numel() for p in net.parameters())
            check(
                "parameters after", count == recorded, f"the model file has {count} parameters, the record {recorded}"
            )

    if original_model_path is not None:
        orig = sha256_file(original_model_path)
        check(
            "original model unchanged",
            orig == record["models"]["original"]["sha256"],
            f"{str(original_model_path)!r} has SHA-256 {orig}, recorded {record['models']['original']['sha256']}",
        )
        recorded = record["models"]["original"].get("params")
        name = request.get("model_name")
        if recorded is None or not isinstance(name, str):
            skipped.append("parameters before: the record has no parameter count or model name")
        elif is_import_path(name) and not any(
            import_path_module(name) == m or import_path_module(name).startswith(m + ".") for m in allow_import
        ):
            check("parameters before", False, f"the record's model {name[:80]!r} is an import path: allow its module")
        else:
            try:
                orig_net, _, _ = load_checkpoint(
                    original_model_path, model_name=name, num_classes=request.get("num_classes")
                )
                count = sum(p.numel() for p in orig_net.parameters())
                check("parameters before", count == recorded, f"the original has {count}, the record {recorded}")
            except Exception as exc:
                check("parameters before", False, f"cannot load the original: {type(exc).__name__}: {str(exc)[:200]}")
    else:
        skipped.append("original model unchanged: no --original given")

    mpath = Path(metrics_path) if metrics_path is not None else _find_metrics(record_path)
    if mpath is None:
        skipped.append("metrics: no metrics file beside the record (pass --metrics)")
    else:
        try:
            job = json.loads(mpath.read_text(encoding="utf-8"))
            diffs = [
                f"{stage}.{k}: record {record['metrics'][which].get(k)}, metrics file {job[stage].get(k)}"
                for which, stage in (("before", "original"), ("after", "unlearned"))
                for k in _METRIC_KEYS
                if k in record["metrics"][which]
                and not math.isclose(float(record["metrics"][which][k]), float(job[stage].get(k)), abs_tol=1e-12)
            ]
            check("metrics = job's metrics file", not diffs, "; ".join(diffs[:3]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            check("metrics = job's metrics file", False, f"{str(mpath)!r} is unreadable: {type(exc).__name__}")
    return VerificationResult(ok=not bad, mismatches=bad, checks=checks, skipped=skipped)
