"""Speech synthesized on a thread of its own, beside the language model (`tts.own_thread`).

The daemon's loop steps the engine, the STT and the TTS in turn on one thread: while an
answer is being written each frame waits for the engine's token and each token for the
frame (the pace of first answers that ran dry, issue #26). `ThreadedTTS` runs every TTS
call on one worker thread instead. MLX (≥ 0.32) gives each thread its own default stream
and compile cache, so the models' work is issued side by side; everything the TTS
computes is created, traced and evaluated on the worker, and only NumPy frames and Python
text cross between the threads.

Measured on two H200s it was slower, not faster (docs/performance.md, "The TTS on a
thread of its own"): synthesis beside the other models' work ran dry more often and its
answers were held back for a slower pace, most likely because each model's step builds
its graph in Python and the threads take turns on Python's lock. Measured again after the
batched delay and the fused kernels, it was slower beside the kernels (a wide margin,
no gaps either way) and ran dry less often beside the compiled depformer frame (a thin
one). It is off by default, the first thing to try where answers still run dry (a Mac is
unmeasured).

The loop's side keeps the `TextToSpeech` / `SpeechStream` interfaces: a session's text is
handed to the worker, which steps it as far ahead as the text allows, and a take hands
over a frame already made (with the time it took and when it was made, so the pace an
answer teaches is synthesis's own, not when the loop came to look).
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

import numpy as np

from mlx_harmony.voice.synthesis import SpeechStream, TextToSpeech
from mlx_harmony.voice.tts_speed import TtsSpeed

T = TypeVar("T")

# How long a thread that wants Python's lock waits before the holder is made to yield it
# (CPython's default is 5 ms). Both threads' steps alternate Python (building the graph)
# with waits on the device that release the lock; at 5 ms each of a TTS frame's waits
# could cost up to that again whenever the loop's thread was in Python meanwhile.
SWITCH_INTERVAL_S = 0.0005
# Frames a session is synthesized ahead of what the loop took, at most: far more than any
# playout buffer needs; only bounds the memory of an answer nobody plays.
MAX_AHEAD_FRAMES = 750  # 60 s of audio
_CLOSE = object()  # in a session's inbox: the text is complete


class ThreadedTTS:
    """A `TextToSpeech` whose every call runs on its own worker thread."""

    def __init__(self, tts: TextToSpeech, clock: Callable[[], float]) -> None:
        self.tts, self.clock = tts, clock
        self.sample_rate, self.frame_samples = tts.sample_rate, tts.frame_samples
        self._cond = threading.Condition()
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()
        self._current: ThreadedSpeech | None = None
        self._busy_with: ThreadedSpeech | None = None  # the session in a step right now
        self._closed = False
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._serve, name="text-to-speech", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ TextToSpeech
    @property
    def speed(self) -> TtsSpeed | None:
        return self.tts.speed

    @property
    def frame_seconds(self) -> float:
        return self.tts.frame_seconds

    def calibrate(self, auto: bool, floor: int, margin: float) -> TtsSpeed:
        return self.call(lambda: self.tts.calibrate(auto, floor, margin))

    def adapt(self, observed_rate: float) -> TtsSpeed | None:
        return self.call(lambda: self.tts.adapt(observed_rate))

    def warmup(self) -> None:
        """Trace and build the TTS's kernels for this thread (compiled functions are kept
        per thread: a warm-up on another one leaves the first answer to build them)."""
        self.call(self.tts.warmup)

    def session(self, batch: bool = True) -> ThreadedSpeech:
        with self._cond:
            self._current = None  # an answer still synthesizing is given up first
        inner = self.call(lambda: self.tts.session(batch))
        speech = ThreadedSpeech(self, inner)
        with self._cond:
            self._current = speech
            self._cond.notify_all()
        return speech

    def speak(self, text: str) -> Iterator[np.ndarray]:
        return iter(self.call(lambda: list(self.tts.speak(text))))

    # ------------------------------------------------------------------ the thread
    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` run on the worker (between two steps of a session), its result here."""
        done: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("text to speech is closed")
            self._calls.append((fn, done))
            self._cond.notify_all()
        return done.result()

    def close(self) -> None:
        with self._cond:
            self._closed, self._current = True, None
            self._cond.notify_all()
        self._thread.join()

    def _release(self, speech: ThreadedSpeech) -> None:
        """`speech` is no longer stepped: returns once its step in flight (if any) is over."""
        with self._cond:
            if self._current is speech:
                self._current = None
                self._cond.notify_all()
            self._cond.wait_for(lambda: self._busy_with is not speech)

    def _serve(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closed or self._calls or self._has_work(self._current)
                )
                if self._calls:
                    fn, done = self._calls.popleft()
                    speech = None
                elif self._closed:
                    return
                else:
                    speech = self._busy_with = self._current
                    texts, speech.inbox = speech.inbox, []
            if speech is None:
                try:
                    done.set_result(fn())
                except BaseException as e:  # handed to the caller, who raises it
                    done.set_exception(e)
                continue
            try:
                made = speech.advance(texts)
            except Exception as e:  # raised on the loop's next take
                made, speech.error = None, e
            with self._cond:
                if made is not None:
                    speech.made.append(made)
                speech.snapshot()
                self._busy_with = None
                self._cond.notify_all()

    def _has_work(self, speech: ThreadedSpeech | None) -> bool:
        if speech is None or speech.error is not None:
            return False
        inner = speech.inner  # read on the worker, the only thread that changes it
        return bool(speech.inbox) or (inner.ready and len(speech.made) < MAX_AHEAD_FRAMES)


class ThreadedSpeech:
    """One answer's speech on the worker: the loop pushes text and takes frames; the
    worker applies the text and steps the session while it is ready."""

    def __init__(self, owner: ThreadedTTS, inner: SpeechStream) -> None:
        self.owner, self.inner = owner, inner
        self.inbox: list[object] = []  # text (and _CLOSE) for the worker to push
        self.made: deque[tuple[np.ndarray, float, float]] = deque()  # frame, took, made at
        self.error: Exception | None = None
        self._spent = 0.0  # synthesis time since the last frame made (text-only steps)
        self.snapshot()

    # ------------------------------------------------------------------ the worker's side
    def advance(self, texts: list[object]) -> tuple[np.ndarray, float, float] | None:
        """Push what was written since the last look, then one step if one can run."""
        for text in texts:
            if text is _CLOSE:
                self.inner.close()
            else:
                assert isinstance(text, str)
                self.inner.push(text)
        if not self.inner.ready:
            return None
        clock = self.owner.clock
        frame, took, at = self.inner.take(clock)
        self._spent += took
        if frame is None:
            return None
        spent, self._spent = self._spent, 0.0
        return frame, spent, at

    def snapshot(self) -> None:
        """What the loop may ask between two steps (taken under the owner's lock)."""
        inner = self.inner
        self._inner_done, self._inner_wants_text = inner.done, inner.wants_text
        self._inner_left = inner.frames_left()

    # ------------------------------------------------------------------ the loop's side
    def push(self, text: str) -> None:
        self._send(text)

    def close(self) -> None:
        self._send(_CLOSE)

    def _send(self, item: object) -> None:
        with self.owner._cond:
            self.inbox.append(item)
            self.owner._cond.notify_all()

    @property
    def ready(self) -> bool:
        """A frame is made (or the worker failed: the take raises it)."""
        return bool(self.made) or self.error is not None

    @property
    def done(self) -> bool:
        with self.owner._cond:
            return self._finished()

    @property
    def wants_text(self) -> bool:
        with self.owner._cond:
            return self._inner_wants_text and not self.inbox

    def wait(self, seconds: float) -> None:
        """Until a frame is made, the session is done or `seconds` have passed."""
        with self.owner._cond:
            self.owner._cond.wait_for(
                lambda: bool(self.made) or self.error is not None or self._finished(), seconds
            )

    def _finished(self) -> bool:
        return self._inner_done and not self.made and not self.inbox

    @property
    def frames_made(self) -> int:
        return len(self.made)

    def take(self, clock: Callable[[], float]) -> tuple[np.ndarray | None, float, float]:
        with self.owner._cond:
            if self.error is not None:
                raise self.error
            if not self.made:
                return None, 0.0, clock()
            return self.made.popleft()

    def step(self) -> np.ndarray | None:
        return self.take(self.owner.clock)[0]

    def frames_left(self) -> int:
        with self.owner._cond:
            return len(self.made) + self._inner_left

    def frames_for_words(self, words: int) -> int:
        return self.inner.frames_for_words(words)  # arithmetic on the model's constants

    def heard(self, frames_played: int) -> str:
        self.end()  # read once the worker has let go of it
        return self.inner.heard(frames_played)

    def end(self) -> None:
        self.owner._release(self)
