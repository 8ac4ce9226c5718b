"""The engine's vocabulary: conversation messages in, streaming events out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "developer", "user", "assistant", "tool"]
Channel = Literal["analysis", "commentary", "final"]
# What a piece of generated text is, whatever the format that carried it: the answer (the
# only text spoken), reasoning, a preamble (words to the user before a tool call) or the
# arguments of a tool call.
TextKind = Literal["answer", "reasoning", "preamble", "tool_arguments"]
_KIND_OF_CHANNEL: dict[str, TextKind] = {
    "final": "answer", "analysis": "reasoning", "commentary": "preamble",
}  # fmt: skip
FinishReason = Literal["stop", "length", "tool_call", "cancelled"]


@dataclass
class ChatMessage:
    """One message of a conversation, in the form chat logs store it.

    `channel` is set on assistant messages (Harmony's analysis/commentary/final);
    `recipient` on a tool call (`functions.get_weather`), `name` on a tool's answer.
    """

    role: Role
    content: str
    channel: Channel | None = None
    recipient: str | None = None
    name: str | None = None
    created_at: float = field(default_factory=time.time)


def empty_turn_notice(done: TurnDone) -> str | None:
    """What to tell the user when the model ended its turn without a single message."""
    if any(m.content.strip() for m in done.messages):
        return None
    if done.finish_reason == "length":
        return (
            f"(no answer: the model wrote {done.stats.generated_tokens} tokens, its limit, "
            "before it wrote a message; raise max_tokens)"
        )
    if done.finish_reason == "cancelled":
        return "(no answer: stopped before the model wrote a message)"
    return "(the model gave no answer: it ended its turn at once)"


def tool_answer(call: ChatMessage, text: str) -> ChatMessage:
    """The tool message answering `call`, on the call's channel. Its author is the tool:
    `python` for any python call, else the full recipient (`browser.search`,
    `functions.apply_patch`), as GPT-OSS's tools sign their answers."""
    recipient = call.recipient or "tool"
    author = "python" if recipient.startswith("python") else recipient
    return ChatMessage("tool", text, call.channel, name=author)


@dataclass(frozen=True)
class FunctionTool:
    """A function the caller offers the model (OpenAI's `tools` entry of type function)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True)
class BuiltinTool:
    """A tool namespace of the system message (GPT-OSS's `python` and `browser`), run by
    the assistant itself rather than by the caller."""

    name: str
    description: str
    functions: tuple[FunctionTool, ...] = ()


Tool = FunctionTool | BuiltinTool


@dataclass(frozen=True)
class TextDelta:
    """New text of the message being generated. Consumers act on its `kind`; the channel
    and recipient are the format's (Harmony's) own words for it."""

    channel: Channel
    text: str
    recipient: str | None = None

    @property
    def kind(self) -> TextKind:
        return "tool_arguments" if self.recipient else _KIND_OF_CHANNEL[self.channel]


@dataclass(frozen=True)
class AnswerNow:
    """The reply is the answer, begun at once (no reasoning first), with `begin` as its
    first words."""

    begin: str = ""


@dataclass(frozen=True)
class CallFunction:
    """The reply is a call of the function `name` (of any of the turn's when None)."""

    name: str | None = None


# Where a reply is forced to start; each format renders it in its own tokens.
ReplyStart = AnswerNow | CallFunction


@dataclass(frozen=True)
class MessageDone:
    message: ChatMessage


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    time_to_first_token: float
    time_to_first_final: float | None
    total_seconds: float
    peak_memory_gb: float
    # Of generated_tokens: those of the reasoning (counted by the model's own decoder, so
    # in its own vocabulary; a remote server's as it reports them).
    reasoning_tokens: int = 0

    @property
    def prefill_tps(self) -> float:
        fed = self.prompt_tokens - self.cached_tokens
        return fed / self.time_to_first_token if self.time_to_first_token > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        decode = self.total_seconds - self.time_to_first_token
        return (self.generated_tokens - 1) / decode if decode > 0 else 0.0


@dataclass(frozen=True)
class TurnDone:
    finish_reason: FinishReason
    messages: tuple[ChatMessage, ...]
    tokens: tuple[int, ...]  # generated ids, stop token included
    stats: GenerationStats


@dataclass(frozen=True)
class ToolCall:
    """The model called a tool the assistant runs; `message` is the call."""

    message: ChatMessage


@dataclass(frozen=True)
class ToolWaiting:
    """The tool called by `message` is still running (sent every few tens of ms)."""

    message: ChatMessage


@dataclass(frozen=True)
class ToolResult:
    """What the tool answered, as the tool message the model reads next."""

    message: ChatMessage


Event = TextDelta | MessageDone | TurnDone | ToolCall | ToolWaiting | ToolResult
