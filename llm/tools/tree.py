"""Workspace trees walked by descriptor, however deep the model made them.

The python tool's code can build a folder tree thousands of levels deep: `shutil.rmtree`
and `os.walk` recurse (RecursionError near 1,000 levels) and a path that deep is longer
than the kernel's PATH_MAX. Here one descriptor is open at a time, each step goes one
level down by name or up by "..", and links are never followed. Code that moves a folder
while it is walked could make ".." lead elsewhere, even above the root: every step up is
checked to reach the very folder the walk came down from, else `TreeChanged`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeChanged(OSError):
    """A folder was moved while the tree was walked."""


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def walk(
    root: Path,
    entry: Callable[[int, str, bool], None],
    leave: Callable[[int, str], None] | None = None,
) -> None:
    """Call `entry(folder_fd, name, is_folder)` for everything below `root`, a folder
    before what it holds, and `leave(parent_fd, name)` once a folder's contents are done.
    `root` itself may be a link to a folder; nothing below it is followed."""
    fd = os.open(root, DIR_FLAGS & ~os.O_NOFOLLOW)
    pending = [_scan(fd, entry)]  # per level: the sub-folders still to visit
    names: list[str] = []  # the path from `root` to the folder `fd` is open on
    ids = [_identity(fd)]  # per level: the folder's (device, inode)
    try:
        while True:
            if pending[-1]:
                name = pending[-1].pop()
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                os.close(fd)
                fd = child
                names.append(name)
                ids.append(_identity(fd))
                pending.append(_scan(fd, entry))
                continue
            pending.pop()
            if not names:
                return
            parent = os.open("..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            ids.pop()
            if _identity(fd) != ids[-1]:
                raise TreeChanged(f"{root}: a folder was moved while it was walked")
            name = names.pop()
            if leave is not None:
                leave(fd, name)
    finally:
        os.close(fd)


def _scan(fd: int, entry: Callable[[int, str, bool], None]) -> list[str]:
    folders = []
    with os.scandir(fd) as entries:
        listing = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_folder in listing:
        entry(fd, name, is_folder)
        if is_folder:
            folders.append(name)
    return folders


def remove_tree(root: Path) -> None:
    """Delete `root` and everything below it; a missing `root` is no error, and a link
    is removed itself, not what it leads to."""
    if os.path.islink(root):
        os.unlink(root)
        return

    def unlink(fd: int, name: str, is_folder: bool) -> None:
        if not is_folder:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)

    def rmdir(fd: int, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(name, dir_fd=fd)

    try:
        walk(root, unlink, rmdir)
    except FileNotFoundError:
        return
    os.rmdir(root)


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give `root` and everything below it to `uid`:`gid` (links themselves, not targets)."""
    os.chown(root, uid, gid, follow_symlinks=False)

    def chown(fd: int, name: str, _: bool) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)

    walk(root, chown)
