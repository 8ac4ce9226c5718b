"""The streamed final-channel text as the TTS should hear it.

Pure text in, text out: markdown made speakable (emphasis, headings, bullets, links, code
blocks) and released word by word, so that the answer is spoken while it is written.
"""

from __future__ import annotations

import re

_MARKUP = [
    (re.compile(r"```.*?```", re.S), " "),  # code blocks are shown, not read out
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"!?\[([^\]]*)\]\([^)]*\)"), r"\1"),  # links: keep the text
    (re.compile(r"^\s{0,3}#{1,6}\s*", re.M), ""),
    (re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.M), ""),
    (re.compile(r"(\*\*|__|\*|_|~~)(?=\S)(.+?)(?<=\S)\1"), r"\2"),
    (re.compile(r"\|"), " "),
    (re.compile(r"\s+"), " "),
]


def speakable(text: str) -> str:
    """Markdown as it should sound: emphasis, headings, bullets and code fences removed."""
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text.strip()


class SpeakableStream:
    """Markdown written a few characters at a time, released as speakable text at word
    boundaries for the TTS session (a code block is held until it closes, then dropped)."""

    def __init__(self) -> None:
        self._buf = ""

    def push(self, text: str) -> str:
        """Add streamed text; return what it completed, cleaned, ending with a space."""
        self._buf += text
        cut = _cut(self._buf)
        if cut is None:
            return ""
        head, self._buf = self._buf[:cut], self._buf[cut:]
        return _words(head)

    def flush(self) -> str:
        """The rest, at the end of the answer."""
        head, self._buf = self._buf, ""
        return _words(head)


def _cut(buf: str) -> int | None:
    """Where the text may be cut: after a space that ends no code block or link half-way
    (their markup is only recognised whole)."""
    if buf.count("```") % 2 == 1:
        buf = buf[: buf.rfind("```")]  # an open code block: only what comes before it
    for space in reversed(list(re.finditer(r"\s", buf))):
        head = buf[: space.end()]
        link_open = head.count("[") > head.count("]") or _OPEN_LINK.search(head)
        if head.count("```") % 2 == 0 and not link_open and not head.rstrip().endswith("]"):
            return space.end()
    return None


def _words(text: str) -> str:
    # Markup split across two releases is not matched by `speakable`: drop what is left.
    words = _STRAY_MARKUP.sub(" ", speakable(text)).split()
    return " ".join(words) + " " if any(re.search(r"\w", w) for w in words) else ""


_STRAY_MARKUP = re.compile(r"[*_~`#|\[\]]+")
_OPEN_LINK = re.compile(r"\]\([^)]*$")
