"""The `apply_patch` tool: V4A patches (`*** Begin Patch` … `*** End Patch`) on a workspace.

GPT-OSS was trained on this format (gpt-oss's `apply_patch.md`): Add File with `+` lines,
Delete File, Update File with an optional Move to and `@@` hunks of context (` `), removed
(`-`) and added (`+`) lines. The whole patch is checked against the files before anything
is written, then every file is replaced by rename, so a refused patch changes nothing.
Errors are `PatchError`s whose message tells the model exactly what did not match.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from llm.files import atomic_write_bytes

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


class Workspace:
    """A folder the tool may change; every path is checked to stay inside it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, rel: str) -> Path:
        if Path(rel).is_absolute():
            raise PatchError(f"{rel}: paths must be relative to the workspace")
        full = (self.root / rel).resolve()
        if full != self.root and self.root not in full.parents:
            raise PatchError(f"{rel}: outside the workspace")
        return full


def apply_patch(root: Path, text: str) -> str:
    """Apply a V4A patch to the folder `root`; return a summary, or raise PatchError."""
    ws = Workspace(root)
    writes: dict[Path, bytes] = {}
    deletes: list[Path] = []
    summary = []
    for op in parse_patch(text):
        target = ws.path(op.path)
        if op.kind == "add":
            if target.exists() or target in writes:
                raise PatchError(f"Add File {op.path}: the file already exists")
            writes[target] = ("\n".join(op.lines) + "\n").encode()
            summary.append(f"A {op.path}")
            continue
        if not target.is_file():
            raise PatchError(f"{op.kind.title()} File {op.path}: no such file")
        if op.kind == "delete":
            deletes.append(target)
            summary.append(f"D {op.path}")
            continue
        try:
            old = writes.get(target, target.read_bytes()).decode()
        except UnicodeDecodeError:
            raise PatchError(f"Update File {op.path}: not a UTF-8 text file") from None
        new = _apply_hunks(op.path, old, op.hunks).encode()
        if op.move_to:
            dest = ws.path(op.move_to)
            if dest.exists():
                raise PatchError(f"Move to {op.move_to}: the file already exists")
            writes[dest] = new
            deletes.append(target)
            summary.append(f"M {op.path} -> {op.move_to}")
        else:
            writes[target] = new
            summary.append(f"M {op.path}")
    _commit(writes, deletes)
    return "Done!\n" + "\n".join(summary)


def _commit(writes: dict[Path, bytes], deletes: list[Path]) -> None:
    """Write every file, then delete; on a failure put back what was already changed."""
    backups: dict[Path, bytes | None] = {}
    try:
        for path, data in writes.items():
            backups[path] = path.read_bytes() if path.exists() else None
            atomic_write_bytes(path, data)
        for path in deletes:
            if path not in writes:
                backups[path] = path.read_bytes()
                path.unlink()
    except OSError as e:
        for path, data in backups.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, data)
        why = os.strerror(e.errno or 0)
        raise PatchError(f"{e.filename or ''}: {why}; nothing was changed") from e
