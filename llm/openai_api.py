"""OpenAI's chat-completions wire format: request validation, and engine events → responses.

Kept apart from the HTTP layer so that the mapping (messages → conversation, tool calls,
reasoning → `reasoning_content`, usage) can be read and tested on its own.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mlx_harmony.llm.config import MAX_SEED, SamplingParams
from mlx_harmony.llm.messages import CallFunction, ChatMessage, FinishReason, FunctionTool

MAX_STOP_SEQUENCES = 4


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, returned with every 4xx."""

    error: ErrorBody


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class RequestMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: dict[str, str]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


# Request fields this server takes only at their neutral values: the values that ask
# nothing of it, and why any other is refused.
NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "logprobs": ((None, False), "log probabilities are not returned by this server"),
    "top_logprobs": ((None, 0), "log probabilities are not returned by this server"),
    "store": ((None, False), "this server stores no completions"),
    "modalities": ((None, ["text"]), "this endpoint answers in text only"),
    "audio": ((None,), "this endpoint answers in text only"),
    "response_format": (
        (None, {"type": "text"}),
        "structured output (json_object, json_schema) is not supported; ask for JSON in the prompt",
    ),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "no web search here (the browser tool searches)"),
    "verbosity": ((None, "medium"), "verbosity is not adjustable here"),
    "functions": ((None, []), "give functions as `tools` (`functions` is deprecated)"),
    "function_call": ((None, "none", "auto"), "use `tool_choice` (`function_call` is deprecated)"),
}


class ChatCompletionRequest(BaseModel):
    """The request body; unknown fields are refused so that typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    messages: list[RequestMessage] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # Strict: `true` is not a number of tokens (pydantic would read it as 1).
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    seed: int | None = Field(None, ge=-(2**63), le=MAX_SEED, strict=True)
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=1, strict=True)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Every other field of OpenAI's request: taken, and ignored where it asks nothing of
    # this server (a client's defaults); where it asks for what is not here, refused
    # with the field named (see NEUTRAL).
    user: str | None = None
    metadata: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None  # billing and latency classes: one class here
    logprobs: Any = None
    top_logprobs: Any = None
    store: Any = None
    modalities: Any = None
    audio: Any = None
    response_format: Any = None
    prediction: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    functions: Any = None
    function_call: Any = None
    # Extensions beyond OpenAI's fields, named as in mlx-lm's server.
    min_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, strict=True)
    repetition_penalty: float | None = Field(None, gt=0)
    repetition_context_size: int | None = Field(None, ge=1, strict=True)
    xtc_probability: float | None = Field(None, ge=0, le=1)
    xtc_threshold: float | None = Field(None, ge=0, le=0.5)
    # The original mlx-harmony's per-request choices: a served profile by name, and one of
    # the prompt configs the server offers (by name: never a path the client picks).
    profile: str | None = None
    prompt_config: str | None = None

    @field_validator(*NEUTRAL, mode="before")
    @classmethod
    def _neutral_only(cls, v: Any, info: ValidationInfo) -> Any:
        allowed, why = NEUTRAL[info.field_name]  # type: ignore[index]
        if not any(v == a and type(v) is type(a) for a in allowed):
            raise ValueError(why)
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops)):
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} non-empty stop sequences")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias key {key!r} is not a token id")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias for {key} must be between -100 and 100")
        return v

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling(self, base: SamplingParams) -> SamplingParams:
        fields = (
            "temperature",
            "top_p",
            "seed",
            "min_p",
            "top_k",
            "repetition_penalty",
            "repetition_context_size",
            "xtc_probability",
            "xtc_threshold",
            "presence_penalty",
            "frequency_penalty",
        )
        updates: dict[str, Any] = {
            f: getattr(self, f) for f in fields if getattr(self, f) is not None
        }
        if self.seed is not None:
            updates["reseed_each_turn"] = True  # a request's seed fixes that request
        if self.output_limit is not None:
            updates["max_tokens"] = self.output_limit
        if self.logit_bias:
            updates["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        return base.model_copy(update=updates)

    def forced_call(self) -> CallFunction | None:
        """The call the reply must be, when `tool_choice` demands one."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return None
        if self.tool_choice == "required":
            if len(self.tools) > 1:  # the model still picks which function
                return CallFunction()
            name = self.tools[0].function.name
        else:
            name = self.tool_choice.function.get("name", "")  # type: ignore[union-attr]
        if name not in {t.function.name for t in self.tools}:
            raise ValueError(f"tool_choice: no function named {name!r} in tools")
        return CallFunction(name)

    def function_tools(self) -> list[FunctionTool]:
        if not self.tools or self.tool_choice == "none":
            return []
        return [
            FunctionTool(t.function.name, t.function.description, t.function.parameters)
            for t in self.tools
        ]

    def conversation(self) -> list[ChatMessage]:
        """Map OpenAI messages to the engine's, resolving tool results to function names."""
        names: dict[str, str] = {}
        out: list[ChatMessage] = []
        for m in self.messages:
            if m.role == "assistant":
                if m.reasoning_content:
                    out.append(ChatMessage("assistant", m.reasoning_content, "analysis"))
                if m.text():
                    out.append(ChatMessage("assistant", m.text(), "final"))
                for call in m.tool_calls or []:
                    names[call.id] = call.function.name
                    out.append(
                        ChatMessage(
                            "assistant",
                            call.function.arguments,
                            "commentary",
                            recipient=f"functions.{call.function.name}",
                        )
                    )
            elif m.role == "tool":
                name = names.get(m.tool_call_id or "", m.name or "tool")
                out.append(ChatMessage("tool", m.text(), name=f"functions.{name}"))
            else:
                out.append(ChatMessage(m.role, m.text()))
        return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def tool_call_of(msg: ChatMessage) -> dict[str, Any] | None:
    """The OpenAI tool call for a model message addressed to a declared function."""
    if msg.role != "assistant" or not (msg.recipient or "").startswith("functions."):
        return None
    return {
        "id": new_id("call"),
        "type": "function",
        "function": {"name": msg.recipient.removeprefix("functions."), "arguments": msg.content},
    }


def finish_reason(reason: FinishReason, has_calls: bool) -> str:
    if reason == "length":
        return "length"
    return "tool_calls" if has_calls else "stop"


def usage(prompt: int, completion: int, reasoning: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n"


class StopMatcher:
    """Cuts the answer at the first stop sequence, holding back text that may start one."""

    def __init__(self, stops: list[str] | None) -> None:
        self._stops = stops or []
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""
        self._sent = 0
        self.hit = False

    def feed(self, text: str) -> str:
        """Return the part of the answer that is safe to send now."""
        if self.hit:
            return ""
        self._text += text
        cut = min((i for s in self._stops if (i := self._text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            return self._release(cut)
        return self._release(max(self._sent, len(self._text) - self._hold))

    def flush(self) -> str:
        return "" if self.hit else self._release(len(self._text))

    @property
    def text(self) -> str:
        return self._text[: self._sent]

    def _release(self, upto: int) -> str:
        out, self._sent = self._text[self._sent : upto], upto
        return out
