"""When the client's user starts and stops speaking: the audio a Realtime client appends
is cut into the daemon's blocks and judged by the same detector and endpointer, with the
session's `turn_detection` in place of the config where it says otherwise.

- `server_vad`: the silence rule (`silence_duration_ms`, else `endpointing.silence_ms`).
- `semantic_vad`: the turn ends when the pause sounds final to the turn model (Smart
  Turn, where `endpointing.turn_model` names one), fused with the transcript's last word
  as the daemon does (`voice.turn_policy`); without a turn model, by the silence rule
  unless the words so far stop on a word that cannot end a sentence ("and", "the", "um"),
  which holds the turn up to the longest wait (`eagerness` sets it, as OpenAI's does).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mlx_harmony.voice.config import EndpointingSection
from mlx_harmony.voice.realtime.protocol import RATE, TurnDetection
from mlx_harmony.voice.turn_policy import Fusion, Policy, ends_unfinished
from mlx_harmony.voice.turn_scorer import TurnScorer
from mlx_harmony.voice.vad import Detector, Endpointer, SpeechDropped, SpeechEnded, SpeechStarted

# The longest pause semantic_vad waits for, by eagerness (OpenAI's: 8 s, 4 s, 2 s).
MAX_WAIT_S = {"low": 8.0, "medium": 4.0, "high": 2.0}


@dataclass(frozen=True)
class Started:
    at_ms: int  # from the start of the session's input audio
    preroll: np.ndarray  # the utterance's audio up to now, its padding before it included


@dataclass(frozen=True)
class Speech:
    pcm: np.ndarray  # more of the utterance


@dataclass(frozen=True)
class Ended:
    at_ms: int
    silence_s: float  # trailing silence already in the utterance's audio


@dataclass(frozen=True)
class Dropped:
    """Too short to be an utterance (a cough, a click): nothing is committed."""


ListenEvent = Started | Speech | Ended | Dropped


class Listener:
    def __init__(
        self,
        endpointing: EndpointingSection,
        block_ms: int,
        detection: TurnDetection,
        detector: Detector,
        scorer: TurnScorer | None = None,
    ) -> None:
        self.block_ms, self.detector, self.scorer = block_ms, detector, scorer
        self.block = RATE * block_ms // 1000
        self.semantic = detection.type == "semantic_vad"
        silence_ms = detection.silence_duration_ms or endpointing.silence_ms
        max_wait_s = MAX_WAIT_S.get(detection.eagerness, endpointing.max_wait_ms / 1000)
        self.silence_s = silence_ms / 1000
        self.policy = Policy(endpointing.end_threshold, endpointing.min_wait_ms / 1000, max_wait_s)
        self.fusion = Fusion()
        # Semantic: the endpointer itself ends a turn only at the longest wait.
        ends_at = round(max_wait_s * 1000) if self.semantic else silence_ms
        rule = endpointing.model_copy(update={"silence_ms": ends_at})
        self.endpointer = Endpointer.new(rule, block_ms, warmup=False)
        padding = detection.prefix_padding_ms
        pad_blocks = math.ceil(padding / block_ms) if padding is not None else 2
        self.preroll: deque[np.ndarray] = deque(maxlen=endpointing.hits + pad_blocks)
        self._rest = np.zeros(0, dtype=np.float32)
        self.blocks = 0
        self._acoustic: float | None = None

    @property
    def speaking(self) -> bool:
        return self.endpointer.speaking

    def feed(self, pcm: np.ndarray, transcript: Callable[[], str]) -> list[ListenEvent]:
        """Judge appended audio block by block; `transcript` gives the words heard so far."""
        pcm = np.concatenate([self._rest, pcm])
        events: list[ListenEvent] = []
        while len(pcm) >= self.block:
            events += self._block(pcm[: self.block], transcript)
            pcm = pcm[self.block :]
        self._rest = pcm
        return events

    def reset(self) -> None:
        self.endpointer = self.endpointer.reset()
        self.preroll.clear()
        self._rest = np.zeros(0, dtype=np.float32)

    def _block(self, block: np.ndarray, transcript: Callable[[], str]) -> list[ListenEvent]:
        self.blocks += 1
        self.preroll.append(block)
        was_speaking = self.speaking
        self.endpointer, vad = self.endpointer.update(self.detector(block))
        if isinstance(vad, SpeechStarted):
            audio = np.concatenate(list(self.preroll))
            self._acoustic = None
            if self.scorer is not None:
                self.scorer.start(list(self.preroll))
            return [Started(self._ms(len(audio) // self.block), audio)]
        if isinstance(vad, SpeechEnded):
            return [Speech(block), Ended(self._ms(0), vad.silence_ms / 1000)]
        if isinstance(vad, SpeechDropped):
            return [Dropped()]
        if not was_speaking:
            return []
        if self.scorer is not None:
            self.scorer.add(block)
        silence_s = self.endpointer.silent_blocks * self.block_ms / 1000
        if silence_s == 0:
            self._acoustic = None  # a score of the last pause says nothing of the next
        if silence_s > 0 and self._done(silence_s, transcript()):
            self.endpointer = self.endpointer.reset()
            return [Speech(block), Ended(self._ms(0), silence_s)]
        return [Speech(block)]

    def _done(self, silence_s: float, words: str) -> bool:
        if not self.semantic:
            return False  # the endpointer's silence rule
        if self.scorer is None:
            held = ends_unfinished(words, self.fusion.hold_words)
            return silence_s >= self.silence_s and not held
        if silence_s >= self.policy.min_wait_s:
            self.scorer.request(silence_s)
        for _, p in self.scorer.results():
            self._acoustic = p
        fused = self.fusion.probability(self._acoustic, None, words)
        return self.policy.decide(silence_s, fused)

    def _ms(self, blocks_back: int) -> int:
        return (self.blocks - blocks_back) * self.block_ms
