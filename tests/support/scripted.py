"""Scripted stand-ins for the voice daemon's devices and models, for unit tests of the
shell (`voice.daemon.VoiceAssistant`) driven by its `step()` on an injected clock.

They replace only what is around the shell: the turn rules, the playout, the chat log and
the tool loop stay real. What the engine or the STT say is the script's; their own
behaviour is tested elsewhere on the tiny models."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import numpy as np

from mlx_harmony.llm.messages import (
    ChatMessage,
    Event,
    GenerationStats,
    TextDelta,
    TurnDone,
)
from mlx_harmony.voice.audio_io import MODEL_RATE, Block

BLOCK_MS = 80
SPEECH_LEVEL = 0.1  # far above the energy detector's 0.01


class Clock:
    """Time that moves only when the test says (a block's length per block)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedMic:
    """Blocks the test hands over, each marked with its index in the first sample, so
    that what reached the STT can be told block by block."""

    lost = False

    def __init__(self, clock: Clock, block_ms: int = BLOCK_MS) -> None:
        self.clock, self.block_ms = clock, block_ms
        self.block = MODEL_RATE * block_ms // 1000
        self.queued: deque[Block] = deque()
        self.count = 0

    def open(self) -> None: ...

    def close(self) -> None: ...

    def hear(self, pattern: str) -> list[int]:
        """Queue 's' (speech) / '.' (silence) blocks, a block's time apart; their indices."""
        indices = []
        for c in pattern:
            self.clock.now += self.block_ms / 1000
            level = SPEECH_LEVEL if c == "s" else 0.0
            pcm = np.full(self.block, level, dtype=np.float32)
            pcm[0] = block_mark(self.count)
            self.queued.append(Block(pcm, self.clock.now))
            indices.append(self.count)
            self.count += 1
        return indices

    def read(self, timeout: float) -> Block | None:
        return self.queued.popleft() if self.queued else None

    def drain(self) -> list[Block]:
        blocks = list(self.queued)
        self.queued.clear()
        return blocks


def block_mark(index: int) -> float:
    return 1e-6 * (index + 1)  # too small to change what the detector hears


def block_index(pcm: np.ndarray) -> int:
    return round(float(pcm[0]) / 1e-6) - 1


class ScriptedTranscriber:
    """An STT whose transcript is the script's `words`; it records the blocks it was fed."""

    predicts_pauses = False
    pause: float | None = None
    room = 10_000

    def __init__(self, words: str) -> None:
        self.words = words
        self.fed: list[int] = []  # block indices, in the order fed
        self.frames_fed = 0
        self.active = False
        self.text = ""
        self.peeks = 0

    def start(self) -> None:
        self.active, self.text = True, ""

    def feed(self, pcm: np.ndarray) -> str:
        self.fed.append(block_index(pcm))
        self.frames_fed += 1
        if not self.text and float(np.abs(pcm[1:]).max()) > 0:
            self.text = self.words
            return self.words
        return ""

    def peek(self, silence_s: float = 0.0) -> str:
        self.peeks += 1
        return self.words

    def finish(self, silence_s: float = 0.0) -> str:
        self.active = False
        return self.words

    def stop(self) -> None:
        self.active = False


class ScriptedEngine:
    """Answers every question with `answer`, one word per event; records marks and
    rollbacks (a speculative answer dropped)."""

    harmony = False
    model_id = "scripted"

    def __init__(self, answer: str = "Paris is the capital.") -> None:
        self.answer = answer
        self.asked: list[str] = []
        self.rollbacks = 0

    def stream(self, conversation, sampling=None, should_stop=None, start=None) -> Iterator[Event]:
        self.asked.append(conversation.history[-1].content)
        for word in self.answer.split(" "):
            if should_stop is not None and should_stop():
                break
            yield TextDelta("final", word + " ")
        stats = GenerationStats(0, 0, 0, 0.0, 0.0, 0.0, 0.0)
        yield TurnDone("stop", (ChatMessage("assistant", self.answer, "final"),), (), stats)

    def prefill(self, conversation) -> int:
        return 0

    def prefill_steps(self, conversation, step: int = 0) -> Iterator[int]:
        return iter(())

    def prompt_size(self, conversation) -> int | None:
        return None

    def end_of_turn_probability(self, conversation) -> float | None:
        return None

    def reset(self) -> None: ...

    def warmup(self, prompt) -> bool:
        return False

    def mark(self) -> object:
        return len(self.asked)

    def rollback(self, mark: object) -> None:
        self.rollbacks += 1


def run_until(step: Callable[[], None], done: Callable[[], bool], limit: int = 10_000) -> None:
    """Drive the loop until `done` (a count of passes, not time, bounds it)."""
    for _ in range(limit):
        if done():
            return
        step()
    raise AssertionError("the loop never got there")
