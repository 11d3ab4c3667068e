"""Atomic, retry-safe writes (nvflare_unlearn._io) and the writers built on them: a write that fails half-way leaves
neither a truncated file under the final name nor a temporary file, and the retry succeeds."""

from __future__ import annotations

import json
import os

import pytest
import torch

from nvflare_unlearn import _io
from nvflare_unlearn.method.checkpoint import load_checkpoint, save_checkpoint
from nvflare_unlearn.models import build_model


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_text_json_bytes_round_trip_and_replace(tmp_path):
    p = tmp_path / "a.txt"
    _io.write_text(p, "one")
    _io.write_text(p, "two")  # replaces
    assert p.read_text() == "two"
    _io.write_json(tmp_path / "b.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    _io.write_bytes(tmp_path / "c.bin", b"\0\1")
    assert (tmp_path / "c.bin").read_bytes() == b"\0\1"
    assert oct((tmp_path / "c.bin").stat().st_mode & 0o777) == oct(0o644)
    _io.write_bytes(tmp_path / "secret", b"k", mode=0o600)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert _leftovers(tmp_path) == []


def test_exclusive_never_replaces(tmp_path):
    p = tmp_path / "record.json"
    _io.write_text(p, "first", exclusive=True)
    with pytest.raises(FileExistsError, match="never overwritten"):
        _io.write_text(p, "second", exclusive=True)
    assert p.read_text() == "first" and _leftovers(tmp_path) == []


def test_a_failing_writer_leaves_nothing_behind(tmp_path):
    p = tmp_path / "model.pt"

    def half_then_crash(fh):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _io.write_with(p, half_then_crash, exclusive=True)
    assert not p.exists() and _leftovers(tmp_path) == []
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is written
        _io.write_json(tmp_path / "m.json", {"x": float("nan")})
    assert not (tmp_path / "m.json").exists() and _leftovers(tmp_path) == []


def test_missing_folder_and_bad_payloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _io.write_text(tmp_path / "nowhere" / "x.txt", "x")
    with pytest.raises(ValueError):
        _io.write_text(tmp_path / "x.txt", b"bytes")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        _io.copy_file(tmp_path / "missing", tmp_path / "dst")


def test_copy_file_is_atomic_and_keeps_bytes(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3_000_000))
    dst = _io.copy_file(src, tmp_path / "dst.bin")
    assert dst.read_bytes() == src.read_bytes() and _leftovers(tmp_path) == []


def test_a_crash_while_saving_a_checkpoint_does_not_block_the_retry(tmp_path, monkeypatch):
    """Before: a truncated pruned_model.pt stayed under its name and the retry failed with FileExistsError."""
    model = build_model("small_cnn", 10)
    path = tmp_path / "pruned_model.pt"
    real_save = torch.save

    def crash(obj, fh, *a, **k):
        fh.write(b"truncated")
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(path, model, None, "small_cnn", 10)
    assert not path.exists() and _leftovers(tmp_path) == []
    monkeypatch.setattr(torch, "save", real_save)
    save_checkpoint(path, model, None, "small_cnn", 10)  # the retry
    load_checkpoint(path)
    with pytest.raises(FileExistsError):  # still never overwrites a real one
        save_checkpoint(path, model, None, "small_cnn", 10)
    save_checkpoint(path, model, None, "small_cnn", 10, overwrite=True)  # the persistor's round-by-round model


def test_a_crash_while_writing_the_record_does_not_block_the_retry(tmp_path, monkeypatch):
    from nvflare_unlearn.protect import record as audit

    record = {"schema": audit.SCHEMA, "x": 1}
    path = tmp_path / "unlearning_record.json"

    def crash(*a, **k):
        raise OSError("no space left")

    monkeypatch.setattr(audit._io, "write_json", crash)
    with pytest.raises(OSError):
        audit.write_record(path, record)
    monkeypatch.undo()
    assert not path.exists()
    audit.write_record(path, record)
    assert json.loads(path.read_text()) == record


def test_the_package_writes_files_only_through_io():
    """No module of the package opens a file for writing, torch.saves to a path or copies with shutil itself."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "nvflare_unlearn"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "_io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                mode = next((ast.unparse(a) for a in node.args[1:2]), "") + " ".join(
                    ast.unparse(k.value) for k in node.keywords if k.arg == "mode"
                )
                writes = name in ("open", "Path.open", "p.open") and any(c in mode for c in "wxa")
                if name.startswith("_io."):
                    continue
                if (
                    writes
                    or name in ("shutil.copy", "shutil.copy2", "shutil.copyfile")
                    or name.endswith((".write_text", ".write_bytes"))
                ):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}: {name}({mode})")
    # the ledger's lock file (opened for append, never written); the POC processes' console log (a stream handed to
    # each child process as its stdout, not a file the package writes)
    allowed = {"protect/privacy.py", "fl/poc.py"}
    assert [o for o in offenders if o.split(":")[0] not in allowed] == []
