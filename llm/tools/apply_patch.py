"""The `apply_patch` tool: V4A patches (`*** Begin Patch` … `*** End Patch`) on a workspace.

GPT-OSS was trained on this format (gpt-oss's `apply_patch.md`): Add File with `+` lines,
Delete File, Update File with an optional Move to and `@@` hunks of context (` `), removed
(`-`) and added (`+`) lines. The whole patch is checked against the files before anything
is written, then every file is replaced by rename, so a refused patch changes nothing.
Errors are `PatchError`s whose message tells the model exactly what did not match.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

BEGIN, END = "*** Begin Patch", "*** End Patch"
ADD, DELETE, UPDATE = "*** Add File: ", "*** Delete File: ", "*** Update File: "
MOVE = "*** Move to: "
END_OF_FILE = "*** End of File"

# What the developer message tells the model (abridged from gpt-oss's apply_patch.md).
DESCRIPTION = """Edit files in the workspace with a patch. The argument is the patch text:
*** Begin Patch
*** Add File: <path>        (every following line starts with +)
*** Delete File: <path>
*** Update File: <path>     (optionally followed by *** Move to: <new path>)
@@ [a line that precedes the change, to locate it]
 context line
-removed line
+added line
*** End Patch
Paths are relative to the workspace. Give about three lines of context around each change."""

PARAMETERS = {
    "type": "string",
    "description": "The patch, from *** Begin Patch to *** End Patch",
}


class PatchError(ValueError):
    """A patch that cannot be applied; the message is what the model reads."""


@dataclass
class _Hunk:
    anchor: str  # text after @@ (a line that precedes the change), may be empty
    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    at_end: bool = False


@dataclass
class _FileOp:
    kind: str  # "add", "delete" or "update"
    path: str
    move_to: str | None = None
    lines: list[str] = field(default_factory=list)  # an added file's contents
    hunks: list[_Hunk] = field(default_factory=list)


def patch_text(arguments: str) -> str:
    """The patch from a call's arguments: raw text, a JSON string or {"patch"|"input": …}."""
    text = arguments.strip()
    if text.startswith(("{", '"')):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, dict):
            value = value.get("patch", value.get("input", ""))
        if isinstance(value, str):
            return value.strip()
    return text


def parse_patch(text: str) -> list[_FileOp]:
    lines = text.replace("\r\n", "\n").strip("\n").split("\n")
    for n, line in enumerate(lines, 1):
        try:
            line.encode()
        except UnicodeEncodeError:  # a lone surrogate: no file name or content can hold it
            raise PatchError(f"line {n}: not valid Unicode text (a lone surrogate)") from None
    if not lines or lines[0].strip() != BEGIN:
        raise PatchError(f"the patch must start with '{BEGIN}'")
    if lines[-1].strip() != END:
        raise PatchError(f"the patch must end with '{END}'")
    ops: list[_FileOp] = []
    i = 1
    while i < len(lines) - 1:
        line = lines[i]
        if line.startswith(ADD):
            op = _FileOp("add", line[len(ADD) :].strip())
            i += 1
            while i < len(lines) - 1 and not lines[i].startswith("*** "):
                if not lines[i].startswith("+"):
                    raise PatchError(
                        f"line {i + 1}: in Add File {op.path}, every line must start with '+'"
                    )
                op.lines.append(lines[i][1:])
                i += 1
        elif line.startswith(DELETE):
            op = _FileOp("delete", line[len(DELETE) :].strip())
            i += 1
        elif line.startswith(UPDATE):
            op = _FileOp("update", line[len(UPDATE) :].strip())
            i += 1
            if i < len(lines) - 1 and lines[i].startswith(MOVE):
                op.move_to = lines[i][len(MOVE) :].strip()
                i += 1
            i = _parse_hunks(lines, i, op)
        else:
            raise PatchError(
                f"line {i + 1}: expected '*** Add File:', '*** Delete File:' or "
                f"'*** Update File:', got {line[:60]!r}"
            )
        if not op.path:
            raise PatchError(f"line {i}: a file operation without a path")
        ops.append(op)
    if not ops:
        raise PatchError("the patch has no file operations")
    return ops


def _parse_hunks(lines: list[str], i: int, op: _FileOp) -> int:
    hunk: _Hunk | None = None
    while i < len(lines) - 1 and not lines[i].startswith(("*** Add", "*** Delete", "*** Update")):
        line = lines[i]
        if line.startswith("@@"):
            hunk = _Hunk(line[2:].strip())
            op.hunks.append(hunk)
        elif line.strip() == END_OF_FILE:
            if hunk is None:
                raise PatchError(f"line {i + 1}: '{END_OF_FILE}' outside a hunk")
            hunk.at_end = True
        else:
            if hunk is None:  # the first hunk may omit its @@ line
                hunk = _Hunk("")
                op.hunks.append(hunk)
            tag, body = (line[:1], line[1:]) if line else (" ", "")
            if tag == " ":
                hunk.old.append(body)
                hunk.new.append(body)
            elif tag == "-":
                hunk.old.append(body)
            elif tag == "+":
                hunk.new.append(body)
            else:
                raise PatchError(
                    f"line {i + 1}: a hunk line must start with ' ', '-' or '+', got {line[:60]!r}"
                )
        i += 1
    if not op.hunks:
        raise PatchError(f"Update File {op.path}: no hunks")
    return i


def _find(lines: list[str], seq: list[str], start: int, at_end: bool) -> int:
    """Index where `seq` occurs in `lines` at or after `start`, or -1. Exact first, then
    ignoring trailing and then all surrounding whitespace (models often lose indentation
    of blank lines), as gpt-oss's own applier does."""
    if not seq:
        return len(lines) if at_end else start
    for norm in (lambda s: s, str.rstrip, str.strip):
        want = [norm(s) for s in seq]
        candidates = [len(lines) - len(seq)] if at_end else range(start, len(lines) - len(seq) + 1)
        for k in candidates:
            if k >= start and [norm(s) for s in lines[k : k + len(seq)]] == want:
                return k
    return -1


def _apply_hunks(path: str, text: str, hunks: list[_Hunk]) -> str:
    lines = text.split("\n")
    trailing_newline = text.endswith("\n")
    if trailing_newline:
        lines.pop()
    pos = 0
    for n, hunk in enumerate(hunks, 1):
        if hunk.anchor:
            k = _find(lines, [hunk.anchor], pos, False)
            if k < 0:
                raise PatchError(
                    f"{path}: hunk {n}: the line '@@ {hunk.anchor}' is not in the file"
                )
            pos = k + (0 if hunk.old and _find(lines, hunk.old, k, False) == k else 1)
        k = _find(lines, hunk.old, pos, hunk.at_end)
        if k < 0:
            first = next((s for s in hunk.old if s.strip()), hunk.old[0] if hunk.old else "")
            raise PatchError(
                f"{path}: hunk {n}: context/removed lines not found "
                f"(starting with {first!r}); re-read the file and patch what is there"
            )
        if _find(lines, hunk.old, k + 1, False) >= 0 and not hunk.anchor and hunk.old:
            raise PatchError(
                f"{path}: hunk {n}: its lines occur more than once; "
                "add an '@@' line or more context"
            )
        lines[k : k + len(hunk.old)] = hunk.new
        pos = k + len(hunk.new)
    return "\n".join(lines) + ("\n" if trailing_newline or not lines else "")


# Limits on a path the model writes: the kernel's own (PATH_MAX is 4096, NAME_MAX 255),
# checked first so that an over-long path is a message, not an exception.
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
NEW_FILE_MODE = 0o644
# A patch edits text files: one read whole into memory is capped, and so is what a patch
# holds in all (three 300 MB sparse files once took the assistant's memory to 2.4 GB).
MAX_FILE_BYTES = 16 << 20
MAX_PATCH_BYTES = 64 << 20
# Only permission bits travel from an old file to its replacement: never setuid, setgid
# or sticky (a setuid file in the workspace runs as the assistant's user).
PERMISSION_BITS = 0o777


class Workspace:
    """The folder the tool may change, reached only through a descriptor of its root.

    Every path component is opened with O_NOFOLLOW relative to its parent's descriptor
    (openat style), and files are created and renamed relative to their folder's
    descriptor: a symlink swapped in while a patch is applied cannot redirect a read or a
    write outside, whatever the timing. Symlinks inside the workspace are refused too.
    """

    def __init__(self, root: Path) -> None:
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # Run as root, the tool gives what it writes to the workspace's owner, so that the
        # python tool's code (run as that unprivileged user then) can change it too.
        st = os.fstat(self.fd)
        self.owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 and st.st_uid != 0 else None

    def close(self) -> None:
        os.close(self.fd)

    @staticmethod
    def parts(rel: str) -> list[str]:
        """The path's components, or a PatchError saying why the path is refused."""
        if "\0" in rel:
            raise PatchError(f"{rel!r}: a path must not contain a NUL character")
        if len(rel.encode()) > MAX_PATH_BYTES:
            raise PatchError(f"{rel[:60]}…: path longer than {MAX_PATH_BYTES} bytes")
        if Path(rel).is_absolute():
            raise PatchError(f"{rel}: paths must be relative to the workspace")
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise PatchError(f"{rel}: '..' leads outside the workspace")
        if not parts:
            raise PatchError(f"{rel!r}: not a file path")
        for part in parts:
            if len(part.encode()) > MAX_NAME_BYTES:
                raise PatchError(f"{rel}: a name longer than {MAX_NAME_BYTES} bytes")
        return parts

    def _parent(self, parts: list[str], create: bool) -> int:
        """A new descriptor of the folder holding the last component."""
        fd = os.dup(self.fd)
        try:
            for part in parts[:-1]:
                try:
                    nxt = _open_dir(part, fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = _open_dir(part, fd)
                    if self.owner is not None:
                        os.fchown(nxt, *self.owner)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(self, rel: str) -> tuple[bytes, int] | None:
        """The file's bytes and mode, or None if there is no such file."""
        parts = self.parts(rel)
        try:
            parent = self._parent(parts, create=False)
        except FileNotFoundError:
            return None
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=parent)
        except FileNotFoundError:
            return None
        finally:
            os.close(parent)
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PatchError(f"{rel}: not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise PatchError(
                    f"{rel}: {st.st_size >> 20} MB, larger than the {MAX_FILE_BYTES >> 20} MB "
                    "limit on a file read whole"
                )
            data = fh.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:  # grew while it was read
                raise PatchError(f"{rel}: larger than the {MAX_FILE_BYTES >> 20} MB limit")
            return data, stat.S_IMODE(st.st_mode) & PERMISSION_BITS

    def write(self, rel: str, data: bytes, mode: int) -> None:
        """Replace the file by rename, in its folder, keeping `mode`; fsynced."""
        parts = self.parts(rel)
        parent = self._parent(parts, create=True)
        tmp = f".{parts[-1][:200]}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent
            )
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    if self.owner is not None:
                        os.fchown(fh.fileno(), *self.owner)
                    os.fchmod(fh.fileno(), mode & PERMISSION_BITS)
                    os.fsync(fh.fileno())
                os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=parent)
                raise
            os.fsync(parent)
        finally:
            os.close(parent)

    def remove(self, rel: str) -> None:
        parts = self.parts(rel)
        parent = self._parent(parts, create=False)
        try:
            os.unlink(parts[-1], dir_fd=parent)
        finally:
            os.close(parent)


def _open_dir(name: str, dir_fd: int) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except NotADirectoryError:
        # O_DIRECTORY|O_NOFOLLOW reports a symlink as "not a directory": say which it is.
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


def _os_error(rel: str, e: OSError) -> PatchError:
    """An OS error on `rel`, as a sentence the model can act on."""
    why = {
        errno.ELOOP: "a symbolic link is in the way (links are not followed: they may lead "
        "outside the workspace); patch the real file",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "a folder, not a file",
        errno.ENAMETOOLONG: "the path is too long",
    }.get(e.errno or 0, os.strerror(e.errno or 0))
    return PatchError(f"{rel}: {why}")


def apply_patch(root: Path, text: str) -> str:
    """Apply a V4A patch to the folder `root`; return a summary, or raise PatchError."""
    ops = parse_patch(text)
    try:
        ws = Workspace(root)
    except OSError as e:
        raise PatchError(f"the workspace {root}: {os.strerror(e.errno or 0)}") from None
    try:
        return _apply(ws, ops)
    finally:
        ws.close()


def _apply(ws: Workspace, ops: list[_FileOp]) -> str:
    writes: dict[str, tuple[bytes, int]] = {}  # path → (contents, mode)
    deletes: list[str] = []
    summary = []
    for op in ops:
        _check_size(writes)
        key = "/".join(ws.parts(op.path))
        if key in deletes:
            raise PatchError(
                f"{op.kind.title()} File {op.path}: an earlier operation of this patch "
                "deleted or moved it; change each file once per patch"
            )
        try:
            current = writes.get(key) or ws.read(key)
        except OSError as e:
            raise _os_error(op.path, e) from None
        if op.kind == "add":
            if current is not None:
                raise PatchError(f"Add File {op.path}: the file already exists")
            writes[key] = (("\n".join(op.lines) + "\n").encode(), NEW_FILE_MODE)
            summary.append(f"A {op.path}")
            continue
        if current is None:
            raise PatchError(f"{op.kind.title()} File {op.path}: no such file")
        if op.kind == "delete":
            deletes.append(key)
            writes.pop(key, None)
            summary.append(f"D {op.path}")
            continue
        data, mode = current
        try:
            old = data.decode()
        except UnicodeDecodeError:
            raise PatchError(f"Update File {op.path}: not a UTF-8 text file") from None
        new = _apply_hunks(op.path, old, op.hunks).encode()
        if op.move_to:
            dest = "/".join(ws.parts(op.move_to))
            try:
                taken = dest in writes or ws.read(dest) is not None
            except OSError as e:
                raise _os_error(op.move_to, e) from None
            if taken:
                raise PatchError(f"Move to {op.move_to}: the file already exists")
            writes[dest] = (new, mode)
            writes.pop(key, None)
            deletes.append(key)
            summary.append(f"M {op.path} -> {op.move_to}")
        else:
            writes[key] = (new, mode)
            summary.append(f"M {op.path}")
    _check_size(writes)
    _commit(ws, writes, deletes)
    return "Done!\n" + "\n".join(summary)


def _check_size(writes: dict[str, tuple[bytes, int]]) -> None:
    if sum(len(data) for data, _ in writes.values()) > MAX_PATCH_BYTES:
        raise PatchError(
            f"the patch would write more than the {MAX_PATCH_BYTES >> 20} MB one patch may; "
            "split it"
        )


def _commit(ws: Workspace, writes: dict[str, tuple[bytes, int]], deletes: list[str]) -> None:
    """Write every file, then delete; on a failure put back what was already changed."""
    backups: dict[str, tuple[bytes, int] | None] = {}
    current = ""
    try:
        for current, (data, mode) in writes.items():
            backups[current] = ws.read(current)
            ws.write(current, data, mode)
        for current in deletes:
            backups[current] = old = ws.read(current)
            if old is not None:  # else added by this same patch: nothing on disk yet
                ws.remove(current)
    except OSError as e:
        failed = []
        for path, old in backups.items():
            try:
                if old is None:
                    with contextlib.suppress(FileNotFoundError):
                        ws.remove(path)
                else:
                    ws.write(path, *old)
            except OSError as undo:
                failed.append(f"{path} ({os.strerror(undo.errno or 0)})")
        if failed:
            raise PatchError(
                f"{_os_error(current, e)}; putting back the files already changed failed "
                f"for {', '.join(failed)}: re-read them before patching again"
            ) from e
        raise PatchError(f"{_os_error(current, e)}; nothing was changed") from e
