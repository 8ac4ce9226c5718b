"""What comes before the conversation for models that are not Harmony (a chat template,
a remote OpenAI-compatible server): one system text and the functions' schemas, written
the same way for both. (Harmony has its own system and developer messages: llm.harmony.)
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.messages import ChatMessage, FunctionTool

NO_PARAMETERS = {"type": "object", "properties": {}}


def system_text(prompt: PromptConfig, history: Sequence[ChatMessage], now: datetime | None) -> str:
    """The model identity, the developer instructions and any system or developer
    messages of the history (an API client's), in that order, as one system message."""
    parts = [
        prompt.expand(prompt.system_model_identity, now),
        prompt.expand(prompt.developer_instructions, now),
        *(m.content for m in history if m.role in ("system", "developer")),
    ]
    return "\n\n".join(p for p in parts if p)


def function_schemas(tools: Sequence[FunctionTool]) -> list[dict[str, Any]]:
    """OpenAI's `tools` entries for the functions a model may call."""
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters or NO_PARAMETERS,
            },
        }
        for t in tools
    ]
