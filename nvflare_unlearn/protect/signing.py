"""Who wrote an unlearning record: the server SIGNS it (:func:`sign_record`), an auditor checks the signature with
a key they hold (:func:`signature_problem`).

Ed25519 with a key kept outside the run folder (a configured key file, or in the simulator and the CLI a key of this
user, created on first use in :func:`default_key_dir`), or the provisioned server identity (``startup/server.key``,
RSA-PSS) in POC and production (:func:`find_signing_key` picks one). Whoever can rewrite the run folder can recompute
the record's digest, but not the signature. The auditor's public key comes from the server's operator, or from the
server certificate checked against the federation's root CA: the copy written next to the outputs is a convenience,
not a trust anchor.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

from nvflare_unlearn import _io
from nvflare_unlearn.protect.record import SCHEMA, canonical_json

#: Environment variable naming the folder of this user's record-signing key (simulator and CLI runs).
KEY_DIR_ENV = "NVFLARE_UNLEARN_KEY_DIR"
KEY_FILE = "record_signing_ed25519.pem"
PUBLIC_KEY_FILE = "record_signing_ed25519.pub.pem"


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
    return canonical_json({k: v for k, v in record.items() if k != "signature"})


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


def find_signing_key(configured: str | None = None, provisioned: str | os.PathLike | None = None) -> tuple[Any, str]:
    """(private key, where it came from) for the server's record: the ``configured`` key file
    (``security.signing_key``), else the ``provisioned`` server identity (``startup/server.key`` of a POC or
    production server) when that file exists, else this user's key outside the run folder (simulator and CLI;
    :func:`default_key_dir`, created on first use). The source is stated in the signature."""
    if configured:
        return load_signing_key(configured), f"configured key {configured}"
    if provisioned is not None and os.path.isfile(provisioned):
        return load_signing_key(provisioned), "provisioned server identity (startup/server.key)"
    key, path = load_or_create_signing_key()
    return key, f"user key {path}"
