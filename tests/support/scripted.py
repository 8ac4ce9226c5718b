"""Scripted stand-ins for the voice daemon's devices and models, for unit tests of the
shell (`voice.daemon.VoiceAssistant`) driven by its `step()` on an injected clock.

They replace only what is around the shell: the turn rules, the playout, the chat log and
the tool loop stay real. What the engine or the STT say is the script's; their own
behaviour is tested elsewhere on the tiny models."""

from __future__ import annotations

import threading
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
from mlx_harmony.voice.synthesis import SteppedHere
from mlx_harmony.voice.tts_speed import TtsSpeed

BLOCK_MS = 80
SPEECH_LEVEL = 0.1  # far above the energy detector's 0.01


class Clock:
    """Time that moves only when the test says (a block's length per block)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        """A wait of the loop's own (for the speaker to play on): the clock moves instead."""
        self.now += seconds


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
    """Answers every question with `answer`, one word per event, each taking `word_s` of
    the clock's time; records marks and rollbacks (a speculative answer dropped)."""

    harmony = False
    model_id = "scripted"

    def __init__(
        self, answer: str = "Paris is the capital.", clock: Clock | None = None, word_s: float = 0.0
    ) -> None:
        self.answer, self.clock, self.word_s = answer, clock, word_s
        self.asked: list[str] = []
        self.rollbacks = 0
        self.resets = 0

    def stream(self, conversation, sampling=None, should_stop=None, start=None) -> Iterator[Event]:
        self.asked.append(conversation.history[-1].content)
        for n, word in enumerate(self.answer.split(" ")):
            if should_stop is not None and should_stop():
                break
            if self.clock is not None:
                self.clock.now += self.word_s
            yield TextDelta("final", f" {word}" if n else word)
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

    def reset(self) -> None:
        self.resets += 1

    def warmup(self, prompt) -> bool:
        return False

    def mark(self) -> object:
        return len(self.asked)

    def rollback(self, mark: object) -> None:
        self.rollbacks += 1


class ScriptedSpeech(SteppedHere):
    """One answer's speech: `frames_per_word` frames a word, each step taking the
    synthesizer's `step_s` of the clock; like Kyutai's, it reads one word ahead, so it is
    ready only with the next word in hand (or the text closed)."""

    def __init__(self, tts: ScriptedSynthesizer) -> None:
        self.tts = tts
        self.words: list[str] = []
        self.pending = ""
        self.closed = False
        self.frames = 0

    def push(self, text: str) -> None:
        *complete, self.pending = (self.pending + text).split(" ")
        self.words += [w for w in complete if w]

    def close(self) -> None:
        self.words += self.pending.split()
        self.pending, self.closed = "", True

    @property
    def done(self) -> bool:
        return self.closed and self.frames >= len(self.words) * self.tts.frames_per_word

    @property
    def ready(self) -> bool:
        word = self.frames // self.tts.frames_per_word
        return not self.done and (self.closed or word + 1 < len(self.words))

    def step(self) -> np.ndarray:
        self.tts.clock.now += self.tts.step_s + self.tts.stalls.pop(self.tts.steps, 0.0)
        self.tts.steps += 1
        self.frames += 1
        return np.full(self.tts.frame_samples, 0.1, dtype=np.float32)

    def frames_left(self) -> int:
        return len(self.words) * self.tts.frames_per_word - self.frames

    def frames_for_words(self, words: int) -> int:
        return words * self.tts.frames_per_word

    def heard(self, frames_played: int) -> str:
        return " ".join(self.words[: frames_played // self.tts.frames_per_word])


class ScriptedSynthesizer:
    """A TTS whose frames take `step_s` of the clock each (and the `stalls` seconds more
    at those step numbers, counted across sessions); `adapted` records the paces it was
    told to cut codebooks for."""

    frame_seconds = 0.08
    frame_samples = MODEL_RATE * 80 // 1000
    sample_rate = MODEL_RATE

    def __init__(self, clock: Clock, step_s: float, frames_per_word: int = 1) -> None:
        self.clock, self.step_s, self.frames_per_word = clock, step_s, frames_per_word
        self.speed = TtsSpeed(8, 32, step_s, self.frame_seconds, chosen=True, margin=1.2)
        self.adapted: list[float] = []
        self.stalls: dict[int, float] = {}
        self.steps = 0

    def session(self, batch: bool = True) -> ScriptedSpeech:
        return ScriptedSpeech(self)

    def adapt(self, observed_rate: float) -> TtsSpeed | None:
        self.adapted.append(observed_rate)
        return None


class ScriptedSpeaker:
    """Plays what it is given in real time on the test's clock; running dry while an
    answer is expected is a gap (counted when anyone next looks)."""

    latency = 0.0
    rate = MODEL_RATE
    lost = False

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.expecting = False
        self.first_sound_at: float | None = None
        self._until = 0.0  # when what was queued has played
        self._queued = 0  # samples queued since the start
        self._gaps = 0
        self._sounding = False
        self.played: list[np.ndarray] = []  # everything it was given, in order

    def open(self) -> None: ...

    def close(self) -> None: ...

    def _look(self) -> None:
        if self._sounding and self.clock.now >= self._until:
            self._sounding = False
            if self.expecting:
                self._gaps += 1

    @property
    def underruns(self) -> int:
        self._look()
        return self._gaps

    def play(self, pcm: np.ndarray) -> None:
        self._look()
        if not self._sounding:
            self._sounding, self._until = True, self.clock.now
            if self.first_sound_at is None:
                self.first_sound_at = self.clock.now
        self._until += len(pcm) / self.rate
        self._queued += len(pcm)
        self.played.append(pcm)

    def pending_seconds(self) -> float:
        self._look()
        return max(0.0, self._until - self.clock.now) if self._sounding else 0.0

    @property
    def busy(self) -> bool:
        return self.pending_seconds() > 0

    @property
    def played_samples(self) -> int:
        return self._queued - round(self.pending_seconds() * self.rate)

    def clear(self) -> None:
        self.expecting, self._sounding, self._until = False, False, self.clock.now


def run_until(
    step: Callable[[], None],
    done: Callable[[], bool],
    clock: Clock | None = None,
    tick: float = 0.005,
    limit: int = 20_000,
) -> None:
    """Drive the loop until `done` (a count of passes, not time, bounds it); with a
    clock, each pass also takes `tick` of it (the loop's own time: a speaker plays on)."""
    for _ in range(limit):
        if done():
            return
        step()
        if clock is not None:
            clock.now += tick
    raise AssertionError("the loop never got there")


class ClockedMic:
    """A live microphone on the test's clock: what it is told to `say` (real samples),
    then silence, one block per block length of the clock, as a device delivers them.
    The voice loop runs its real models on it without waiting for real time. `say` may
    come from another thread (a scenario beside the loop); `said` is set once the loop
    has taken every block of it."""

    lost = False

    def __init__(self, clock: Clock, block_ms: int = BLOCK_MS) -> None:
        self.clock = clock
        self.block_s = block_ms / 1000
        self.block = MODEL_RATE * block_ms // 1000
        self._speech = np.zeros(0, dtype=np.float32)
        self._next_at = clock.now + self.block_s
        self._queued: deque[Block] = deque()
        self._lock = threading.Lock()
        self.said = threading.Event()
        self.said.set()

    def open(self) -> None: ...

    def close(self) -> None: ...

    def say(self, pcm: np.ndarray) -> None:
        """Deliver `pcm` (24 kHz mono) after what is still to be said."""
        with self._lock:
            self._speech = np.concatenate([self._speech, pcm.astype(np.float32)])
            self.said.clear()

    @property
    def saying(self) -> bool:
        """Some of what it was told to say is not taken by the loop yet."""
        return not self.said.is_set()

    def _take(self, count: int | None) -> list[Block]:
        with self._lock:
            while self.clock.now >= self._next_at:
                pcm = np.zeros(self.block, dtype=np.float32)
                take = self._speech[: self.block]
                pcm[: len(take)] = take
                self._speech = self._speech[self.block :]
                self._queued.append(Block(pcm, self._next_at))
                self._next_at += self.block_s
            n = len(self._queued) if count is None else min(count, len(self._queued))
            blocks = [self._queued.popleft() for _ in range(n)]
            if not len(self._speech) and not self._queued:
                self.said.set()
            return blocks

    def read(self, timeout: float) -> Block | None:
        blocks = self._take(1)
        return blocks[0] if blocks else None

    def drain(self) -> list[Block]:
        return self._take(None)
