"""The hearing half of the voice loop: an utterance through the STT while the user speaks,
the words heard so far prefilled into the chat model, the turn model and the chat model
asked whether the user is done, and the transcript taken at the end (or early, at a pause,
with the stream going on).

It carries out the turn rules' hearing actions (`voice.turns`: StartHearing, Feed,
Prefill, ScoreEnd, ScoreText, FinishHearing, PeekHearing, DropHearing) for the daemon
(`voice.daemon`), on the daemon's one loop thread; what it learns goes back as the rules'
events. It holds no turn rule and knows nothing of answers or the speaker."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from mlx_harmony.llm.backends import ChatEngine
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.errors import HarmonyError
from mlx_harmony.voice.stt import Transcriber
from mlx_harmony.voice.timings import TurnTimings
from mlx_harmony.voice.turn_scorer import TurnScorer
from mlx_harmony.voice.turns import Event, Pause, TextScore, Words

# Tokens prefilled per pass of the loop while listening: the microphone is drained between
# chunks, so a long conversation's prefill never holds up the end of speech or a barge-in.
PREFILL_CHUNK = 512


class Hearing:
    def __init__(
        self,
        stt: Transcriber,
        engine: ChatEngine,
        scorer: TurnScorer | None,
        clock: Callable[[], float],
    ) -> None:
        self.stt, self.engine, self.scorer, self.clock = stt, engine, scorer, clock
        self.timings = TurnTimings()  # of the utterance last transcribed
        self._unfed: list[np.ndarray] = []  # blocks the STT takes later (`turns.Feed`)
        self._prefilling: Iterator[int] | None = None  # the words heard so far, being fed
        self._text_to_score: str | None = None  # a text signal asked while the feed ran
        self._frames_at_start = 0

    def start(self, preroll: list[np.ndarray]) -> list[Event]:
        """A new utterance, from the blocks heard just before the detector fired."""
        self.stt.start()
        self._unfed.clear()
        self._frames_at_start = self.stt.frames_fed
        if self.scorer is not None:
            self.scorer.start(preroll)
        new = [self.stt.feed(pcm) for pcm in preroll]
        return [Words(self.stt.text)] if any(new) else []

    def feed(self, audio: np.ndarray, later: bool) -> list[Event]:
        """One block of the utterance (`later`: it may wait, see `turns.Feed`); the words
        and the pause prediction it gave."""
        if not (self.stt.active and self.stt.room > 0):
            return []
        if self.scorer is not None:
            self.scorer.add(audio)
        if later:
            self._unfed.append(audio)
            return []
        pieces = [self.stt.feed(pcm) for pcm in [*self._unfed, audio]]
        self._unfed.clear()
        heard: list[Event] = [Words(self.stt.text)] if any(pieces) else []
        if self.stt.pause is not None:
            heard.append(Pause(self.stt.pause))
        return heard

    def drop(self) -> None:
        """The utterance ends unanswered, or its transcript was taken early."""
        self._unfed.clear()
        if self.stt.active:
            self.stt.stop()

    def finish(self, silence_s: float, speech_end: float, peek: bool = False) -> str:
        """The transcript: flushed past the `silence_s` already heard, the stream ended —
        or, with `peek`, left going on as if not asked. Timed from `speech_end`."""
        frames_while_speaking = self.stt.frames_fed - self._frames_at_start
        endpointed = self.clock()
        text = self.stt.peek(silence_s) if peek else self.stt.finish(silence_s)
        transcribed = self.clock()
        self.timings = TurnTimings(
            endpoint_ms=(endpointed - speech_end) * 1000,
            head_start_ms=(endpointed - speech_end) * 1000 if peek else None,
            transcript_ms=(transcribed - speech_end) * 1000,
            stt_frames_while_speaking=frames_while_speaking,
        )
        return text

    # ------------------------------------------------------------------ the chat model
    def prefill(self, conversation: Conversation) -> None:
        """While the user speaks, prefill the conversation up to the words already heard,
        so that at the end of speech only the last words are left to prefill. Fed a chunk
        per pass of the loop (`prefill_step`); newer words replace an unfinished feed."""
        self._prefilling = self.engine.prefill_steps(conversation, step=PREFILL_CHUNK)
        self.prefill_step()

    @property
    def prefilling(self) -> bool:
        return self._prefilling is not None

    def prefill_step(self) -> None:
        if self._prefilling is None:
            return
        try:
            next(self._prefilling)
        except StopIteration:
            self._prefilling = None
        except HarmonyError:
            # A rendering problem is reported by the real turn; here it only means no
            # head start.
            self._prefilling = None

    def stop_prefill(self) -> None:
        """A turn starts: its own prefill feeds whatever is left."""
        self._prefilling = None

    def score_text(self, text: str, conversation: Conversation, busy: bool) -> list[Event]:
        """The chat model's end-of-message probability after `text`, once the prefill has
        caught up (only the last words are then left to run through the model): now, or
        when the feed under way ends (`text_to_score`). Never while a turn runs (`busy`):
        the engine's cache is then the turn's."""
        if busy:
            self._text_to_score = None
            return []
        if self._prefilling is not None:
            self._text_to_score = text
            return []
        self._text_to_score = None
        try:
            p = self.engine.end_of_turn_probability(conversation)
        except HarmonyError:
            return []
        return [] if p is None else [TextScore(p, text)]

    @property
    def text_to_score(self) -> str | None:
        """A text signal asked while the prefill ran, to be scored once it is done."""
        return self._text_to_score
