"""What the assistant speaks with: either TTS backend, behind one interface.

`tts.backend` "kyutai" is Kyutai TTS 1.6B (`voice.tts`: words pushed one by one, the best
sound where a GPU keeps up with its codebooks); "pocket" is Kyutai Pocket TTS
(`voice.pocket_tts`: a frame in a quarter of the time, a voice cloned from a WAV file).
The daemon, the servers and the benchmarks know only the two protocols here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.voice.config import TtsSection
from mlx_harmony.voice.tts_speed import TtsSpeed


class SpeechStream(Protocol):
    """One answer's speech: text pushed as it is written, 80 ms frames stepped out."""

    @property
    def ready(self) -> bool:
        """A step now gives audio or progress, not a wait for more text."""
        ...

    @property
    def done(self) -> bool: ...

    def push(self, text: str) -> None: ...

    def close(self) -> None: ...

    def step(self) -> np.ndarray | None: ...

    def frames_left(self) -> int:
        """About how many more frames the text pushed so far makes."""
        ...

    def frames_for_words(self, words: int) -> int: ...

    def heard(self, frames_played: int) -> str:
        """The words whose audio was among the first `frames_played` frames."""
        ...

    @property
    def wants_text(self) -> bool:
        """No frame comes until more of the answer is written (or the text closed)."""
        ...

    @property
    def frames_made(self) -> int:
        """Frames already made that a take hands over at once."""
        ...

    def take(self, clock: Callable[[], float]) -> tuple[np.ndarray | None, float, float]:
        """The next frame (None: none yet), the seconds synthesis spent on it and when it
        was made (on `clock`)."""
        ...

    def end(self) -> None:
        """Nobody will take more frames: synthesis of this answer stops."""
        ...

    def wait(self, seconds: float) -> None:
        """Until a take has a frame, or at most `seconds`."""
        ...


class SteppedHere:
    """`SpeechStream`'s frame side for a session stepped on the caller's thread: a take is
    one step, timed there (`voice.synthesis_thread` steps a session on a thread of its own
    and answers the same from what its worker made)."""

    ready: bool
    done: bool
    step: Callable[[], np.ndarray | None]
    frames_made = 0  # each take makes its frame

    @property
    def wants_text(self) -> bool:
        return not self.ready and not self.done

    def take(self, clock: Callable[[], float]) -> tuple[np.ndarray | None, float, float]:
        start = clock()
        frame = self.step()
        end = clock()
        return frame, end - start, end

    def end(self) -> None:
        """Nothing runs between steps: nothing to stop."""

    def wait(self, seconds: float) -> None:
        """A take steps the session itself: there is nothing to wait for."""


def spoken_frames(speech: SpeechStream, text: str) -> Iterator[np.ndarray]:
    """The frames of a whole text in a session of its own, made as they are asked for."""
    speech.push(text)
    speech.close()
    while not speech.done:
        frame = speech.step()
        if frame is not None:
            yield frame


class TextToSpeech(Protocol):
    sample_rate: int
    frame_samples: int
    speed: TtsSpeed | None

    @property
    def frame_seconds(self) -> float: ...

    def calibrate(self, auto: bool, floor: int, margin: float) -> TtsSpeed: ...

    def adapt(self, observed_rate: float) -> TtsSpeed | None: ...

    def warmup(self) -> None: ...

    def session(self, batch: bool = True) -> SpeechStream: ...

    def speak(self, text: str) -> Iterator[np.ndarray]: ...


def load_tts(t: TtsSection) -> TextToSpeech:
    """The configured backend, its model and voice loaded (not yet timed)."""
    if t.backend == "pocket":
        from mlx_harmony.voice.pocket_tts import PocketSynthesizer

        return PocketSynthesizer.from_config(t)
    from mlx_harmony.voice.tts import Synthesizer

    return Synthesizer.from_config(t)


def describe_voices(t: TtsSection) -> str:
    """Both backends' voices, as `--list-voices` prints them; the configured backend
    first. A backend whose voices cannot be listed (offline, a hub repo) says why."""
    from mlx_harmony.voice.config import BACKEND_DEFAULTS

    sections = []
    for backend in sorted(BACKEND_DEFAULTS, key=lambda b: b != t.backend):
        model = t.model if backend == t.backend else BACKEND_DEFAULTS[backend][0]
        mark = " (configured)" if backend == t.backend else ""
        if backend == "pocket":
            from mlx_harmony.voice.pocket_tts import list_voices

            head = f"pocket{mark}: Pocket TTS {model}"
            names = list_voices(model)
            tail = [
                "  (all but the model folder's own are Kyutai's catalog, fetched from the hub "
                "when first used)",
                "  or a WAV file of a few seconds of someone speaking: the voice is cloned "
                '(tts.voice = "path/to/voice.wav")',
            ]
        else:
            from mlx_harmony.voice.tts import list_voices as kyutai_voices

            head = f"kyutai{mark}: Kyutai TTS {model}, voices from {t.voice_repo}"
            names, tail = [], []
            if backend != t.backend and not Path(t.voice_repo).expanduser().is_dir():
                # Not asked for: no wait on a hub that may be unreachable.
                tail = ["  (--set tts.backend=kyutai --list-voices lists them)"]
            else:
                try:
                    names = kyutai_voices(t.voice_repo)
                except ConfigError as e:
                    tail = [f"  ({e})"]
        sections.append("\n".join([head, *(f"  {n}" for n in names), *tail]))
    return "\n\n".join(sections)
