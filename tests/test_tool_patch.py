"""apply_patch: V4A patches applied to a workspace all at once, or refused precisely."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_harmony.llm.tools.apply_patch import PatchError, apply_patch, patch_text


def _ws(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "app.py").write_text(
        "def greet():\n    print('Hi')\n\n\ndef main():\n    greet()\n"
    )
    (tmp_path / "old.txt").write_text("bye\n")
    return tmp_path


def test_add_update_move_delete_in_one_patch(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    patch = """*** Begin Patch
*** Add File: docs/hello.txt
+Hello world
+second line
*** Update File: src/app.py
*** Move to: src/main.py
@@ def greet():
-    print('Hi')
+    print('Hello, world!')
*** Delete File: old.txt
*** End Patch"""
    summary = apply_patch(ws, patch)
    assert summary.startswith("Done!")
    assert (ws / "docs" / "hello.txt").read_text() == "Hello world\nsecond line\n"
    assert not (ws / "src" / "app.py").exists()
    assert (ws / "src" / "main.py").read_text() == (
        "def greet():\n    print('Hello, world!')\n\n\ndef main():\n    greet()\n"
    )
    assert not (ws / "old.txt").exists()


def test_context_lines_locate_the_change(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    patch = """*** Begin Patch
*** Update File: src/app.py
@@
 def main():
-    greet()
+    greet()
+    greet()
*** End Patch"""
    apply_patch(ws, patch)
    assert (ws / "src" / "app.py").read_text().endswith("def main():\n    greet()\n    greet()\n")


def test_trailing_whitespace_differences_still_match(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    patch = (
        "*** Begin Patch\n*** Update File: src/app.py\n@@\n"
        "-    print('Hi')   \n+    pass\n*** End Patch"
    )
    apply_patch(ws, patch)
    assert "    pass\n" in (ws / "src" / "app.py").read_text()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ("*** Update File: src/app.py\n*** End Patch", "must start with '*** Begin Patch'"),
        (
            "*** Begin Patch\n*** Add File: ../escape.txt\n+x\n*** End Patch",
            "outside the workspace",
        ),
        (
            "*** Begin Patch\n*** Add File: /etc/evil\n+x\n*** End Patch",
            "relative to the workspace",
        ),
        (
            "*** Begin Patch\n*** Update File: src/app.py\n@@\n-    print('Bye')\n+    pass\n"
            "*** End Patch",
            "hunk 1: context/removed lines not found (starting with \"    print('Bye')\")",
        ),
        ("*** Begin Patch\n*** Update File: nope.py\n@@\n-x\n+y\n*** End Patch", "no such file"),
        ("*** Begin Patch\n*** Add File: old.txt\n+x\n*** End Patch", "already exists"),
        ("*** Begin Patch\n*** Add File: a.txt\nno plus\n*** End Patch", "must start with '+'"),
        ("*** Begin Patch\n*** Frobnicate: a.txt\n*** End Patch", "expected '*** Add File:'"),
    ],
)
def test_refused_patches_change_nothing(tmp_path: Path, patch: str, message: str) -> None:
    ws = _ws(tmp_path)
    before = {p: p.read_bytes() for p in ws.rglob("*") if p.is_file()}
    with pytest.raises(PatchError, match=None) as err:
        apply_patch(ws, patch)
    assert message in str(err.value)
    assert {p: p.read_bytes() for p in ws.rglob("*") if p.is_file()} == before


def test_a_failing_later_hunk_leaves_earlier_files_untouched(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    patch = """*** Begin Patch
*** Add File: new.txt
+new
*** Update File: src/app.py
@@
-    nothing like this
+    x
*** End Patch"""
    with pytest.raises(PatchError, match=r"src/app\.py: hunk 1"):
        apply_patch(ws, patch)
    assert not (ws / "new.txt").exists()


def test_ambiguous_context_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x = 1\ny = 2\nx = 1\n")
    patch = "*** Begin Patch\n*** Update File: a.txt\n@@\n-x = 1\n+x = 3\n*** End Patch"
    with pytest.raises(PatchError, match="more than once"):
        apply_patch(tmp_path, patch)


def test_symlink_out_of_the_workspace_is_refused(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    outside = tmp_path / "outside.txt"
    ws.mkdir()
    outside.write_text("secret\n")
    (ws / "link.txt").symlink_to(outside)
    patch = "*** Begin Patch\n*** Update File: link.txt\n@@\n-secret\n+owned\n*** End Patch"
    with pytest.raises(PatchError, match="outside the workspace"):
        apply_patch(ws, patch)
    assert outside.read_text() == "secret\n"


@pytest.mark.parametrize(
    "arguments",
    [
        "*** Begin Patch\n*** End Patch",
        '"*** Begin Patch\\n*** End Patch"',
        '{"patch": "*** Begin Patch\\n*** End Patch"}',
        '{"input": "*** Begin Patch\\n*** End Patch"}',
    ],
)
def test_call_arguments_in_any_form_the_model_writes(arguments: str) -> None:
    assert patch_text(arguments) == "*** Begin Patch\n*** End Patch"


def test_an_updated_file_keeps_its_mode_and_new_files_are_0644(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    script = ws / "run.sh"
    script.write_text("echo hi\n")
    script.chmod(0o755)
    patch = (
        "*** Begin Patch\n*** Update File: run.sh\n@@\n-echo hi\n+echo hello\n"
        "*** Add File: new.txt\n+x\n*** End Patch"
    )
    apply_patch(ws, patch)
    assert script.read_text() == "echo hello\n"
    assert script.stat().st_mode & 0o777 == 0o755
    assert (ws / "new.txt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("a\0b.txt", "must not contain a NUL character"),
        ("x/" * 2100 + "f.txt", "path longer than 4096 bytes"),
        ("n" * 300 + ".txt", "a name longer than 255 bytes"),
        ("old.txt/inner.txt", "a part of the path is a file, not a folder"),
        ("src", "a folder, not a file"),
    ],
)
def test_odd_paths_are_refused_as_text(tmp_path: Path, path: str, message: str) -> None:
    ws = _ws(tmp_path)
    for kind in ("Add File", "Update File", "Delete File"):
        body = "\n+x" if kind == "Add File" else ("\n@@\n-x\n+y" if kind == "Update File" else "")
        patch = f"*** Begin Patch\n*** {kind}: {path}{body}\n*** End Patch"
        with pytest.raises(PatchError) as err:
            apply_patch(ws, patch)
        assert message in str(err.value), (kind, str(err.value))


def test_a_file_deleted_and_then_updated_in_one_patch_is_refused(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    patch = (
        "*** Begin Patch\n*** Delete File: old.txt\n*** Update File: old.txt\n@@\n-bye\n+hi\n"
        "*** End Patch"
    )
    with pytest.raises(PatchError, match="an earlier operation of this patch deleted or moved"):
        apply_patch(ws, patch)
    assert (ws / "old.txt").read_text() == "bye\n"


def test_a_file_added_and_deleted_in_one_patch_leaves_nothing(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    patch = "*** Begin Patch\n*** Add File: tmp.txt\n+x\n*** Delete File: tmp.txt\n*** End Patch"
    apply_patch(ws, patch)
    assert not (ws / "tmp.txt").exists()


def test_a_symlinked_folder_inside_the_path_is_refused(tmp_path: Path) -> None:
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (ws / "docs").symlink_to(outside)
    patch = "*** Begin Patch\n*** Add File: docs/new.txt\n+x\n*** End Patch"
    with pytest.raises(PatchError, match="a symbolic link is in the way"):
        apply_patch(ws, patch)
    assert list(outside.iterdir()) == []


# Swaps two names atomically (renameat2 RENAME_EXCHANGE) as fast as it can, until killed.
FLIPPER = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = (p.encode() for p in sys.argv[1:3])
print("ready", flush=True)
for _ in range(50_000_000):
    libc.renameat2(-100, a, -100, b, 2)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
@pytest.mark.heavy
def test_a_symlink_swapped_in_while_patching_never_leads_a_write_outside(tmp_path: Path) -> None:
    """Another process flips `ws/sub` between a real folder and a link to a folder outside
    while patches are applied: every write lands inside, or the patch is refused."""
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (ws / "sub").mkdir()
    (ws / "link").symlink_to(outside)
    flipper = subprocess.Popen(
        [sys.executable, "-c", FLIPPER, str(ws / "sub"), str(ws / "link")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert flipper.stdout is not None and flipper.stdout.readline() == "ready\n"
        refused = i = 0
        # Until the flips have really raced the patches (bounded: a loaded machine may
        # give the flipper little time).
        while (i < 2000 or refused < 20) and i < 100_000:
            patch = f"*** Begin Patch\n*** Add File: sub/f{i}.txt\n+x\n*** End Patch"
            try:
                apply_patch(ws, patch)
            except PatchError:
                refused += 1
            i += 1
    finally:
        flipper.kill()
        flipper.wait()
    assert 0 < refused < i
    assert list(outside.iterdir()) == []


def test_a_failure_while_writing_puts_back_what_was_changed_or_says_what_was_not(
    tmp_path: Path, monkeypatch
) -> None:
    from mlx_harmony.llm.tools import apply_patch as module

    ws = _ws(tmp_path)
    real_write = module.Workspace.write
    calls: list[str] = []

    def failing(self, rel, data, mode):  # the disk fills up on the second file
        calls.append(rel)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(self, rel, data, mode)

    monkeypatch.setattr(module.Workspace, "write", failing)
    patch = (
        "*** Begin Patch\n*** Update File: old.txt\n@@\n-bye\n+hi\n"
        "*** Add File: new.txt\n+x\n*** End Patch"
    )
    with pytest.raises(PatchError, match="No space left on device; nothing was changed"):
        apply_patch(ws, patch)
    assert (ws / "old.txt").read_text() == "bye\n" and not (ws / "new.txt").exists()

    calls.clear()

    def broken(self, rel, data, mode):  # and then cannot even put the first one back
        calls.append(rel)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device")
        return real_write(self, rel, data, mode)

    monkeypatch.setattr(module.Workspace, "write", broken)
    with pytest.raises(
        PatchError,
        match=r"putting back the files already changed failed for "
        r"old\.txt \(No space left on device\)",
    ):
        apply_patch(ws, patch)


def test_a_rewritten_file_loses_setuid_and_setgid_bits(tmp_path: Path) -> None:
    """A setuid file in the workspace runs as the assistant's user: a patch never keeps
    (or makes) one, only the permission bits travel."""
    ws = _ws(tmp_path)
    tool = ws / "tool"
    tool.write_text("old\n")
    tool.chmod(0o6755)
    apply_patch(ws, "*** Begin Patch\n*** Update File: tool\n@@\n-old\n+new\n*** End Patch")
    assert tool.read_text() == "new\n"
    assert tool.stat().st_mode & 0o7777 == 0o755
    apply_patch(ws, "*** Begin Patch\n*** Update File: tool\n*** Move to: moved\n@@\n-new\n"
                    "+newer\n*** End Patch")  # fmt: skip
    assert (ws / "moved").stat().st_mode & 0o7777 == 0o755


def test_files_too_large_to_patch_are_refused_without_reading_them(tmp_path: Path) -> None:
    """A sparse file of 300 MB takes no disk, but reading it would take the memory."""
    ws = _ws(tmp_path)
    with open(ws / "big.txt", "wb") as fh:
        fh.truncate(300 << 20)
    for patch in (
        "*** Begin Patch\n*** Update File: big.txt\n@@\n-x\n+y\n*** End Patch",
        "*** Begin Patch\n*** Delete File: big.txt\n*** End Patch",
    ):
        with pytest.raises(PatchError, match=r"big.txt: 300 MB, larger than the 16 MB"):
            apply_patch(ws, patch)
    many = "".join(
        f"*** Add File: f{i}.txt\n" + ("+" + "x" * 1023 + "\n") * 4096 for i in range(17)
    )
    with pytest.raises(PatchError, match="more than the 64 MB one patch may"):
        apply_patch(ws, f"*** Begin Patch\n{many}*** End Patch")
    assert not (ws / "f0.txt").exists()


@pytest.mark.parametrize("where", ["path", "content"])
def test_text_that_is_not_unicode_is_a_patch_error(tmp_path: Path, where: str) -> None:
    ws = _ws(tmp_path)
    name, line, n = ("\udcff.txt", "x", 2) if where == "path" else ("ok.txt", "\ud800", 3)
    with pytest.raises(PatchError, match=f"line {n}: not valid Unicode text"):
        apply_patch(ws, f"*** Begin Patch\n*** Add File: {name}\n+{line}\n*** End Patch")
    assert sorted(p.name for p in ws.iterdir()) == ["old.txt", "src"]


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership is given away only by root")
def test_as_root_written_files_belong_to_the_workspaces_owner(tmp_path: Path) -> None:
    """Run as root, the python tool's code runs as the workspace's (unprivileged) owner:
    what apply_patch writes must be that owner's, or the code could not change it."""
    ws = tmp_path / "ws"
    ws.mkdir()
    os.chown(ws, 65534, 65534)
    apply_patch(ws, "*** Begin Patch\n*** Add File: sub/new.txt\n+x\n*** End Patch")
    for path in (ws / "sub", ws / "sub" / "new.txt"):
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534), path
