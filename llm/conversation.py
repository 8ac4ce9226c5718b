"""What a prompt is rendered from, as one value every engine takes (and the ranks of a
sharded model send each other): the messages, the prompt config, the clock reading for
its placeholders, and the tools declared."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.messages import ChatMessage, Tool


@dataclass(frozen=True)
class Conversation:
    history: Sequence[ChatMessage]
    prompt: PromptConfig
    now: datetime | None = None
    tools: Sequence[Tool] = ()

    def with_history(self, history: Sequence[ChatMessage]) -> Conversation:
        return replace(self, history=history)
