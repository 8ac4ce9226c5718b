"""Endpointing: when an utterance starts and ends.

`Endpointer` is a pure state machine over per-block speech decisions (quiet → speaking →
ended), so its timing rules are testable without audio. The decisions come from a
detector: block energy, or the Silero VAD model (`voice.silero`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from voice.config import EndpointingSection

Detector = Callable[[np.ndarray], bool]


@dataclass(frozen=True)
class SpeechStarted:
    blocks_back: int  # how many blocks ago the speech began (the hits before the decision)


@dataclass(frozen=True)
class SpeechEnded:
    reason: Literal["silence", "max_length"]
    speech_ms: int


@dataclass(frozen=True)
class SpeechDropped:
    """An utterance too short to be one (a cough, a click)."""

    speech_ms: int


VadEvent = SpeechStarted | SpeechEnded | SpeechDropped


class Endpointer:
    def __init__(self, params: EndpointingSection, block_ms: int) -> None:
        self.p, self.block_ms = params, block_ms
        self.reset()

    def reset(self, warmup: bool = True) -> None:
        self.speaking = False
        self._warmup = self.p.warmup_blocks if warmup else 0
        self._hits = 0
        self._speech_blocks = 0
        self._silent_blocks = 0
        self._blocks = 0

    def update(self, is_speech: bool) -> VadEvent | None:
        if self._warmup > 0:
            self._warmup -= 1
            return None
        if not self.speaking:
            self._hits = self._hits + 1 if is_speech else 0
            if self._hits >= self.p.hits:
                self.speaking = True
                self._speech_blocks = self._blocks = self._hits
                self._silent_blocks = 0
                return SpeechStarted(blocks_back=self._hits)
            return None
        self._blocks += 1
        if is_speech:
            self._speech_blocks += 1
            self._silent_blocks = 0
        else:
            self._silent_blocks += 1
        speech_ms = self._speech_blocks * self.block_ms
        if self._silent_blocks * self.block_ms >= self.p.silence_ms:
            self.reset(warmup=False)
            if speech_ms < self.p.min_speech_ms:
                return SpeechDropped(speech_ms)
            return SpeechEnded("silence", speech_ms)
        if self._blocks * self.block_ms >= self.p.max_utterance_s * 1000:
            self.reset(warmup=False)
            return SpeechEnded("max_length", speech_ms)
        return None


def rms(block: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(block, dtype=np.float64)))) if block.size else 0.0


def energy_detector(threshold: float) -> Detector:
    return lambda block: rms(block) > threshold


def make_detector(params: EndpointingSection, sample_rate: int) -> Detector:
    if params.detector == "silero":
        from voice.silero import SileroDetector

        return SileroDetector.load(sample_rate, params.speech_threshold)
    return energy_detector(params.energy_threshold)
