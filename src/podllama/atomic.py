"""Writing files so that a crash (or a full disk, or `kill -9`) never leaves half of one under its real name.

The order is always: write a temporary file beside the target, fsync it, rename it over the target, fsync the
directory (so the rename itself survives a power cut). A reader sees the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename (or a new file) in DIRECTORY durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Replace PATH with DATA, all or nothing. MODE: the file's permissions (default: those of the file it
    replaces, else 0644). The temporary file is created with MODE already, so a secret is never readable."""
    path = Path(path)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask; a replaced temp file keeps its own
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def commit_file(staged: Path, final: Path) -> None:
    """Move a complete file from staging to its real name, durably (the file's bytes first, then the rename)."""
    fd = os.open(staged, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(staged, final)
    fsync_dir(final.parent)
