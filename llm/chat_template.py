"""Every non-Harmony model: its tokenizer's own chat template, and a plain-text decoder.

Models with single-token thinking markers (`<think>` … `</think>`, as mlx-lm detects
them) have that span reported on the analysis channel, like Harmony's reasoning.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.messages import (
    AnswerNow,
    BuiltinTool,
    Channel,
    ChatMessage,
    FunctionTool,
    MessageDone,
    ReplyStart,
    TextDelta,
    Tool,
)
from mlx_harmony.llm.system_part import function_schemas, system_text


class ChatTemplateFormat:
    harmony = False

    def __init__(self, tokenizer: TokenizerWrapper) -> None:
        self.tokenizer = tokenizer
        self.stop_tokens = frozenset(tokenizer.eos_token_ids)
        self.structure_tokens = self.stop_tokens
        self.call_tokens: frozenset[int] = frozenset()  # one way to end a turn: end of text
        self.newline_tokens = tuple(tokenizer.encode("\n", add_special_tokens=False))
        think = tokenizer.has_thinking and len(tokenizer.think_start_tokens) == 1
        self._think = (tokenizer.think_start_id, tokenizer.think_end_id) if think else None

    def decode(self, ids: list[int]) -> str:
        """Text with the special tokens spelled out (for the debug log)."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def render(
        self,
        prompt: PromptConfig,
        history: Sequence[ChatMessage],
        now: datetime | None = None,
        tools: Sequence[Tool] = (),
    ) -> list[int]:
        builtin = [t.name for t in tools if isinstance(t, BuiltinTool)]
        if builtin:
            raise ConfigError(
                f"tools {', '.join(builtin)}: built-in tools need a GPT-OSS (Harmony) model"
            )
        system = system_text(prompt, history, now)
        msgs: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        for dialogue in prompt.example_dialogues:
            msgs += [{"role": e.role, "content": prompt.expand(e.content, now)} for e in dialogue]
        for m in history:
            if m.role in ("system", "developer") or m.channel == "analysis":
                continue
            msgs.append({"role": m.role, "content": m.content})
        schemas = function_schemas([t for t in tools if isinstance(t, FunctionTool)])
        return list(
            self.tokenizer.apply_chat_template(
                msgs, tools=schemas or None, add_generation_prompt=True
            )
        )

    def decoder(self) -> ChatTemplateDecoder:
        return ChatTemplateDecoder(self.tokenizer, self.stop_tokens, self._think)

    def reply_start(self, start: ReplyStart) -> list[int]:
        """The answer's first words. A template has no header to force: whether its model
        thinks first is the template's to say (some open the think block in the prompt),
        and it writes calls in its model's own syntax, unknown here, so a call is left to
        the model."""
        if not isinstance(start, AnswerNow):
            return []
        return self.tokenizer.encode(start.begin, add_special_tokens=False)


class ChatTemplateDecoder:
    def __init__(
        self,
        tokenizer: TokenizerWrapper,
        stop_tokens: frozenset[int],
        think: tuple[int, int] | None,
    ) -> None:
        self._detok = tokenizer.detokenizer
        self._detok.reset()
        self._stop = stop_tokens
        self._think = think
        self._channel: Channel = "final"
        self._text: dict[Channel, str] = {}

    def feed(self, token: int) -> list[TextDelta | MessageDone]:
        if self._think and token == self._think[0]:
            return self._switch("analysis")
        if self._think and token == self._think[1]:
            return self._switch("final")
        if token in self._stop:
            return self.finish()
        self._detok.add_token(token)
        return self._delta(self._detok.last_segment)

    @property
    def reasoning(self) -> bool:
        """The last token fed belongs to the reasoning (inside the think block)."""
        return self._channel == "analysis"

    def finish(self) -> list[TextDelta | MessageDone]:
        self._detok.finalize()
        events = self._delta(self._detok.last_segment)
        return events + self._close()

    def _switch(self, channel: Channel) -> list[TextDelta | MessageDone]:
        events = self.finish()
        self._detok.reset()
        self._channel = channel
        return events

    def _delta(self, text: str) -> list[TextDelta | MessageDone]:
        if not text:
            return []
        self._text[self._channel] = self._text.get(self._channel, "") + text
        return [TextDelta(self._channel, text)]

    def _close(self) -> list[TextDelta | MessageDone]:
        text = self._text.pop(self._channel, "")
        stripped = text.strip()
        return [MessageDone(ChatMessage("assistant", stripped, self._channel))] if stripped else []
