"""One assistant turn with tools: generate, run the tool the model called, generate again.

`Engine.stream` ends a generation at `<|call|>`. When the call goes to a tool of the
toolbox (python, browser.*, functions.apply_patch), its answer is appended as a tool
message in Harmony form and generation continues, up to `max_steps` calls; a call to a
function the caller declared (an API client's) ends the turn with finish_reason
"tool_call", as before. Chat, voice and the server all take their turns from `respond`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from datetime import datetime
from typing import Protocol

from mlx_harmony.llm.backends import ChatEngine
from mlx_harmony.llm.config import PromptConfig, SamplingParams
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.messages import (
    ChatMessage,
    Event,
    FinishReason,
    GenerationStats,
    ReplyStart,
    TextDelta,
    Tool,
    ToolCall,
    ToolResult,
    ToolWaiting,
    TurnDone,
    tool_answer,
)


class ToolRunner(Protocol):
    max_steps: int

    @property
    def declarations(self) -> list[Tool]: ...

    def handles(self, recipient: str | None) -> bool: ...

    def run(self, call: ChatMessage) -> ChatMessage: ...

    def cancel(self) -> None: ...


WAIT_SLICE_S = 0.05  # how often a running tool lets the consumer act

LIMIT_REACHED = (
    "Tool call limit reached ({n} calls this turn). Do not call more tools: "
    "answer the user now with what you have."
)


def respond(
    engine: ChatEngine,
    history: Sequence[ChatMessage],
    prompt: PromptConfig,
    toolbox: ToolRunner | None = None,
    *,
    sampling: SamplingParams | None = None,
    should_stop: Callable[[], bool] | None = None,
    now: datetime | None = None,
    tools: Sequence[Tool] = (),
    start: ReplyStart | None = None,
) -> Iterator[Event]:
    """Yield the turn's events, with ToolCall/ToolResult around every tool run; the last
    event is one TurnDone whose messages hold every call, result and answer in order."""
    history = list(history)
    declared = [*(toolbox.declarations if toolbox else []), *tools]
    began = time.perf_counter()
    first_final: float | None = None
    turns: list[TurnDone] = []
    messages: list[ChatMessage] = []
    calls = 0
    while True:
        done: TurnDone | None = None
        for event in engine.stream(
            Conversation(history, prompt, now=now, tools=declared),
            sampling=sampling,
            should_stop=should_stop,
            start=start if not turns else None,
        ):
            if isinstance(event, TurnDone):
                done = event
                continue
            if first_final is None and isinstance(event, TextDelta) and event.kind == "answer":
                first_final = time.perf_counter() - began
            yield event
        assert done is not None
        turns.append(done)
        messages += done.messages
        history += done.messages
        call = done.messages[-1] if done.messages else None
        runs_here = (
            done.finish_reason == "tool_call"
            and toolbox is not None
            and call is not None
            and toolbox.handles(call.recipient)
        )
        if not runs_here:
            yield _summary(done.finish_reason, turns, messages, began, first_final)
            return
        assert call is not None and toolbox is not None
        if calls >= toolbox.max_steps:
            # The model keeps calling: refuse, and let it answer. A call after that refusal
            # ends the turn, as a length limit would.
            if calls > toolbox.max_steps:
                yield _summary("length", turns, messages, began, first_final)
                return
            refusal = LIMIT_REACHED.format(n=calls)
            result = tool_answer(call, refusal)
        else:
            yield ToolCall(call)
            ran = yield from _run_tool(toolbox, call, should_stop)
            if ran is None:  # stopped while the tool ran: no result to show the model
                yield _summary("cancelled", turns, messages, began, first_final)
                return
            result = ran
        calls += 1
        yield ToolResult(result)
        messages.append(result)
        history.append(result)
        if should_stop is not None and should_stop():
            yield _summary("cancelled", turns, messages, began, first_final)
            return


def _run_tool(
    toolbox: ToolRunner, call: ChatMessage, should_stop: Callable[[], bool] | None
) -> Generator[Event, None, ChatMessage | None]:
    """Run the call on a thread, yielding ToolWaiting while it runs, so that the consumer
    stays responsive (a voice keeps speaking its notice and hears a barge-in) and a stop
    cancels the tool; return its message, or None when stopped."""
    done: list[ChatMessage] = []

    def work() -> None:
        try:
            done.append(toolbox.run(call))
        except Exception as e:  # a tool's own bug must not end the assistant's turn
            text = f"The tool failed: {type(e).__name__}: {e}"
            done.append(tool_answer(call, text))

    worker = threading.Thread(target=work, name="tool", daemon=True)
    worker.start()
    while True:
        worker.join(WAIT_SLICE_S)
        if not worker.is_alive():
            return done[0]
        if should_stop is not None and should_stop():
            toolbox.cancel()  # a fetch that cannot be cancelled ends on its own timeout
            return None
        yield ToolWaiting(call)


def _summary(
    finish: FinishReason,
    turns: list[TurnDone],
    messages: list[ChatMessage],
    start: float,
    first_final: float | None,
) -> TurnDone:
    first = turns[0].stats
    stats = GenerationStats(
        prompt_tokens=turns[-1].stats.prompt_tokens,
        cached_tokens=turns[-1].stats.cached_tokens,
        generated_tokens=sum(t.stats.generated_tokens for t in turns),
        time_to_first_token=first.time_to_first_token,
        time_to_first_final=first_final,
        total_seconds=time.perf_counter() - start,
        peak_memory_gb=max(t.stats.peak_memory_gb for t in turns),
        reasoning_tokens=sum(t.stats.reasoning_tokens for t in turns),
    )
    tokens = tuple(tok for t in turns for tok in t.tokens)
    return TurnDone(finish, tuple(messages), tokens, stats)
