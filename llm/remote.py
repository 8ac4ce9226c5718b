"""A remote OpenAI-compatible server as the engine: vLLM, SGLang, llama.cpp's server or
another mlx-harmony server generates, and its stream becomes the same events the local
engine yields, so chat, voice, the tool loop and our own server work unchanged.

The mapping: `content` deltas are final-channel text, `reasoning_content` (or
`reasoning`) deltas analysis text, `tool_calls` become messages addressed to
`functions.<name>`; consecutive assistant messages of the history go back as one
assistant message (reasoning, content, tool calls) and tool answers carry the id of their
call. A connection that fails before any output is retried with backoff; one lost
mid-answer, an HTTP error or a timeout is one `RemoteError` line naming the server.
Built-in tools (python, browser) belong to the server that runs the model: enable them
there.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import httpx

from mlx_harmony.llm.config import PromptConfig, RemoteConfig, SamplingParams
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.errors import ConfigError, RuntimeFailure
from mlx_harmony.llm.messages import (
    AnswerNow,
    BuiltinTool,
    CallFunction,
    ChatMessage,
    Event,
    FinishReason,
    FunctionTool,
    GenerationStats,
    MessageDone,
    ReplyStart,
    TextDelta,
    TurnDone,
)
from mlx_harmony.llm.system_part import function_schemas, system_text


class RemoteError(RuntimeFailure):
    """The remote server failed; one line naming it and what went wrong."""


class RemoteUnreachable(RemoteError, ConfigError):
    """No server answers at the configured address: like every other wrong setting, a
    command ends on it with status 2."""


_FINISH: dict[str | None, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_call",
    "function_call": "tool_call",
}


def to_openai_messages(
    history: Sequence[ChatMessage], prompt: PromptConfig, now: datetime | None
) -> list[dict[str, Any]]:
    """The history as OpenAI messages; the system part (`llm.system_part`) as one system
    message first."""
    out: list[dict[str, Any]] = []
    system = system_text(prompt, history, now)
    if system:
        out.append({"role": "system", "content": system})
    for dialogue in prompt.example_dialogues:
        out += [{"role": e.role, "content": prompt.expand(e.content, now)} for e in dialogue]
    open_call_ids: list[str] = []  # calls not yet answered, oldest first
    turn: dict[str, Any] | None = None  # one assistant message from consecutive ones
    for i, m in enumerate(history):
        if m.role != "assistant":
            turn = None
            if m.role == "tool":
                call_id = open_call_ids.pop(0) if open_call_ids else f"call_{i}"
                out.append({"role": "tool", "tool_call_id": call_id, "content": m.content})
            elif m.role in ("system", "developer"):
                continue  # in the system message above
            else:
                out.append({"role": m.role, "content": m.content})
            continue
        if turn is None:
            turn = {"role": "assistant", "content": None}
            out.append(turn)
        if m.recipient:
            open_call_ids.append(f"call_{i}")
            call = {"name": m.recipient.removeprefix("functions."), "arguments": m.content}
            turn.setdefault("tool_calls", []).append(
                {"id": f"call_{i}", "type": "function", "function": call}
            )
        elif m.channel == "analysis":
            turn["reasoning_content"] = (turn.get("reasoning_content") or "") + m.content
        else:
            turn["content"] = (turn["content"] or "") + m.content
    return out


def _request_body(
    model: str,
    messages: list[dict[str, Any]],
    prompt: PromptConfig,
    sampling: SamplingParams,
    tools: Sequence[FunctionTool],
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "reasoning_effort": prompt.reasoning_effort,
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    # Beyond OpenAI's fields, sent only when set: vLLM, SGLang, llama.cpp and mlx-harmony
    # read these names.
    defaults = SamplingParams()
    for name in ("top_k", "min_p", "repetition_penalty"):
        if getattr(sampling, name) != getattr(defaults, name):
            body[name] = getattr(sampling, name)
    if sampling.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in sampling.logit_bias.items()}
    if tools:
        body["tools"] = function_schemas(tools)
    return body


class RemoteEngine:
    """Generation on a remote OpenAI-compatible server, with the local engine's interface."""

    harmony = False  # the server renders the prompt; no forced Harmony prefix from here

    def __init__(self, config: RemoteConfig, model: str) -> None:
        self.config = config
        self.model_id = model
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if config.api_key_env and not key:
            raise ConfigError(
                f"remote.api_key_env: environment variable {config.api_key_env} is not set"
            )
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        self._client = httpx.Client(
            base_url=config.base_url.rstrip("/"), headers=headers, timeout=timeout
        )

    def reset(self) -> None:
        """Nothing is cached here (the server keeps its own prompt cache)."""

    def warmup(self, prompt: PromptConfig) -> bool:
        """Nothing is compiled here: the server warms up its own model."""
        return False

    def mark(self) -> object:
        """Nothing to roll back: the remote server keeps its own cache."""
        return None

    def rollback(self, mark: object) -> None:
        """See `mark`."""

    def end_of_turn_probability(self, conversation: Conversation) -> float | None:
        """Not offered by the remote API (its logits stay on the server)."""
        return None

    def prefill(self, conversation: Conversation) -> int:
        """The remote API has no prefill: the whole prompt is sent at the end of the turn."""
        return 0

    def prefill_steps(self, conversation: Conversation, step: int = 0) -> Iterator[int]:
        """Nothing to feed (see `prefill`)."""
        return iter(())

    def prompt_size(self, conversation: Conversation) -> int | None:
        """Unknown here: the remote server renders (and limits) the prompt."""
        return None

    def stream(
        self,
        conversation: Conversation,
        sampling: SamplingParams | None = None,
        should_stop: Callable[[], bool] | None = None,
        start: ReplyStart | None = None,
    ) -> Iterator[Event]:
        history, prompt, now, tools = (
            conversation.history, conversation.prompt, conversation.now, conversation.tools
        )  # fmt: skip
        builtin = [t.name for t in tools if isinstance(t, BuiltinTool)]
        if builtin:
            raise ConfigError(
                f"tools {', '.join(builtin)}: with a remote backend, built-in tools run on the "
                "remote server; enable them there"
            )
        if isinstance(start, AnswerNow) and start.begin:
            raise ConfigError("an answer's first words cannot be forced on a remote server")
        sampling = sampling or prompt.sampling
        functions = [t for t in tools if isinstance(t, FunctionTool)]
        body = _request_body(
            self.model_id, to_openai_messages(history, prompt, now), prompt, sampling, functions
        )
        # A server reasons as it is set up to (AnswerNow asks nothing of it); a call is
        # forced the API's way.
        if isinstance(start, CallFunction) and functions:
            body["tool_choice"] = (
                {"type": "function", "function": {"name": start.name}} if start.name else "required"
            )
        yield from _Turn(self, body, should_stop).run()

    # ------------------------------------------------------------------ transport
    @property
    def where(self) -> str:
        """How errors name this server."""
        return f"remote {self.config.base_url}"

    def open_stream(self, body: dict[str, Any]) -> tuple[httpx.Response, Iterator[str]]:
        """POST the request, retrying connection failures; return the response and its lines."""
        attempt = 0
        while True:
            try:
                request = self._client.build_request("POST", "/chat/completions", json=body)
                response = self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
                if attempt >= self.config.retries:
                    raise RemoteUnreachable(
                        f"{self.where}: cannot connect ({_reason(e)}) after {attempt + 1} tries"
                    ) from None
                time.sleep(self.config.backoff_s * 2**attempt)
                attempt += 1
                continue
            except httpx.TimeoutException:
                raise RemoteError(
                    f"{self.where}: no answer within {self.config.timeout_s:g} s"
                ) from None
            if response.status_code != 200:
                response.read()
                response.close()
                raise RemoteError(
                    f"{self.where}: HTTP {response.status_code}: {_error_text(response)}"
                )
            return response, response.iter_lines()


class _Turn:
    """One streamed answer: SSE chunks → events, messages collected for TurnDone."""

    def __init__(
        self, engine: RemoteEngine, body: dict[str, Any], should_stop: Callable[[], bool] | None
    ) -> None:
        self.engine, self.body, self.should_stop = engine, body, should_stop
        self.analysis = ""
        self.final = ""
        self.calls: dict[int, dict[str, str]] = {}
        self.usage: dict[str, Any] = {}
        self.finish: FinishReason = "length"
        self.pieces = 0

    def run(self) -> Iterator[Event]:
        start = time.perf_counter()
        first: float | None = None
        first_final: float | None = None
        response, lines = self.engine.open_stream(self.body)
        try:
            for data in _sse_data(lines, self.engine):
                if data == "[DONE]":
                    break
                for event in self._events(json.loads(data)):
                    first = first or time.perf_counter()
                    answer = isinstance(event, TextDelta) and event.kind == "answer"
                    if answer and first_final is None:
                        first_final = time.perf_counter()
                    yield event
                if self.should_stop is not None and self.should_stop():
                    self.finish = "cancelled"
                    break
        finally:
            response.close()
        messages = self._messages()
        for msg in messages:
            yield MessageDone(msg)
        end = time.perf_counter()
        details = self.usage.get("prompt_tokens_details") or {}
        stats = GenerationStats(
            prompt_tokens=self.usage.get("prompt_tokens", 0),
            cached_tokens=details.get("cached_tokens") or 0,
            generated_tokens=self.usage.get("completion_tokens", self.pieces),
            time_to_first_token=(first or end) - start,
            time_to_first_final=None if first_final is None else first_final - start,
            total_seconds=end - start,
            peak_memory_gb=0.0,
            reasoning_tokens=(self.usage.get("completion_tokens_details") or {}).get(
                "reasoning_tokens"
            )
            or 0,
        )
        yield TurnDone(self.finish, tuple(messages), (), stats)

    def _events(self, chunk: dict[str, Any]) -> list[Event]:
        if "error" in chunk:
            message = (chunk["error"] or {}).get("message", "error")
            raise RemoteError(f"{self.engine.where}: {message}")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        events: list[Event] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                self.analysis += reasoning
                events.append(TextDelta("analysis", reasoning))
            if delta.get("content"):
                self.final += delta["content"]
                events.append(TextDelta("final", delta["content"]))
            for call in delta.get("tool_calls") or []:
                slot = self.calls.setdefault(call.get("index", 0), {"name": "", "arguments": ""})
                fn = call.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
                if fn.get("arguments"):
                    recipient = f"functions.{slot['name']}"
                    events.append(TextDelta("commentary", fn["arguments"], recipient))
            if choice.get("finish_reason"):
                self.finish = _FINISH.get(choice["finish_reason"], "stop")
            self.pieces += bool(events)
        return events

    def _messages(self) -> list[ChatMessage]:
        out = []
        if self.analysis:
            out.append(ChatMessage("assistant", self.analysis, "analysis"))
        if self.final:
            out.append(ChatMessage("assistant", self.final, "final"))
        for _, call in sorted(self.calls.items()):
            out.append(
                ChatMessage(
                    "assistant", call["arguments"], "commentary", f"functions.{call['name']}"
                )
            )
        return out


def _sse_data(lines: Iterator[str], engine: RemoteEngine) -> Iterator[str]:
    try:
        for line in lines:
            if line.startswith("data:"):
                yield line[5:].strip()
    except httpx.TimeoutException:
        raise RemoteError(
            f"{engine.where}: no answer within {engine.config.timeout_s:g} s"
        ) from None
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        raise RemoteError(f"{engine.where}: connection lost mid-answer ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"]).splitlines()[0]
    except (ValueError, KeyError, TypeError):
        return (
            response.text.strip().splitlines()[0]
            if response.text.strip()
            else response.reason_phrase
        )
