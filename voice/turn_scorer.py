"""The turn model run beside the loop: the utterance's audio in, probabilities out.

The loop thread must never wait on the model (it drains the microphone, feeds the STT and
the chat model): `request` hands a copy of the utterance's audio to a worker and returns;
`results` collects what finished. The worker is a process of its own, so the loop's Python
work (and MLX's) never holds it up through the interpreter lock, nor it them. One call
runs at a time and a request made meanwhile is dropped — the next silent block asks again
with newer audio — so a slow CPU scores less often instead of falling behind.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.voice.config import EndpointingSection
from mlx_harmony.voice.smart_turn import RATE, SECONDS, SmartTurn

_model: SmartTurn | None = None  # in the worker process
# Numerical libraries start a thread per core at import, which then spin between calls:
# the worker is held to one core, leaving the others to the STT, the chat model and the
# TTS (whose kernel launches need the CPU even on a GPU).
ONE_THREAD = {
    name: "1"
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
}  # fmt: skip


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _load_in_worker(path: str) -> None:
    global _model
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the daemon's to handle
    _model = SmartTurn.load(path)


def _score_in_worker(audio: np.ndarray, rate: int) -> float:
    assert _model is not None
    if rate != RATE:
        import soxr

        audio = soxr.resample(audio, rate, RATE).astype(np.float32)
    return _model.probability(audio)


class TurnScorer:
    def __init__(self, model: SmartTurn, sample_rate: int) -> None:
        self.rate = sample_rate
        self._audio: deque[np.ndarray] = deque()
        self._samples = 0
        self._started = False
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_load_in_worker,
            initargs=(str(Path(model.path)),),
        )
        self._running: tuple[float, float, Future[float]] | None = None
        self._done: list[tuple[float, float]] = []
        # Seconds from each request to its result being collected (the loop's view: the
        # model's time, the hand-over and the loop's next look together).
        self.turnarounds: list[float] = []
        # Why the worker stopped (it crashed, or was killed): no more scores, the turns end
        # by the maximum wait.
        self.failure: str | None = None

    def warmup(self, timeout: float = 120.0) -> None:
        """Start the worker and run one call now: a process starts and loads the model on
        its first call, which would otherwise fall in the first pause (≈1-2 s)."""
        self._call(np.zeros(self.rate // 10, np.float32)).result(timeout=timeout)

    def _call(self, audio: np.ndarray) -> Future[float]:
        if self._started:
            return self._pool.submit(_score_in_worker, audio, self.rate)
        self._started = True
        with _environment(ONE_THREAD):  # the worker process starts with the first call
            return self._pool.submit(_score_in_worker, audio, self.rate)

    def start(self, blocks: list[np.ndarray]) -> None:
        """A new utterance, from these blocks (the pre-roll) on."""
        self._audio.clear()
        self._samples = 0
        for pcm in blocks:
            self.add(pcm)

    def add(self, pcm: np.ndarray) -> None:
        self._audio.append(pcm)
        self._samples += len(pcm)
        keep = SECONDS * self.rate
        while self._audio and self._samples - len(self._audio[0]) >= keep:
            self._samples -= len(self._audio.popleft())

    def request(self, heard_until: float) -> None:
        self._collect()
        if self._running is not None or not self._audio or self.failure is not None:
            return
        audio = np.concatenate(list(self._audio)).astype(np.float32)
        try:
            future = self._call(audio)
        except BrokenExecutor as e:  # the worker died since its last answer
            self.failure = f"{type(e).__name__}: {e}"
            return
        self._running = (heard_until, time.perf_counter(), future)

    def results(self) -> list[tuple[float, float]]:
        """(heard_until, probability) for each score finished since the last call."""
        self._collect()
        done, self._done = self._done, []
        return done

    def wait(self, timeout: float) -> None:
        """Until the call running now (if any) has finished, for `results` to have it."""
        if self._running is not None:
            wait([self._running[2]], timeout=timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _collect(self) -> None:
        if self._running is not None and self._running[2].done():
            at, asked, future = self._running
            self._running = None
            try:
                p = future.result()
            except Exception as e:  # a broken worker process, or the model's own error
                self.failure = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                return
            self.turnarounds.append(time.perf_counter() - asked)
            self._done.append((at, p))


def load_turn_scorer(
    endpointing: EndpointingSection, sample_rate: int, notice: Callable[[str], None]
) -> TurnScorer | None:
    """The configured turn model, or None — said in one line — when there is none to load:
    the turn then ends by the silence rule alone."""
    if endpointing.turn_model is None:
        return None
    try:
        model = SmartTurn.load(endpointing.turn_model)
    except ConfigError as e:
        notice(f"{e}; turns end after {endpointing.silence_ms} ms of silence instead")
        return None
    scorer = TurnScorer(model, sample_rate)
    scorer.warmup()
    return scorer
