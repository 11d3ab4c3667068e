"""The unlearning audit record: build, sign, write, read back, verify, detect tampering and forgery
(nvflare_unlearn.protect: record, signing, verify)."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json

import numpy as np
import pytest
import torch

from nvflare_unlearn.method.checkpoint import save_checkpoint
from nvflare_unlearn.method.prune import apply_pruning_plan
from nvflare_unlearn.method.selection import build_pruning_plan
from nvflare_unlearn.models import build_model
from nvflare_unlearn.protect.record import (
    SCHEMA,
    build_record,
    plan_sha256,
    read_record,
    record_digest,
    sha256_file,
    write_record,
)
from nvflare_unlearn.protect.signing import load_or_create_signing_key, public_key_pem, sign_record
from nvflare_unlearn.protect.verify import verify_record

K = 10
START = dt.datetime(2025, 1, 31, 12, 0, tzinfo=dt.timezone.utc)


def _plan(model, seed: int, ratio: float = 0.1):
    rng = np.random.default_rng(seed)
    scores = {n: rng.random(m.out_channels) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    return build_pruning_plan(model, scores, ratio, forget_class=3)


@pytest.fixture
def run(tmp_path):
    """An original checkpoint, a pruned final checkpoint (weights + plan) and its plan, as a job would leave them."""
    torch.manual_seed(0)
    original = build_model("small_cnn", K)
    orig_path = save_checkpoint(tmp_path / "original.pt", original, None, "small_cnn", K)
    plan = _plan(original, seed=1)
    pruned = apply_pruning_plan(copy.deepcopy(original), plan)
    final_path = save_checkpoint(tmp_path / "final.pt", pruned, plan, "small_cnn", K)
    key, _ = load_or_create_signing_key(tmp_path / "keys" / "record_signing_ed25519.pem")
    pub = tmp_path / "server_public_key.pem"
    pub.write_bytes(public_key_pem(key))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "tmp": tmp_path,
        "original": orig_path,
        "final": final_path,
        "plan": plan,
        "model": original,
        "key": key,
        "pub": pub,
        "params": (count(original), count(pruned)),
    }


def _record(run, sign: bool = True, **over):
    kwargs = dict(
        forget_classes=[3],
        num_classes=K,
        parameters={"plan": {"prune_ratio": 0.1}, "rounds": 2, "aggregation": "median", "min_count": 5},
        original_model_path=run["original"],
        final_model_path=run["final"],
        plan=run["plan"],
        site_counts={"site-1": [5] * K, "site-2": [0, 7, 7, 7, 7, 7, 7, 7, 7, 7]},
        metrics_before={"u_acc": 0.97, "r_acc": 0.96},
        metrics_after={"u_acc": 0.0, "r_acc": 0.95, "mia": 0.12},
        started_at=START,
        finished_at=START + dt.timedelta(minutes=3),
        rejected_sites={"site-3": "layer 'features.0': sums contain NaN or infinite values"},
        model_name="small_cnn",
        params_before=run["params"][0],
        params_after=run["params"][1],
    )
    kwargs.update(over)
    record = build_record(**kwargs)
    return sign_record(record, run["key"], "test key") if sign else record


def _verify(run, path, model=None, **kw):
    return verify_record(path, model or run["final"], public_key=run["pub"], **kw)


def test_sha256_file_matches_hashlib_and_requires_a_file(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc" * 1000)
    assert sha256_file(p) == hashlib.sha256(b"abc" * 1000).hexdigest()
    with pytest.raises(FileNotFoundError, match="no such file"):
        sha256_file(tmp_path / "missing.bin")


def test_plan_hash_ignores_formatting_but_not_content(run):
    plan = run["plan"]
    assert plan_sha256(plan) == plan_sha256(plan.to_json(indent=2)) == plan_sha256(json.loads(plan.to_json()))
    other = _plan(run["model"], seed=2)
    assert plan_sha256(other) != plan_sha256(plan)
    with pytest.raises(ValueError, match="not valid JSON"):
        plan_sha256("{not json")
    with pytest.raises(ValueError, match="PruningPlan"):
        plan_sha256(42)


def test_record_contents(run):
    rec = _record(run)
    assert rec["schema"] == SCHEMA
    assert rec["request"] == {
        "forget_classes": [3],
        "num_classes": K,
        "parameters": rec["request"]["parameters"],
        "model_name": "small_cnn",
    }
    assert rec["models"]["original"]["params"] == run["params"][0] > rec["models"]["final"]["params"]
    assert rec["plan"]["steps_before"] == 0
    assert rec["signature"]["algorithm"] == "ed25519" and rec["signature"]["key_source"] == "test key"
    assert rec["request"]["parameters"]["aggregation"] == "median"
    assert rec["models"]["original"]["sha256"] == sha256_file(run["original"])
    assert rec["models"]["final"]["sha256"] == sha256_file(run["final"])
    assert rec["models"]["original"]["sha256"] != rec["models"]["final"]["sha256"]
    assert rec["plan"]["sha256"] == plan_sha256(run["plan"])
    assert rec["plan"]["pruned_channels"] == run["plan"].pruned_channels()
    assert rec["plan"]["num_pruned"] == sum(len(v) for v in run["plan"].pruned_channels().values()) > 0
    assert rec["sites"]["participating"]["site-2"][0] == 0
    assert "NaN" in rec["sites"]["rejected"]["site-3"]
    assert rec["metrics"]["after"] == {"u_acc": 0.0, "r_acc": 0.95, "mia": 0.12}
    assert rec["timestamps"]["started_at"] == "2025-01-31T12:00:00+00:00"
    assert rec["timestamps"]["finished_at"] == "2025-01-31T12:03:00+00:00"
    for key in ("nvflare", "torch", "torch_pruning", "python", "nvflare_unlearn"):
        assert key in rec["versions"]
    assert rec["versions"]["torch"] == torch.__version__.split("+")[0]
    assert rec["content_sha256"] == record_digest(rec)


def test_epoch_seconds_become_utc_iso(run):
    rec = _record(run, started_at=START.timestamp(), finished_at=START.timestamp() + 180.0)
    assert rec["timestamps"]["started_at"] == "2025-01-31T12:00:00+00:00"
    assert rec["timestamps"]["finished_at"] == "2025-01-31T12:03:00+00:00"


def test_write_read_verify_round_trip(run):
    rec = _record(run)
    path = write_record(run["tmp"] / "unlearning_record.json", rec)
    assert read_record(path) == json.loads(json.dumps(rec))
    result = _verify(run, path, original_model_path=run["original"])
    assert result.ok, str(result)
    assert result.mismatches == []
    assert set(result.checks) == {
        "signature",
        "record content digest",
        "final model SHA-256",
        "embedded plan SHA-256",
        "pruned channels",
        "forget classes = plan steps",
        "prune ratio = units pruned",
        "parameters after",
        "original model unchanged",
        "parameters before",
    }
    assert str(result).startswith("OK")
    assert "skip metrics" in str(result)  # no metrics file beside this record


def test_write_refuses_to_overwrite_and_bad_targets(run):
    rec = _record(run)
    path = write_record(run["tmp"] / "r.json", rec)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_record(path, rec)
    assert path.read_bytes() == before
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_record(run["tmp"] / "nowhere" / "r.json", rec)
    with pytest.raises(ValueError, match="not an unlearning record"):
        write_record(run["tmp"] / "s.json", {"schema": "other"})


def _rewrite(path, mutate, fix_digest: bool):
    rec = json.loads(path.read_text())
    mutate(rec)
    if fix_digest:  # a tamperer who also recomputes the digest: the model/plan checks must still catch it
        rec["content_sha256"] = record_digest(rec)
    path.write_text(json.dumps(rec))


def test_tampered_model_file_is_detected(run):
    path = write_record(run["tmp"] / "r.json", _record(run))
    data = bytearray(run["final"].read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the file
    tampered = run["tmp"] / "tampered.pt"
    tampered.write_bytes(bytes(data))
    result = _verify(run, path, tampered)
    assert not result.ok
    assert any(m.startswith("final model SHA-256") for m in result.mismatches)


def test_original_model_given_instead_of_final_is_named(run):
    path = write_record(run["tmp"] / "r.json", _record(run))
    result = _verify(run, path, run["original"])
    assert not result.ok
    assert any("ORIGINAL model" in m for m in result.mismatches)
    assert any("carries no pruning plan" in m for m in result.mismatches)


def test_other_pruned_model_fails_hash_and_plan_checks(run):
    path = write_record(run["tmp"] / "r.json", _record(run))
    other_plan = _plan(run["model"], seed=5)
    other = apply_pruning_plan(copy.deepcopy(run["model"]), other_plan)
    other_path = save_checkpoint(run["tmp"] / "other.pt", other, other_plan, "small_cnn", K)
    result = _verify(run, path, other_path)
    failed = {m.split(":")[0] for m in result.mismatches}
    # (the other plan happens to leave a different parameter count too)
    assert failed == {"final model SHA-256", "embedded plan SHA-256", "pruned channels"} | (
        {"parameters after"} if sum(p.numel() for p in other.parameters()) != run["params"][1] else set()
    )


SIG = "signature"


@pytest.mark.parametrize(
    "mutate, fix_digest, failing",
    [
        (lambda r: r["metrics"]["after"].update(u_acc=0.5), False, {SIG, "record content digest"}),
        (lambda r: r["sites"]["participating"].pop("site-2"), False, {SIG, "record content digest"}),
        (lambda r: r["metrics"]["after"].update(u_acc=0.5), True, {SIG}),  # digest recomputed: only the signature
        (lambda r: r["plan"].update(sha256="0" * 64), True, {SIG, "embedded plan SHA-256"}),
        (lambda r: r["plan"]["pruned_channels"].update({"features.0": []}), True, {SIG, "pruned channels"}),
        (lambda r: r["models"]["final"].update(sha256="f" * 64), True, {SIG, "final model SHA-256"}),
        (lambda r: r["request"].update(forget_classes=[5]), True, {SIG, "forget classes = plan steps"}),
        (
            lambda r: r["request"]["parameters"]["plan"].update(prune_ratio=0.3),
            True,
            {SIG, "prune ratio = units pruned"},
        ),
        (lambda r: r["models"]["final"].update(params=1), True, {SIG, "parameters after"}),
    ],
)
def test_tampered_record_is_detected(run, mutate, fix_digest, failing):
    path = write_record(run["tmp"] / "r.json", _record(run))
    _rewrite(path, mutate, fix_digest)
    result = _verify(run, path)
    assert not result.ok
    assert {m.split(":")[0] for m in result.mismatches} == failing
    assert "FAIL" in str(result)


def test_a_forged_record_re_signed_with_another_key_fails(run):
    """The forger rewrites the forget class, recomputes the digest and signs with a key of their own."""
    path = write_record(run["tmp"] / "r.json", _record(run))
    rec = json.loads(path.read_text())
    rec["request"]["forget_classes"] = [5]
    rec["content_sha256"] = record_digest(rec)
    forger, _ = load_or_create_signing_key(run["tmp"] / "forger" / "k.pem")
    path.write_text(json.dumps(sign_record(rec, forger, "forger")))
    result = _verify(run, path)
    assert {m.split(":")[0] for m in result.mismatches} == {SIG, "forget classes = plan steps"}
    assert "not by the key given" in str(result)
    # the forger's own public key makes the signature pass, the consistency check still fails
    forged_pub = run["tmp"] / "forger.pem"
    forged_pub.write_bytes(public_key_pem(forger))
    result = verify_record(path, run["final"], public_key=forged_pub)
    assert {m.split(":")[0] for m in result.mismatches} == {"forget classes = plan steps"}


def test_signature_needs_a_public_key_and_a_signed_record(run):
    path = write_record(run["tmp"] / "r.json", _record(run))
    result = verify_record(path, run["final"])
    assert [m.split(":")[0] for m in result.mismatches] == [SIG] and "no public key given" in str(result)
    unsigned = write_record(run["tmp"] / "u.json", _record(run, sign=False))
    assert "the record is not signed" in str(_verify(run, unsigned))


def test_rsa_server_identity_and_its_certificate_verify(run):
    """POC/production: the provisioned server key is RSA; an auditor may hold the server certificate instead."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    crt = run["tmp"] / "server.crt"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    record = sign_record(_record(run, sign=False), key, "provisioned server identity")
    assert record["signature"]["algorithm"] == "rsa-pss-sha256"
    path = write_record(run["tmp"] / "r.json", record)
    assert verify_record(path, run["final"], public_key=crt).ok
    assert not _verify(run, path).ok  # the Ed25519 test key did not sign it


def test_metrics_file_beside_the_record_is_compared(run):
    path = write_record(run["tmp"] / "r.json", _record(run))
    metrics = {"original": {"u_acc": 0.97, "r_acc": 0.96}, "unlearned": {"u_acc": 0.0, "r_acc": 0.95}}
    (run["tmp"] / "unlearning_metrics.json").write_text(json.dumps(metrics))
    assert _verify(run, path).ok
    metrics["unlearned"]["u_acc"] = 0.4
    (run["tmp"] / "unlearning_metrics.json").write_text(json.dumps(metrics))
    result = _verify(run, path)
    assert [m.split(":")[0] for m in result.mismatches] == ["metrics = job's metrics file"]
    assert "unlearned.u_acc" in str(result)


def test_modified_original_is_detected(run):
    path = write_record(run["tmp"] / "r.json", _record(run))
    with open(run["original"], "ab") as fh:
        fh.write(b"\0")
    result = _verify(run, path, original_model_path=run["original"])
    assert [m.split(":")[0] for m in result.mismatches] == ["original model unchanged"]


def test_unloadable_checkpoint_is_a_mismatch_not_a_crash(run):
    path = write_record(run["tmp"] / "r.json", _record(run))
    junk = run["tmp"] / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    result = _verify(run, path, junk)
    assert any(m.startswith("embedded plan: cannot load") for m in result.mismatches)


def test_read_record_rejects_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_record(bad)
    bad.write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(ValueError, match="not an unlearning record"):
        read_record(bad)
    bad.write_text(json.dumps({"schema": SCHEMA, "models": {}}))
    with pytest.raises(ValueError, match="lacks a required field"):
        read_record(bad)
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "none.json")


@pytest.mark.parametrize(
    "over, msg",
    [
        ({"forget_classes": [10]}, "proper subset"),
        ({"forget_classes": list(range(K))}, "proper subset"),
        ({"forget_classes": []}, "proper subset"),
        ({"forget_classes": None}, "list of class ids"),
        ({"num_classes": 1}, "num_classes"),
        ({"metrics_after": {"u_acc": 0.1}}, "r_acc"),
        ({"metrics_after": {"u_acc": 1.5, "r_acc": 0.9}}, "fraction"),
        ({"metrics_before": {"u_acc": float("nan"), "r_acc": 0.9}}, "finite"),
        ({"metrics_before": None}, "metrics_before"),
        ({"parameters": {"eps": float("nan")}}, "plain JSON"),
        ({"parameters": {"model": object()}}, "plain JSON"),
        ({"site_counts": [1, 2]}, "site_counts"),  # (empty is allowed: a method without statistics)
        ({"site_counts": {"a": [1, 2]}}, "2 counts for 10 classes"),
        ({"site_counts": {"a": [-1] * K}}, "non-negative"),
        ({"site_counts": {"a": [0.5] * K}}, "non-negative integers"),
        ({"started_at": dt.datetime(2025, 1, 1)}, "timezone-aware"),
        ({"started_at": "yesterday"}, "ISO 8601"),
        ({"started_at": float("nan")}, "time.time"),
        ({"started_at": [2025]}, "time.time"),
        ({"plan": "{broken"}, "not valid JSON"),
        ({"forget_classes": [3, 5]}, "one per forget class"),
        ({"params_after": 0}, "params_after"),
        ({"steps_before": -1}, "steps_before"),
    ],
)
def test_build_record_rejects_bad_inputs(run, over, msg):
    with pytest.raises(ValueError, match=msg):
        _record(run, **over)


def test_build_record_refuses_same_file_and_missing_files(run):
    with pytest.raises(ValueError, match="same file"):
        _record(run, final_model_path=run["original"])
    with pytest.raises(FileNotFoundError):
        _record(run, final_model_path=run["tmp"] / "missing.pt")


def test_methods_without_pruning_and_dense_reinit_models_verify(run):
    """A finetune-style method adds no plan step and saves an unpruned model; a reinit model is dense and its plan
    sits beside the record as pruning_plan.json (issue 13's methods)."""
    from nvflare_unlearn.method.plan import PruningPlan

    tmp, model, plan = run["tmp"], run["model"], run["plan"]
    empty = PruningPlan(convs=dict(plan.convs), groups=[list(g) for g in plan.groups], model_name="small_cnn")
    dense = save_checkpoint(tmp / "dense.pt", copy.deepcopy(model), None, "small_cnn", K)
    n = run["params"][0]
    finetuned = _record(
        run,
        final_model_path=dense,
        plan=empty,
        parameters={"unlearning": {"method": "finetune"}, "plan": {"prune_ratio": 0.1}},
        params_after=n,
    )
    assert _verify(run, write_record(tmp / "ft.json", finetuned), dense).ok
    # a method that prunes must have pruned: the same record claiming method "prune" fails
    claimed = _record(run, final_model_path=dense, plan=empty, params_after=n)
    result = _verify(run, write_record(tmp / "claimed.json", claimed), dense)
    assert [m.split(":")[0] for m in result.mismatches] == ["forget classes = plan steps"]

    folder = tmp / "reinit"
    folder.mkdir()
    reinit = _record(
        run,
        final_model_path=dense,
        parameters={"plan": {"prune_ratio": 0.1, "prune_mode": "reinit"}},
        params_after=n,
    )
    path = write_record(folder / "unlearning_record.json", reinit)
    assert not _verify(run, path, dense).ok  # no pruning_plan.json beside it: the steps cannot be read
    (folder / "pruning_plan.json").write_text(plan.to_json())
    result = _verify(run, path, dense)
    assert result.ok, str(result)
    assert any("reinit model is dense" in m for m in result.skipped)
    other = _plan(model, seed=5)
    (folder / "pruning_plan.json").write_text(other.to_json())  # not the recorded plan: not used
    assert not _verify(run, path, dense).ok
