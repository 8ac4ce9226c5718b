"""Microphone and speaker streams through sounddevice (PortAudio).

The PortAudio callbacks only move numpy blocks in and out of queues: no model runs on an
audio thread. Both sides work at the models' rate (24 kHz); a device that refuses it is
opened at its own rate and converted with soxr's streaming resampler.
"""

from __future__ import annotations

import contextlib
import platform
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from mlx_harmony.llm.errors import ConfigError

MODEL_RATE = 24_000
SILENCE_RMS = 1e-4

Kind = Literal["input", "output"]


class AudioError(ConfigError):
    """An audio problem the user can fix (library, device, permission): one line."""


def sounddevice() -> ModuleType:
    try:
        import sounddevice as sd
    except OSError:
        hint = {
            "Darwin": "brew install portaudio",
            "Linux": "sudo apt install libportaudio2 (Debian/Ubuntu)",
        }.get(platform.system(), "install PortAudio")
        raise AudioError(f"the PortAudio library is missing: {hint}") from None
    return sd


# Streams whose close is still running on its own thread (see _Stream.close).
_closing: set[threading.Thread] = set()


def rescan(wait: float = 2.0) -> bool:
    """Make PortAudio list devices again (it enumerates them only when initialised).

    Terminating PortAudio while another thread is still aborting a stream deadlocks both
    (seen when the sound server went away under an open stream): wait up to `wait` s for
    pending closes, and if one is still stuck, leave PortAudio alone and return False (the
    caller retries; devices with stable names still reopen meanwhile).
    """
    deadline = time.monotonic() + wait
    for closer in list(_closing):
        closer.join(max(0.0, deadline - time.monotonic()))
    if any(closer.is_alive() for closer in list(_closing)):
        return False
    sd = sounddevice()
    with contextlib.suppress(Exception):
        sd._terminate()
    sd._initialize()
    return True


def permission_hint() -> str:
    system = platform.system()
    if system == "Darwin":
        return (
            "allow microphone access for your terminal in System Settings > Privacy & "
            "Security > Microphone, then restart the terminal"
        )
    if system == "Linux":
        return (
            "check that the input is not muted (pavucontrol or alsamixer) and that you "
            "may use audio devices (the 'audio' group)"
        )
    return "check the system's microphone privacy settings and that the input is not muted"


def list_devices() -> str:
    sd = sounddevice()
    devices = sd.query_devices()
    if not len(devices):
        return "no audio devices found"
    default_in, default_out = sd.default.device
    lines = []
    for d in devices:
        marks = ("<" if d["index"] == default_in else " ") + (
            ">" if d["index"] == default_out else " "
        )
        lines.append(
            f"{marks} {d['index']:>2} {d['name']}  "
            f"(in {d['max_input_channels']}, out {d['max_output_channels']}, "
            f"{d['default_samplerate']:.0f} Hz)"
        )
    lines.append("< default input, > default output")
    return "\n".join(lines)


def resolve_device(spec: str | int | None, kind: Kind) -> int | None:
    """A device index from a name (case-insensitive substring) or index; None = default."""
    sd = sounddevice()
    channels = f"max_{kind}_channels"
    devices = list(sd.query_devices())
    if spec is None or spec == "":
        default = sd.default.device[0 if kind == "input" else 1]
        if default is None or default < 0:
            usable = [d for d in devices if d[channels] > 0]
            if not usable:
                raise AudioError(f"no {kind} device found (see --list-devices)")
            return int(usable[0]["index"])
        return None
    if isinstance(spec, str) and spec.strip().isdigit():
        spec = int(spec)
    if isinstance(spec, int):
        if not 0 <= spec < len(devices):
            raise AudioError(f"no audio device with index {spec} (see --list-devices)")
        if devices[spec][channels] < 1:
            raise AudioError(f"device {spec} ({devices[spec]['name']}) has no {kind} channels")
        return spec
    matches = [d for d in devices if spec.lower() in d["name"].lower() and d[channels] > 0]
    if not matches:
        raise AudioError(f"no {kind} device matching '{spec}' (see --list-devices)")
    exact = [d for d in matches if d["name"].lower() == spec.lower()]
    return int((exact or matches)[0]["index"])


def _device_rate(sd: ModuleType, device: int | None, kind: Kind) -> int:
    """The model rate if the device takes it, else the device's own default rate."""
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=device, samplerate=MODEL_RATE, channels=1, dtype="float32")
        return MODEL_RATE
    except Exception:
        info = sd.query_devices(device, kind)
        return int(info["default_samplerate"])


def _open_error(kind: Kind, spec: str | int | None, err: Exception) -> AudioError:
    what = f"'{spec}'" if spec not in (None, "") else "(default)"
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    fix = permission_hint() if kind == "input" else "check that it is connected and not in use"
    return AudioError(f"cannot open {kind} device {what}: {msg}; {fix}")


class _Resampler:
    def __init__(self, src: int, dst: int) -> None:
        import soxr

        self.stream = soxr.ResampleStream(src, dst, 1, dtype="float32") if src != dst else None

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        return pcm if self.stream is None else self.stream.resample_chunk(pcm)


# The speaker's played blocks kept for the echo canceller (20 ms each: 4 s).
PLAYED_BLOCKS = 200
# A stream whose callback has not run for this long has lost its device, even if PortAudio
# still calls it active (seen when a sound server goes away under an open ALSA stream).
STALL_SECONDS = 3.0
# How long closing a broken stream may take before it is abandoned.
CLOSE_SECONDS = 2.0


class _Stream:
    """What both directions share: a PortAudio stream that may end or stall on its own."""

    _callback: Callable[..., None]  # each direction's PortAudio callback
    _resample: _Resampler  # to or from the device's rate, set by open()

    def __init__(self, device: str | int | None) -> None:
        self.spec = device
        self._stream: Any = None
        self._lost = threading.Event()
        self._last_callback = 0.0

    def _start(self, kind: Kind, make: Callable[..., Any], **settings: Any) -> None:
        """Open and start a mono float32 stream; a failure is one line naming the device."""
        self._lost.clear()
        try:
            self._stream = make(
                channels=1, dtype="float32", callback=self._callback,
                finished_callback=self._lost.set, **settings,
            )  # fmt: skip
            self._last_callback = time.monotonic()  # the stall grace period starts now
            self._stream.start()
        except Exception as e:
            self._stream = None
            raise _open_error(kind, self.spec, e) from None
        self.name = sounddevice().query_devices(self._stream.device)["name"]

    def _alive(self) -> None:
        self._last_callback = time.monotonic()

    @property
    def lost(self) -> bool:
        """The stream ended or stalled (the device went away), or was never opened."""
        if self._stream is None or self._lost.is_set() or not self._stream.active:
            return True
        return time.monotonic() - self._last_callback > STALL_SECONDS

    def close(self) -> None:
        stream, self._stream = self._stream, None
        # A converting resampler is a native object: released with the stream (open()
        # makes a new one), not left for the interpreter's exit.
        self._resample = _Resampler(MODEL_RATE, MODEL_RATE)
        if stream is None:
            return

        def shut() -> None:
            try:
                with contextlib.suppress(Exception):
                    stream.abort()
                with contextlib.suppress(Exception):
                    stream.close()
            finally:
                _closing.discard(threading.current_thread())

        # Aborting a stream whose device vanished can block inside PortAudio; never let
        # that hang the assistant (the stream is abandoned instead).
        closer = threading.Thread(target=shut, name="audio-close", daemon=True)
        _closing.add(closer)
        closer.start()
        closer.join(CLOSE_SECONDS)


@dataclass
class Block:
    pcm: np.ndarray  # 24 kHz mono float32
    at: float  # time.perf_counter() when the callback received it
    start: float = 0.0  # perf_counter time its first sample was captured (estimated)


class Microphone(_Stream):
    """Blocks of `block_ms` at 24 kHz; `read()` waits for the next one.

    The callback only queues what PortAudio delivers (a copy and the time); converting to
    24 kHz and cutting blocks happen on the reader's thread, so the audio thread never
    waits on anything.
    """

    def __init__(self, device: str | int | None, block_ms: int = 80) -> None:
        super().__init__(device)
        self.block_ms = block_ms
        self.block = MODEL_RATE * block_ms // 1000
        self._raw: queue.SimpleQueue[tuple[np.ndarray, float]] = queue.SimpleQueue()
        self._ready: deque[Block] = deque()
        self.latency = 0.0

    def open(self) -> None:
        sd = sounddevice()
        device = resolve_device(self.spec, "input")
        rate = _device_rate(sd, device, "input")
        self._resample = _Resampler(rate, MODEL_RATE)
        self._carry = np.zeros(0, dtype=np.float32)
        self._raw = queue.SimpleQueue()
        self._ready.clear()
        self._start(
            "input", sd.InputStream, device=device, samplerate=rate,
            blocksize=rate * self.block_ms // 1000,
        )  # fmt: skip
        self.latency = float(self._stream.latency)

    def _callback(self, indata: np.ndarray, frames: int, t: Any, status: Any) -> None:
        self._alive()
        self._raw.put((indata[:, 0].copy(), time.perf_counter()))

    def _cut(self, pcm: np.ndarray, at: float) -> None:
        pcm = self._resample(pcm)
        pcm = np.concatenate([self._carry, pcm]) if len(self._carry) else pcm
        block_s = self.block / MODEL_RATE
        while len(pcm) >= self.block:
            # What is left after this block was captured after it.
            later = (len(pcm) - self.block) / MODEL_RATE
            start = at - self.latency - later - block_s
            self._ready.append(Block(pcm[: self.block], at, start))
            pcm = pcm[self.block :]
        self._carry = pcm

    def _take(self, timeout: float | None) -> None:
        """Convert what the callback queued (waiting up to `timeout` s for something)."""
        while True:
            try:
                if timeout is None:
                    pcm, at = self._raw.get_nowait()
                else:
                    pcm, at = self._raw.get(timeout=timeout)
            except queue.Empty:
                return
            self._cut(pcm, at)
            if timeout is not None and self._ready:
                timeout = None  # a block is ready: take only what is already queued

    def read(self, timeout: float) -> Block | None:
        if not self._ready:
            self._take(timeout)
        return self._ready.popleft() if self._ready else None

    def drain(self) -> list[Block]:
        self._take(None)
        out = list(self._ready)
        self._ready.clear()
        return out


class Speaker(_Stream):
    """Plays queued 24 kHz PCM; writes silence when there is nothing to play.

    Without locks: the callback only pops what `play` appended (deque operations are
    atomic), and `clear` moves to a new generation whose start the callback notices.
    Every block the device was given is also kept with the time it is heard (`played`),
    as the echo canceller's reference.
    """

    def __init__(self, device: str | int | None) -> None:
        super().__init__(device)
        self._frames: deque[tuple[int, np.ndarray]] = deque()
        self._generation = 0
        self._head = np.zeros(0, dtype=np.float32)
        self._head_generation = 0
        self.first_sound_at: float | None = None  # perf_counter of the first audible block
        self.played_samples = 0
        self.played: deque[tuple[float, np.ndarray]] = deque(maxlen=PLAYED_BLOCKS)
        self.latency = 0.0
        self.rate = MODEL_RATE  # until open() finds the device's own
        self._resample = _Resampler(MODEL_RATE, MODEL_RATE)
        # Set while an answer's audio is still coming: running dry then is a gap mid-answer
        # (an underrun), counted once per gap; the wait before its first frame is not.
        self.expecting = False
        self.underruns = 0
        self._sounding = False

    def open(self) -> None:
        sd = sounddevice()
        device = resolve_device(self.spec, "output")
        self.rate = _device_rate(sd, device, "output")
        self._resample = _Resampler(MODEL_RATE, self.rate)
        self._start(
            "output", sd.OutputStream, device=device, samplerate=self.rate,
            blocksize=self.rate // 50, latency="low",
        )  # fmt: skip
        self.latency = float(self._stream.latency)

    def play(self, pcm: np.ndarray) -> None:
        pcm = self._resample(pcm.astype(np.float32, copy=False))
        self._frames.append((self._generation, pcm))

    def clear(self) -> None:
        """Stop at once (barge-in): drop everything not yet handed to the device."""
        self.expecting = False
        self._generation += 1
        self._frames.clear()

    def pending_seconds(self) -> float:
        if self.lost:
            return 0.0
        # list() copies the deque in one step, whatever the callback does meanwhile.
        frames = list(self._frames)
        now = self._generation
        head = len(self._head) if self._head_generation >= now else 0
        return (head + sum(len(f) for g, f in frames if g >= now)) / self.rate

    @property
    def busy(self) -> bool:
        return self.pending_seconds() > 0

    def _callback(self, outdata: np.ndarray, frames: int, t: Any, status: Any) -> None:
        self._alive()
        out = outdata[:, 0]
        filled = 0
        while filled < frames:
            # A frame queued before the last clear() is dropped (generations only grow).
            if self._head_generation < self._generation:
                self._head = self._head[:0]
            if not len(self._head):
                try:
                    self._head_generation, self._head = self._frames.popleft()
                except IndexError:
                    break
                continue
            take = min(frames - filled, len(self._head))
            out[filled : filled + take] = self._head[:take]
            self._head = self._head[take:]
            filled += take
        out[filled:] = 0.0
        if filled == frames:
            self._sounding = True
        elif self._sounding:
            self._sounding = False
            if self.expecting:
                self.underruns += 1
        now = time.perf_counter()
        self.played.append((now + self.latency, out.copy()))
        self.played_samples += filled
        if self.first_sound_at is None and filled and np.abs(out[:filled]).max() > SILENCE_RMS:
            self.first_sound_at = now
