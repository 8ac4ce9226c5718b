"""apply_patch: V4A patches applied to a workspace all at once, or refused precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.tools.apply_patch import PatchError, apply_patch, patch_text


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
