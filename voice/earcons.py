"""Short tones that tell the user the assistant started or stopped listening.

Made here rather than shipped as files: two soft notes with faded edges (a click-free
start and end), rising when it starts listening and falling when it has what it needs.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from mlx_harmony.voice.audio_io import MODEL_RATE

NOTE_S = 0.07
FADE_S = 0.01
NOTES = {"listening": (660.0, 880.0), "done": (880.0, 660.0)}


def _note(freq: float, volume: float) -> np.ndarray:
    t = np.arange(int(NOTE_S * MODEL_RATE)) / MODEL_RATE
    tone = np.sin(2 * np.pi * freq * t) * volume
    fade = int(FADE_S * MODEL_RATE)
    ramp = np.linspace(0.0, 1.0, fade)
    tone[:fade] *= ramp
    tone[-fade:] *= ramp[::-1]
    return tone.astype(np.float32)


class Earcons:
    def __init__(self, volume: float) -> None:
        self._tones = {
            kind: np.concatenate([_note(f, volume) for f in freqs]) for kind, freqs in NOTES.items()
        }

    def tone(self, kind: Literal["listening", "done"]) -> np.ndarray:
        return self._tones[kind]
