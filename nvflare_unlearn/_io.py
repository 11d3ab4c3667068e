"""Atomic, retry-safe file writes: the one way the package writes a file.

Every write goes to a temporary file in the target's own folder, is flushed and fsynced, then moved under its final
name with ``os.replace`` (or linked, when the write must not replace an existing file). A crash, a full disk or an
exception while writing leaves the final name untouched (absent, or the previous complete file) and no temporary
file behind, so a half-written checkpoint or record can never be read as a real one, nor block the retry.

A leaf: imports nothing from the package (any part may import it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["write_bytes", "write_text", "write_json", "torch_save", "copy_file", "write_with"]


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: some filesystems cannot open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exists(path: Path) -> FileExistsError:
    return FileExistsError(f"{str(path)!r} already exists and is never overwritten; write to a new path")


def write_with(
    path: str | os.PathLike, writer: Callable[[BinaryIO], Any], *, exclusive: bool = False, mode: int = 0o644
) -> Path:
    """Write ``path`` atomically: ``writer(fh)`` fills a temporary file beside it, which then takes the final name.

    ``exclusive=True`` never replaces an existing file (``FileExistsError``, the existing file untouched): the final
    name is created with ``os.link``, which fails if it exists, so two writers cannot both win. ``mode``: the file's
    permission bits (0o600 for secrets).
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"directory {str(folder)!r} does not exist; create it before writing {path.name!r}")
    if exclusive and path.exists():
        raise _exists(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # atomic no-clobber
            except FileExistsError:
                raise _exists(path) from None
            except OSError:  # a filesystem without hard links: check, then replace (a narrow race remains)
                if path.exists():
                    raise _exists(path) from None
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(folder)
    return path


def write_bytes(path: str | os.PathLike, data: bytes, *, exclusive: bool = False, mode: int = 0o644) -> Path:
    """``data`` under ``path``, atomically."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"write_bytes needs bytes, got {type(data).__name__}")
    return write_with(path, lambda fh: fh.write(bytes(data)), exclusive=exclusive, mode=mode)


def write_text(path: str | os.PathLike, text: str, *, exclusive: bool = False) -> Path:
    """``text`` (UTF-8) under ``path``, atomically."""
    if not isinstance(text, str):
        raise ValueError(f"write_text needs a str, got {type(text).__name__}")
    return write_bytes(path, text.encode("utf-8"), exclusive=exclusive)


def write_json(
    path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False, exclusive: bool = False
) -> Path:
    """``obj`` as JSON (no NaN or infinity: not JSON) under ``path``, atomically; serialised before anything is
    written, so an object that cannot be serialised leaves no file."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
    return write_text(path, text, exclusive=exclusive)


def torch_save(path: str | os.PathLike, obj: Any, *, exclusive: bool = False) -> Path:
    """``torch.save(obj)`` under ``path``, atomically."""
    import torch

    return write_with(path, lambda fh: torch.save(obj, fh), exclusive=exclusive)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, *, exclusive: bool = False) -> Path:
    """A byte copy of ``src`` at ``dst`` (modification time kept), atomically."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"cannot copy {str(src)!r}: no such file")

    def _copy(fh: BinaryIO) -> None:
        with src.open("rb") as s:
            shutil.copyfileobj(s, fh, 1 << 20)

    out = write_with(dst, _copy, exclusive=exclusive)
    shutil.copystat(src, out)
    return out
