"""Workspace trees removed and handed over however deep the model's code made them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlx_harmony.llm.tools.tree import TreeChanged, chown_tree, remove_tree, walk

DEPTH = 1500  # deeper than Python's recursion limit, and than PATH_MAX allows to name


def _deep(root: Path) -> None:
    """A tree DEPTH folders deep with a file and a link at every level, built by
    descriptor as the code would (its full path is longer than PATH_MAX)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(DEPTH):
        with open(os.open("f.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as fh:
            fh.write(str(i))
        os.symlink("/etc", "out", dir_fd=fd)
        os.mkdir("dddddddd", dir_fd=fd)
        nxt = os.open("dddddddd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)


def test_a_tree_deeper_than_path_max_is_removed(tmp_path: Path) -> None:
    _deep(tmp_path / "ws")
    remove_tree(tmp_path / "ws")
    assert not (tmp_path / "ws").exists()
    assert Path("/etc").is_dir()  # the links were removed, never followed
    remove_tree(tmp_path / "ws")  # gone already: no error


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files away needs root")
def test_a_deep_tree_is_given_away_without_following_links(tmp_path: Path) -> None:
    _deep(tmp_path / "ws")
    etc = os.stat("/etc")
    chown_tree(tmp_path / "ws", 65534, 65534)
    fd = os.open(tmp_path / "ws", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(DEPTH):
        for name in ("f.txt", "out", "dddddddd"):
            assert os.stat(name, dir_fd=fd, follow_symlinks=False).st_uid == 65534
        nxt = os.open("dddddddd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    assert os.stat("/etc").st_uid == etc.st_uid
    remove_tree(tmp_path / "ws")


def test_the_servers_request_workspace_is_removed_however_deep(tmp_path: Path) -> None:
    from mlx_harmony.llm.server import ServerTools
    from mlx_harmony.llm.tools.config import ToolsConfig

    tools = ServerTools(ToolsConfig(apply_patch=True))
    box = tools.open()
    assert box is not None
    workspace = box.workspace
    _deep(workspace / "deep")
    tools.close()
    assert not workspace.exists()


def test_a_folder_moved_during_the_walk_stops_it_before_it_climbs_out(tmp_path: Path) -> None:
    """The code moves the folder being walked one level up: ".." then leads to the root,
    and a second step up would have left the tree. The walk notices at the first step."""
    root = tmp_path / "ws"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    seen: list[str] = []

    def entry(fd: int, name: str, is_folder: bool) -> None:
        seen.append(name)
        if name == "c":  # scanning a/b: move it up to the root
            os.rename(root / "a" / "b", root / "b")

    with pytest.raises(TreeChanged):
        walk(root, entry)
    assert "outside" not in seen


def test_a_link_as_the_root_is_followed_but_nothing_below(tmp_path: Path) -> None:
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "sub" / "out").symlink_to(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    seen: list[str] = []
    walk(tmp_path / "link", lambda fd, name, is_folder: seen.append(name))
    assert sorted(seen) == ["out", "sub"]
    remove_tree(tmp_path / "link")
    assert not (tmp_path / "link").exists() and (tmp_path / "real" / "sub").is_dir()
