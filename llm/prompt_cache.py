"""A conversation's KV cache that knows which tokens it holds, so a turn prefills only what
is new.

Two copies are kept: the live cache (prompt + everything generated) and a checkpoint taken
just before the last prompt token of the latest turn. The next prompt usually diverges from
the live cache right after the old prompt (Harmony drops past analysis; templates re-render
the answer), and GPT-OSS's sliding-window layers cannot be trimmed back once they wrapped,
so the checkpoint is what makes reuse work there. Whichever keeps the longer prefix wins.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ConversationCache:
    def __init__(self, model: Any) -> None:
        self._model = model
        self.reset()

    def reset(self) -> None:
        self.cache: list[Any] = make_prompt_cache(self._model)
        self.tokens: list[int] = []
        self._checkpoint: tuple[list[int], list[Any]] | None = None

    def reuse(self, prompt: Sequence[int]) -> int:
        """Rewind to the longest cached prefix of `prompt[:-1]`; return its length.

        The last prompt token is always left to feed, because generation needs the
        logits it produces.
        """
        target = list(prompt[:-1])
        live = common_prefix(self.tokens, target)
        if live < len(self.tokens) and not can_trim_prompt_cache(self.cache):
            live = -1  # a sliding-window layer has wrapped: its old entries are gone
        saved = -1
        if self._checkpoint and common_prefix(self._checkpoint[0], target) == len(
            self._checkpoint[0]
        ):
            saved = len(self._checkpoint[0])
        if live < 0 and saved < 0:
            self.reset()
            return 0
        if saved > live:
            tokens, cache = self._checkpoint  # type: ignore[misc]
            self.tokens, self.cache = list(tokens), copy.deepcopy(cache)
        elif live < len(self.tokens):
            trim_prompt_cache(self.cache, len(self.tokens) - live)
            del self.tokens[live:]
        return len(self.tokens)

    def drop_live(self) -> None:
        """Discard the live cache (its state is unknown); the checkpoint stays."""
        self.cache = make_prompt_cache(self._model)
        self.tokens = []

    def saved(self) -> tuple[list[int], list[Any]] | None:
        """The checkpoint, to `restore` later: never changed in place (a restore copies
        it), so holding it keeps that state."""
        return self._checkpoint

    def restore(self, checkpoint: tuple[list[int], list[Any]] | None) -> None:
        """Back to a `saved` checkpoint; the live cache is dropped (the next `reuse`
        starts from the checkpoint)."""
        self._checkpoint = checkpoint
        self.drop_live()

    def checkpoint(self) -> None:
        mx.eval([c.state for c in self.cache])
        self._checkpoint = (list(self.tokens), copy.deepcopy(self.cache))
