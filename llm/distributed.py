"""One model sharded over several processes or hosts with MLX's own distributed backends.

Started under `mlx.launch` (ring over TCP, JACCL over Thunderbolt RDMA, NCCL on CUDA),
every rank loads its tensor-parallel shard (the mlx-lm model's own `shard()`). Rank 0 runs
the front end (chat, generate, voice, server) with a `ShardedEngine`; every call it makes is
first broadcast to the other ranks, which make the same call on their shard (`follow`), so
each forward pass runs on all ranks at once. The ranks sample the same token because they
share the logits (the model's all-reduce) and the seed (rank 0 picks one per turn); they
stop at the same token because the stop flag is all-reduced after every token.
"""

from __future__ import annotations

import atexit
import json
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from mlx_harmony.llm.config import PromptConfig, SamplingParams
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.errors import ConfigError, RuntimeFailure
from mlx_harmony.llm.messages import (
    AnswerNow,
    BuiltinTool,
    CallFunction,
    ChatMessage,
    Event,
    FunctionTool,
    ReplyStart,
    Tool,
    TurnDone,
)

if TYPE_CHECKING:
    from mlx_harmony.llm.engine import Engine


def world() -> mx.distributed.Group | None:
    """The group of ranks when started by mlx.launch, else None (one process)."""
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def is_follower() -> bool:
    """This process is a rank other than 0: it only mirrors rank 0's model calls (and so
    must not claim the files rank 0 writes, such as the chat log)."""
    group = world()
    return group is not None and group.rank() != 0


def load_sharded(ref: str, group: mx.distributed.Group) -> Engine:
    """This rank's shard of the model. mlx-lm's `sharded_load` does the same for tensor
    parallelism, but loads the tokenizer that a GPT-OSS engine never needs (`load_model`)."""
    from mlx_harmony.llm.engine import Engine, load_model

    model, tokenizer = load_model(ref, lazy=True)  # the same one-line errors as unsharded
    if not hasattr(model, "shard"):
        raise ConfigError(
            f"model {ref}: cannot shard over {group.size()} ranks "
            "(its mlx-lm model has no tensor parallelism)"
        )
    try:
        model.shard(group)
    except ValueError as e:
        raise ConfigError(f"model {ref}: cannot shard over {group.size()} ranks ({e})") from e
    mx.eval(model.parameters())
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # every rank loaded
    return Engine(model, tokenizer, ref)


# ---------------------------------------------------------------------- wire format
def _broadcast(group: mx.distributed.Group, payload: bytes | None) -> bytes:
    """Rank 0's bytes on every rank (an all-sum where the others add zeros)."""
    size = mx.distributed.all_sum(
        mx.array([len(payload) if payload is not None else 0]), group=group, stream=mx.cpu
    )
    n = int(size.item())
    data = np.frombuffer(payload, np.uint8) if payload is not None else np.zeros(n, np.uint8)
    total = mx.distributed.all_sum(mx.array(data.astype(np.int32)), group=group, stream=mx.cpu)
    return np.array(total).astype(np.uint8).tobytes()


def _encode_tools(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    return [{"builtin": isinstance(t, BuiltinTool), **asdict(t)} for t in tools]


def _decode_tools(raw: list[dict[str, Any]]) -> list[Tool]:
    out: list[Tool] = []
    for t in raw:
        if t.pop("builtin"):
            fns = tuple(FunctionTool(**f) for f in t.pop("functions"))
            out.append(BuiltinTool(functions=fns, **t))
        else:
            out.append(FunctionTool(**t))
    return out


def _start_to_json(start: ReplyStart | None) -> dict[str, Any] | None:
    if start is None:
        return None
    return {"kind": type(start).__name__, **asdict(start)}


def _start_from_json(data: dict[str, Any] | None) -> ReplyStart | None:
    if data is None:
        return None
    kinds = {"AnswerNow": AnswerNow, "CallFunction": CallFunction}
    return kinds[data.pop("kind")](**data)


def _call(op: str, **args: Any) -> bytes:
    return json.dumps({"op": op, **args}).encode()


def _dated(conversation: Conversation) -> Conversation:
    """Every rank must render the same time placeholders: rank 0 reads the clock once."""
    if conversation.now is not None:
        return conversation
    return replace(conversation, now=datetime.now().astimezone())


def _turn(conversation: Conversation) -> dict[str, Any]:
    """What a turn is rendered from, as JSON (read back in `follow`)."""
    assert conversation.now is not None
    return {
        "history": [asdict(m) for m in conversation.history],
        "prompt": conversation.prompt.model_dump(mode="json"),
        "now": conversation.now.isoformat(),
        "tools": _encode_tools(conversation.tools),
    }


class DistributedError(RuntimeFailure):
    """The ranks no longer compute the same thing; their answers would be garbage."""


def check_same_tokens(group: mx.distributed.Group, tokens: Sequence[int]) -> None:
    """Every rank must have generated exactly rank 0's tokens (same logits, same seed).
    Were they to differ, their caches would hold different turns and every later forward
    pass would mix them: fail loudly instead."""
    digest = zlib.crc32(np.asarray(tokens, np.int64).tobytes()) & 0x7FFFFFFF
    mine = digest if group.rank() == 0 else 0
    first = mx.distributed.all_sum(mx.array([mine]), group=group, stream=mx.cpu).item()
    differ = mx.distributed.all_sum(mx.array([int(digest != first)]), group=group, stream=mx.cpu)
    if differ.item():
        raise DistributedError(
            f"{int(differ.item())} of {group.size()} ranks generated other tokens than rank 0 "
            "(their sampling diverged); stopping"
        )


class _SharedStop:
    """`should_stop` agreed by all ranks: true on all when rank 0's own check is."""

    def __init__(self, group: mx.distributed.Group, local: Callable[[], bool] | None) -> None:
        self.group, self.local, self.forced = group, local, False

    def __call__(self) -> bool:
        mine = self.forced or (self.local is not None and self.local())
        flag = mx.distributed.all_sum(mx.array([int(mine)]), group=self.group, stream=mx.cpu)
        return bool(flag.item())


# ---------------------------------------------------------------------- rank 0
class ShardedEngine:
    """Rank 0's engine: the local shard's engine, with every call mirrored on the others."""

    def __init__(self, engine: Engine, group: mx.distributed.Group) -> None:
        self.engine, self.group = engine, group
        self.harmony = engine.harmony
        self.model_id = engine.model_id
        self._closed = False
        atexit.register(self.close)  # the other ranks wait for rank 0's word to leave

    def stream(
        self,
        conversation: Conversation,
        sampling: SamplingParams | None = None,
        should_stop: Callable[[], bool] | None = None,
        start: ReplyStart | None = None,
    ) -> Iterator[Event]:
        sampling = sampling or conversation.prompt.sampling
        if sampling.seed is None:  # every rank must draw the same random numbers
            seed = random.getrandbits(31)
            sampling = sampling.model_copy(update={"seed": seed, "reseed_each_turn": True})
        conversation = _dated(conversation)
        _broadcast(
            self.group,
            _call(
                "stream",
                **_turn(conversation),
                sampling=sampling.model_dump(mode="json"),
                start=_start_to_json(start),
            ),
        )
        stop = _SharedStop(self.group, should_stop)
        inner = self.engine.stream(conversation, sampling, stop, start)
        finished = False
        try:
            for event in inner:
                if isinstance(event, TurnDone):
                    finished = True
                    check_same_tokens(self.group, event.tokens)
                yield event
        finally:
            if not finished:
                # A consumer that left early: finish the turn as cancelled on every rank,
                # or the others would wait forever for this rank's next stop flag.
                stop.forced = True
                for event in inner:
                    if isinstance(event, TurnDone):
                        check_same_tokens(self.group, event.tokens)

    def prefill(self, conversation: Conversation) -> int:
        conversation = _dated(conversation)
        _broadcast(self.group, _call("prefill", **_turn(conversation)))
        return self.engine.prefill(conversation)

    def prefill_steps(self, conversation: Conversation, step: int = 0) -> Iterator[int]:
        """In one step: every rank must run the same model calls, and the others cannot
        be told to stop half way."""
        yield self.prefill(conversation)

    def prompt_size(self, conversation: Conversation) -> int | None:
        return self.engine.prompt_size(conversation)  # rank 0 alone: no model

    def end_of_turn_probability(self, conversation: Conversation) -> float | None:
        """Not across ranks: every rank would have to run the same model call."""
        return None

    def reset(self) -> None:
        _broadcast(self.group, _call("reset"))
        self.engine.reset()

    def warmup(self, prompt: PromptConfig) -> bool:
        """Not across ranks: every rank would have to run the same turns in step; the
        first turns compile their kernels."""
        return False

    def mark(self) -> object:
        """No rollback across ranks (each would need its own mark): after a dropped turn
        the next turn prefills again what the ranks' caches cannot reuse."""
        return None

    def rollback(self, mark: object) -> None:
        """See `mark`."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _broadcast(self.group, _call("quit"))


# ---------------------------------------------------------------------- other ranks
def follow(engine: Engine, group: mx.distributed.Group) -> None:
    """Make rank 0's calls on this rank's shard until rank 0 leaves."""
    while True:
        call = json.loads(_broadcast(group, None))
        op = call["op"]
        if op == "quit":
            return
        if op == "reset":
            engine.reset()
            continue
        conversation = Conversation(
            [ChatMessage(**m) for m in call["history"]],
            PromptConfig.model_validate(call["prompt"]),
            datetime.fromisoformat(call["now"]),
            _decode_tools(call["tools"]),
        )
        try:
            if op == "prefill":
                engine.prefill(conversation)
            else:
                sampling = SamplingParams.model_validate(call["sampling"])
                stop = _SharedStop(group, None)
                for event in engine.stream(
                    conversation, sampling, stop, _start_from_json(call["start"])
                ):
                    if isinstance(event, TurnDone):
                        check_same_tokens(group, event.tokens)
        except DistributedError:
            raise
        except ConfigError:
            continue  # rank 0 met the same error before generating and reports it
