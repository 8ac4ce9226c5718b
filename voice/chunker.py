"""Cutting the streamed final-channel text into chunks the TTS can start on early.

Pure text in, text out: a chunk is released at a sentence end once it has `min_chars`
(when `sentences` is on), or at a word boundary once the text reaches `chunk_chars`,
so that the first sentence is spoken while the model is still writing the rest.
"""

from __future__ import annotations

import re

# Full-width and curly punctuation are meant: answers are not always ASCII.
_SENTENCE_END = re.compile(
    r"[.!?…。！？]+[\"'”’)\]]*(?=\s)|\n\s*\n|\n(?=\s*[-*•\d])"  # noqa: RUF001
)
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


class SentenceChunker:
    def __init__(self, chunk_chars: int = 180, min_chars: int = 60, sentences: bool = True):
        self.chunk_chars, self.min_chars, self.sentences = chunk_chars, min_chars, sentences
        self._buf = ""

    def push(self, text: str) -> list[str]:
        """Add streamed text; return the chunks it completed (already made speakable)."""
        self._buf += text
        out = []
        while (cut := self._cut_point()) is not None:
            chunk, self._buf = self._buf[:cut], self._buf[cut:]
            out.extend(self._clean(chunk))
        return out

    def flush(self) -> list[str]:
        """The rest, at the end of the answer."""
        chunk, self._buf = self._buf, ""
        return self._clean(chunk)

    def pending(self) -> str:
        return self._buf

    def _cut_point(self) -> int | None:
        if "```" in self._buf and self._buf.count("```") % 2 == 1:
            return None  # inside a code block: wait for its end
        if self.sentences:
            for m in _SENTENCE_END.finditer(self._buf):
                head = self._buf[: m.end()]
                if head.count("```") % 2 == 1:
                    continue  # a full stop inside a code block
                if len(head.strip()) >= self.min_chars and m.end() <= self.chunk_chars:
                    return m.end()
        if len(self._buf) < self.chunk_chars:
            return None
        space = self._buf.rfind(" ", 0, self.chunk_chars)
        return space if space > 0 else self.chunk_chars

    @staticmethod
    def _clean(chunk: str) -> list[str]:
        text = speakable(chunk)
        return [text] if re.search(r"\w", text) else []
