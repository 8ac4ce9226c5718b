"""Endpointing: when an utterance starts and ends.

`Endpointer` is an immutable state machine over per-block speech decisions (quiet →
speaking → ended), so its timing rules are testable without audio. The decisions come from a
detector: block energy, or the Silero VAD model (`voice.silero`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from mlx_harmony.voice.config import EndpointingSection

Detector = Callable[[np.ndarray], bool]


@dataclass(frozen=True)
class SpeechStarted:
    blocks_back: int  # how many blocks ago the speech began (the hits before the decision)


@dataclass(frozen=True)
class SpeechEnded:
    reason: Literal["silence", "max_length"]
    speech_ms: int
    silence_ms: int = 0  # the utterance's trailing silence (already in its audio)


@dataclass(frozen=True)
class SpeechDropped:
    """An utterance too short to be one (a cough, a click)."""

    speech_ms: int


VadEvent = SpeechStarted | SpeechEnded | SpeechDropped


@dataclass(frozen=True)
class Endpointer:
    """Immutable: `update` returns the next endpointer with the event, if any."""

    p: EndpointingSection
    block_ms: int
    warmup: int = 0
    speaking: bool = False
    hits: int = 0
    speech_blocks: int = 0
    silent_blocks: int = 0
    blocks: int = 0

    @classmethod
    def new(cls, params: EndpointingSection, block_ms: int, warmup: bool = True) -> Endpointer:
        return cls(params, block_ms, warmup=params.warmup_blocks if warmup else 0)

    def reset(self, warmup: bool = False) -> Endpointer:
        return Endpointer.new(self.p, self.block_ms, warmup)

    def started(self, blocks: int) -> Endpointer:
        """As if the start of an utterance had just been decided, `blocks` blocks ago
        (a barge-in or a talk key hands the utterance over already begun)."""
        return replace(self.reset(), speaking=True, speech_blocks=blocks, blocks=blocks)

    def update(self, is_speech: bool) -> tuple[Endpointer, VadEvent | None]:
        if self.warmup > 0:
            return replace(self, warmup=self.warmup - 1), None
        if not self.speaking:
            hits = self.hits + 1 if is_speech else 0
            if hits >= self.p.hits:
                return self.started(hits), SpeechStarted(blocks_back=hits)
            return replace(self, hits=hits), None
        blocks = self.blocks + 1
        speech = self.speech_blocks + is_speech
        silent = 0 if is_speech else self.silent_blocks + 1
        speech_ms = speech * self.block_ms
        if silent * self.block_ms >= self.p.silence_ms:
            if speech_ms < self.p.min_speech_ms:
                return self.reset(), SpeechDropped(speech_ms)
            return self.reset(), SpeechEnded("silence", speech_ms, silent * self.block_ms)
        if blocks * self.block_ms >= self.p.max_utterance_s * 1000:
            return self.reset(), SpeechEnded("max_length", speech_ms, silent * self.block_ms)
        return replace(self, blocks=blocks, speech_blocks=speech, silent_blocks=silent), None


def rms(block: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(block, dtype=np.float64)))) if block.size else 0.0


def energy_detector(threshold: float) -> Detector:
    return lambda block: rms(block) > threshold


def make_detector(params: EndpointingSection, sample_rate: int) -> Detector:
    if params.detector == "silero":
        from mlx_harmony.voice.silero import SileroDetector

        silero = SileroDetector.load(sample_rate, params.speech_threshold)
        loud = energy_detector(params.energy_threshold)
        # Silero hears speech at any level, so a TV far away is "speech" too: it decides
        # only on blocks loud enough to be someone talking to the microphone (measured
        # in `python -m mlx_harmony.bench.endpointing`). It runs on every block to keep its state.
        return lambda block: silero(block) and loud(block)
    return energy_detector(params.energy_threshold)
