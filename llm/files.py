"""Crash-safe file writes: a reader sees the old file or the new one, never a mix."""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

# A temporary file whose writer may still be alive is left alone for this long.
STALE_TEMP_SECONDS = 3600


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, rename it over `path`.

    rename() within one folder is atomic on POSIX, and the fsync of the folder makes the
    rename itself survive a power cut. Temporary files left by writers that were killed
    mid-write are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _remove_stale_temps(path: Path) -> None:
    """Remove `.<name>.<pid>.<random>.tmp` files of writers that no longer run (and,
    whatever their name, those older than STALE_TEMP_SECONDS)."""
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        try:
            stale = now - tmp.lstat().st_mtime > STALE_TEMP_SECONDS or (
                pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid))
            )
            if stale:
                tmp.unlink()
        except OSError:
            continue  # gone meanwhile, or not ours to remove


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True
