"""Durable file writes: a power cut leaves the old file or the new one, never half of either."""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename/creation inside ``path`` durable (no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a new file and fsync it (the caller renames/fsyncs the directory)."""
    with open(path, "xb") as fh:
        if mode is not None:
            os.fchmod(fh.fileno(), mode)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: Path, data: bytes | str, mode: int | None = None, tmp_prefix: str = ".tmp-") -> None:
    """Replace ``path`` atomically: temp file in the same directory, fsync, rename, fsync the directory.

    ``tmp_prefix`` names the temporary file so that a cleanup after a crash can recognise leftovers.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f"{tmp_prefix}{path.name}-{secrets.token_hex(4)}")
    try:
        write_durable(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
