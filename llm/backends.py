"""Which engine generates: the model loaded here, the model sharded over the ranks of an
`mlx.launch` run, or a remote OpenAI-compatible server.

Every command (chat, generate, voice, server) loads through `load_engine`, so a profile
that names a remote server, or a run under `mlx.launch`, works the same in all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from mlx_harmony.llm.config import PromptConfig, RemoteConfig, SamplingParams
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.debug_log import DebugLog
from mlx_harmony.llm.messages import Event, ReplyStart


class ChatEngine(Protocol):
    """What the front ends use of an engine, local or remote."""

    harmony: bool
    model_id: str

    def stream(
        self,
        conversation: Conversation,
        sampling: SamplingParams | None = None,
        should_stop: Callable[[], bool] | None = None,
        start: ReplyStart | None = None,
    ) -> Iterator[Event]: ...

    def prefill(self, conversation: Conversation) -> int: ...

    def prefill_steps(self, conversation: Conversation, step: int = ...) -> Iterator[int]:
        """`prefill` one chunk of at most `step` tokens per `next()` (the caller drives)."""
        ...

    def prompt_size(self, conversation: Conversation) -> int | None:
        """Tokens the prompt will take (None where the prompt is rendered elsewhere)."""
        ...

    def end_of_turn_probability(self, conversation: Conversation) -> float | None:
        """The model's probability that the user's last message is complete (None where
        the model is not at hand)."""
        ...

    def reset(self) -> None: ...

    def warmup(self, prompt: PromptConfig) -> bool:
        """Compile what the first turns would, before they come; False where nothing is
        compiled here (a remote or sharded engine)."""
        ...

    def mark(self) -> object:
        """The cache's state now, for `rollback` (after a turn that is dropped unseen)."""
        ...

    def rollback(self, mark: object) -> None: ...


def load_engine(
    model: str,
    *,
    lazy: bool = False,
    remote: RemoteConfig | None = None,
    debug: DebugLog | None = None,
) -> ChatEngine:
    """The engine a command runs on. Under `mlx.launch`, every rank loads its shard; rank 0
    returns to run the command, the others serve rank 0 until it leaves, then exit.
    `debug` logs every prompt and response of a local model (a remote renders its own)."""
    # Imported here: a command's --help, and the modules that only name the protocol, do
    # not wait for mlx-lm and transformers to load.
    from mlx_harmony.llm.distributed import ShardedEngine, follow, load_sharded, world
    from mlx_harmony.llm.engine import Engine
    from mlx_harmony.llm.remote import RemoteEngine

    if remote is not None:
        return RemoteEngine(remote, model)
    group = world()
    if group is None:
        local = Engine.load(model, lazy=lazy)
        local.debug = debug
        return local
    engine = load_sharded(model, group)
    if group.rank() != 0:
        follow(engine, group)
        raise SystemExit(0)
    engine.debug = debug
    return ShardedEngine(engine, group)
