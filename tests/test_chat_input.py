"""The chat's input: one message from several lines, and which lines are commands."""

from __future__ import annotations

from collections import deque

import pytest

from mlx_harmony.llm.cli.chat import as_command
from mlx_harmony.llm.cli.multiline import read_message


class Keyboard:
    """Lines as the terminal would give them; `pasted` marks lines that arrive together
    with the one before (a paste), so `waiting()` is true before them."""

    def __init__(self, *lines: str, pasted: frozenset[int] = frozenset()) -> None:
        self.lines = deque(lines)
        self.pasted = pasted
        self.read = 0
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        self.read += 1
        return self.lines.popleft()

    def waiting(self) -> bool:
        return bool(self.lines) and self.read in self.pasted


def message(keyboard: Keyboard) -> str:
    return read_message(keyboard, keyboard.waiting)


def test_a_pasted_block_of_lines_is_one_message() -> None:
    keys = Keyboard("first line", "second line", "third line", "next question", pasted={1, 2})
    assert message(keys) == "first line\nsecond line\nthird line"
    assert message(keys) == "next question"


def test_a_trailing_backslash_continues_the_message() -> None:
    keys = Keyboard("one \\", "two \\", "three", "C:\\\\")
    assert message(keys) == "one \ntwo \nthree"
    assert keys.prompts == ["You: ", "... ", "... "]
    assert message(keys) == "C:\\\\"  # an escaped backslash ends the line


def test_a_triple_quoted_block_is_one_message() -> None:
    keys = Keyboard('"""', "def f():", "    return 1", '"""', '"""inline"""', '"""a', 'b"""')
    assert message(keys) == "def f():\n    return 1"
    assert message(keys) == "inline"
    assert message(keys) == "a\nb"


def test_an_unfinished_block_at_the_end_of_input_is_dropped() -> None:
    with pytest.raises(EOFError):
        message(Keyboard('"""', "never closed"))


@pytest.mark.parametrize(
    ("typed", "command"),
    [
        ("\\help", "\\help"),
        ("/help", "\\help"),
        ("/save notes.json", "\\save notes.json"),
        ("/q", "\\q"),
        ("q", "\\quit"),
        ("Exit", "\\quit"),
        ("/etc/hosts is a file, right?", None),
        ("quit smoking tips?", None),
        ("\\help\nmore", None),
    ],
)
def test_commands_as_the_original_wrote_them(typed: str, command: str | None) -> None:
    assert as_command(typed) == command
