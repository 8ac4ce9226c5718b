"""A microphone and a speaker without a sound server, for measuring the voice loop on a
machine that has none (a GPU server).

Both keep the product's own classes and drive their real PortAudio callbacks from a
thread at real-time pace: `FileMicrophone` delivers the clips it is given (silence in
between) in `block_ms` blocks, `ClockSpeaker` takes 20 ms of queued audio every 20 ms,
as a device with no output latency would, and notes when the first sound went out. The
daemon cannot tell them from devices.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np

from mlx_harmony.voice.audio_io import MODEL_RATE, Microphone, Speaker, _Resampler

SPEAKER_PERIOD_S = 0.02


class _Paced:
    """A thread calling `tick(n)` every `period` seconds, on a fixed schedule."""

    def __init__(self, period: float, tick: Any) -> None:
        self._period, self._tick = period, tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-audio", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        n = 0
        while not self._stop.is_set():
            self._tick()
            n += 1
            self._stop.wait(max(0.0, start + n * self._period - time.perf_counter()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _PacedDevice:
    """What both paced devices share: open while their pacer runs, closed by stopping it."""

    _pacer: _Paced | None = None

    @property
    def lost(self) -> bool:
        return self._pacer is None

    def close(self) -> None:
        if self._pacer is not None:
            self._pacer.stop()
            self._pacer = None


class FileMicrophone(_PacedDevice, Microphone):
    def __init__(self, block_ms: int = 80) -> None:
        super().__init__(None, block_ms)
        self._clips: deque[np.ndarray] = deque()
        self._current = np.zeros(0, dtype=np.float32)
        self.name = "file"
        self.clip_ended_at: float | None = None  # when the last sample of a clip went in

    def say(self, pcm: np.ndarray) -> None:
        """Deliver `pcm` (24 kHz mono) after what is queued."""
        self._clips.append(pcm.astype(np.float32))

    def open(self) -> None:
        self._resample = _Resampler(MODEL_RATE, MODEL_RATE)
        self._carry = np.zeros(0, dtype=np.float32)
        self._pacer = _Paced(self.block_ms / 1000, self._deliver)

    def _deliver(self) -> None:
        out = np.zeros(self.block, dtype=np.float32)
        filled = 0
        while filled < self.block:
            if not len(self._current):
                if not self._clips:
                    break
                self._current = self._clips.popleft()
            take = min(self.block - filled, len(self._current))
            out[filled : filled + take] = self._current[:take]
            self._current = self._current[take:]
            filled += take
            if not len(self._current) and not self._clips:
                self.clip_ended_at = time.perf_counter()
        self._callback(out[:, None], self.block, None, None)


class ClockSpeaker(_PacedDevice, Speaker):
    def __init__(self) -> None:
        super().__init__(None)
        self.name = "clock"

    def open(self) -> None:
        self.rate = MODEL_RATE
        self._resample = _Resampler(MODEL_RATE, MODEL_RATE)
        self.latency = 0.0
        frames = round(MODEL_RATE * SPEAKER_PERIOD_S)
        self._pacer = _Paced(
            SPEAKER_PERIOD_S,
            lambda: self._callback(np.zeros((frames, 1), np.float32), frames, None, None),
        )

    def _callback(self, outdata: np.ndarray, frames: int, t: Any, status: Any) -> None:
        before = self.played_samples
        super()._callback(outdata, frames, t, status)
        # Any sample counts as sound here: a random-weight codec's output can be NaN,
        # which the level check of a real device's first sound never passes.
        if self.first_sound_at is None and self.played_samples > before:
            self.first_sound_at = time.perf_counter()
