"""One chat message from several typed or pasted lines.

- Lines that arrive together are one message: a paste of three lines is one question,
  not three turns. GNU readline's bracketed paste (on by default since readline 8.1)
  already hands a paste over as one string; elsewhere (libedit, older readline) the
  pasted lines are still waiting to be read when the first one returns, and are joined.
- A line ending in a backslash continues on the next one.
- A line starting with three double quotes opens a block that ends at a line ending with
  them, as in the original tool.
"""

from __future__ import annotations

from collections.abc import Callable

FENCE = '"""'
MORE = "... "


def read_message(
    read_line: Callable[[str], str], waiting: Callable[[], bool], prompt: str = "You: "
) -> str:
    """Read lines with `read_line(prompt)` until a message is complete; `waiting()` says
    whether more input has already arrived (a paste in progress). EOFError and
    KeyboardInterrupt from `read_line` propagate, dropping the unfinished message."""
    first = read_line(prompt)
    if first.lstrip().startswith(FENCE):
        return _block(first.lstrip()[len(FENCE) :], read_line)
    lines = [first]
    while True:
        if lines[-1].endswith("\\") and not lines[-1].endswith("\\\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(read_line(MORE))
        elif waiting():
            lines.append(read_line(""))
        else:
            return "\n".join(lines)


def _block(opening: str, read_line: Callable[[str], str]) -> str:
    if opening.rstrip().endswith(FENCE):  # """one line"""
        return opening.rstrip()[: -len(FENCE)]
    lines = [opening] if opening else []
    while True:
        line = read_line(MORE)
        if line.rstrip().endswith(FENCE):
            lines.append(line.rstrip()[: -len(FENCE)])
            return "\n".join(lines).strip("\n")
        lines.append(line)
