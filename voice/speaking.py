"""An answer's speech: text in as the model writes it, frames out to the speaker.

The daemon's answering half. `Voice` is the assistant's voice across answers (the TTS, the
speaker, and the pace and answer length the last answers showed); `SpokenAnswer` is one
answer's speech: its TTS session, the frames held while a speculative answer waits to be
confirmed, and the playout buffer that holds frames back until the rest of the answer can
play without a gap (`voice.playout`). The daemon decides between engine and TTS steps with
`wants_step` and reports what it saw; nothing here knows of turns, the engine or the log.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable

import numpy as np

from mlx_harmony.voice.audio_io import MODEL_RATE, Speaker
from mlx_harmony.voice.playout import (
    LATE_ANSWERS,
    RATE_MARGIN,
    frames_for_lateness,
    frames_to_buffer,
)
from mlx_harmony.voice.speakable import SpeakableStream
from mlx_harmony.voice.synthesis import TextToSpeech
from mlx_harmony.voice.timings import TurnTimings

# Speech to have queued on the speaker before text generation gets a turn again.
AHEAD_SECONDS = 0.3
# Words an answer still to be written is expected to have, before any was spoken; then the
# mean of the last answers (only matters where speech is synthesized slower than it plays).
ANSWER_WORDS_PRIOR = 25
# Audio frames of an answer before their own pace counts in the playout decision; once the
# answer has run dry the start-up figure is known to be wrong, and two frames are enough.
LIVE_RATE_FRAMES = 4
LIVE_RATE_FRAMES_AFTER_GAP = 2
# A TTS step this many times longer than the measured frame is a stall (a kernel built at
# the first use of a shape, the machine busy elsewhere), not the pace synthesis keeps: its
# excess is left out of the answer's pace, so one stall does not make every later answer
# wait for a buffer.
STALL_FACTOR = 4


class Voice:
    """The TTS and the speaker, and what the answers spoken so far taught about them."""

    def __init__(
        self,
        tts: TextToSpeech,
        speaker: Speaker,
        clock: Callable[[], float],
        playout_buffer: bool,
        notice: Callable[[str], None],
    ) -> None:
        self.tts, self.speaker, self.clock = tts, speaker, clock
        self.playout_buffer = playout_buffer
        self.notice = notice
        self.answer_words: deque[int] = deque([ANSWER_WORDS_PRIOR], maxlen=8)
        self.rate_prior = tts.speed.rate if tts.speed is not None else float("inf")
        # How late each of the last answers' latest frame came (`voice.playout`).
        self.late: deque[float] = deque(maxlen=LATE_ANSWERS)

    def jitter_frames(self) -> int:
        """Frames an answer holds back, beyond its pace's buffer, for the stalls the last
        answers met."""
        return frames_for_lateness(self.late, self.tts.frame_seconds)

    def ahead_seconds(self) -> float:
        """Speech to keep queued before the engine gets a turn: more by the stalls the last
        answers met, which drained what was queued and then came that late."""
        return AHEAD_SECONDS + self.jitter_frames() * self.tts.frame_seconds

    def answer(
        self, timings: TurnTimings, started_at: float, held: bool, playing: Callable[[], None]
    ) -> SpokenAnswer:
        """One answer's speech; `held`: a speculative answer whose frames wait for
        `confirm`; `playing` is called when its first frame goes to the speaker."""
        return SpokenAnswer(self, timings, started_at, held, playing)

    def expected_words(self) -> int:
        return round(statistics.mean(self.answer_words))

    def learn(self, answer: SpokenAnswer) -> None:
        """After an answer: its length, and where it ran dry mid-way the pace the whole
        loop gave the TTS. The next answers are buffered for that pace, and where the
        codebooks were chosen for this machine fewer are kept until it has the margin."""
        if answer.words:
            self.answer_words.append(answer.words)
        rate = answer.live_rate()
        gaps = self.speaker.underruns - answer.underruns_base
        if answer.timings.text_gaps == 0 and (rate is None or rate >= 1):
            # Late frames from a pace that keeps up are stalls: buffered for from now on.
            # (Where the pace falls short, the pace itself is learned below; where the
            # words ran out, more buffer for the speech would not have helped.)
            self.late.append(answer.late)
        if rate is None or gaps == 0:
            return
        self.rate_prior = rate
        if answer.timings.text_gaps >= gaps:
            # The speech waited for words, not for synthesis: the next answers are buffered
            # for that pace, but fewer codebooks would cost quality and gain nothing.
            return
        before = self.tts.speed
        after = self.tts.adapt(rate)
        if before is not None and after is not None:
            # What the loop added to each frame is taken to stay: the frame measured with
            # the codebooks kept, plus that.
            added = max(0.0, self.tts.frame_seconds / rate - before.frame_seconds)
            self.rate_prior = self.tts.frame_seconds / (after.frame_seconds + added)
            self.notice(
                f"text to speech ran at {rate:.2f}x real time in the answers: "
                f"now {after.describe()}"
            )


class SpokenAnswer:
    """One answer's speech, from its first written word to its last played frame."""

    def __init__(
        self,
        voice: Voice,
        timings: TurnTimings,
        started_at: float,
        held: bool,
        playing: Callable[[], None],
    ) -> None:
        self.voice, self.timings, self.started_at = voice, timings, started_at
        self.speech = voice.tts.session()
        self.text = SpeakableStream()
        self.answer = ""  # written so far (a tool's notice is not part of it)
        self.written = False  # the engine has nothing more to say
        self._playing = playing
        speaker = voice.speaker
        self.played_base = speaker.played_samples
        self.underruns_base = self.underruns_seen = speaker.underruns
        speaker.first_sound_at = None
        # Until confirmed, frames are held (within AHEAD_SECONDS) instead of played.
        self.held: list[np.ndarray] | None = [] if held else None
        # Frames synthesized but not yet given to the speaker: the playout buffer, filled
        # until the answer can play to its end without a gap, and again after a gap.
        self.waiting: list[np.ndarray] = []
        self.buffering = True
        # The pace synthesis keeps: frames made since the answer started or went on after
        # a tool (whose run is a pause, not slowness), when the first of them was, the last.
        self.frames = 0
        self.first_frame_at: float | None = None
        self.last_frame_at: float | None = None
        self.stalled = 0.0  # seconds of stalls (beyond a frame's time) since first_frame_at
        # Lateness is measured against the playback the pace's buffer alone would give
        # (its extra frames for stalls left out, or a stall they cover would be forgotten):
        # from `run_from`, when the pace's buffer was full and its first frame was the
        # answer's `run_first`-th, frame i is due at run_from + (i - run_first) frames.
        # `late` is the most any frame was taken after that.
        self.made = 0
        self.run_from: float | None = None
        self.run_first = 0
        self.late = 0.0
        self.rebuffered = False  # ran dry: the schedule restarts after the next frame
        self.at_tool = False  # between a tool call and its result: silence is expected
        # Since the loop last looked: the speech wanted its next frame and had no word.
        self.starved = False

    @property
    def words(self) -> int:
        return len(self.answer.split())

    # ------------------------------------------------------------------ text in
    def write(self, text: str) -> None:
        """A piece of the answer, as the model writes it."""
        self.answer += text
        self._push(self.text.push(text))

    def say(self, text: str) -> None:
        """Words that are not the model's answer (a tool's notice, a text to speak)."""
        self._push(self.text.flush() + self.text.push(text))

    def finish(self) -> None:
        """Nothing more will be written."""
        self.written = True
        self._push(self.text.flush())
        self.speech.close()

    def _push(self, words: str) -> None:
        if words:
            self.speech.push(words)

    def tool_call(self) -> None:
        """A tool runs: the silence until its result is expected, not a gap."""
        self.at_tool = True
        self.voice.speaker.expecting = False

    def tool_result(self) -> None:
        """The rest of the answer starts afresh: buffered for the pace, timed from here."""
        self.at_tool, self.buffering, self.run_from, self.rebuffered = False, True, None, False
        self.frames, self.first_frame_at, self.stalled = 0, None, 0.0

    # ------------------------------------------------------------------ frames out
    def wants_step(self) -> bool:
        """Whether a TTS step should run now rather than an engine step: too little
        speech is queued, the answer fills its playout buffer (as fast as synthesis
        can, unless held: held audio stays within AHEAD_SECONDS until confirmed), or a
        frame is already made."""
        frame_s = self.voice.tts.frame_seconds
        if self.held is not None:
            ahead = len(self.held) * frame_s
        else:
            ahead = len(self.waiting) * frame_s + self.voice.speaker.pending_seconds()
            if self._ran_dry():
                # A gap: hold back again until the rest can play, timed afresh once the
                # frame it waited for has come and its lateness been counted (the loop
                # finds the speaker dry before it takes the frame that came too late).
                self.buffering = self.rebuffered = True
        ready = self.speech.ready
        enough = self.voice.ahead_seconds()
        if self.speech.wants_text and ahead < enough and not self.written:
            self.starved = True
        # Frames already made (the TTS on its own thread) go to the speaker at once: a long
        # pass of the loop (an engine step) then never leaves it without them.
        made = self.speech.frames_made > 0
        fill = self.held is None and (self.written or self.buffering or made)
        return ready and (ahead < enough or fill)

    def step(self) -> None:
        """One TTS frame (with the TTS on a thread of its own: every frame made that is
        wanted now, so a slow pass of the loop does not slow the speech), held, buffered
        or played."""
        self._take()
        while self.speech.frames_made and self.wants_step():
            self._take()

    def _take(self) -> None:
        frame, took, made_at = self.speech.take(self.voice.clock)
        self.timings.slowest_tts_step_ms = max(self.timings.slowest_tts_step_ms, took * 1000)
        speed = self.voice.tts.speed
        usual = speed.frame_seconds if speed is not None else self.voice.tts.frame_seconds
        if self.first_frame_at is not None and took > STALL_FACTOR * usual:
            self.stalled += took - usual
        if frame is not None:
            if self.run_from is not None:
                # Taken now, not made: with the TTS on its own thread a frame made in time
                # but taken late (the loop busy with the engine) is just as late to play.
                frame_s = self.voice.tts.frame_seconds
                due = self.run_from + (self.made - self.run_first) * frame_s
                self.late = max(self.late, self.voice.clock() - due)
            if self.rebuffered:
                self.run_from, self.rebuffered = None, False
            self.made += 1
            self.frames += 1
            self.last_frame_at = made_at
            if self.timings.first_frame_ms is None:
                self.timings.first_frame_ms = (self.last_frame_at - self.started_at) * 1000
                self.timings.first_frame_words = self.words
            if self.first_frame_at is None:
                self.first_frame_at = self.last_frame_at
            (self.held if self.held is not None else self.waiting).append(frame)
        if self.held is None:
            self._release()

    def confirm(self) -> None:
        """The speculative answer is the answer: what was held plays at once."""
        assert self.held is not None
        held, self.held = self.held, None
        self.voice.speaker.first_sound_at = None  # an earcon may have played since the start
        # Synthesis stood still while the frames were held: its pace counts from here.
        self.frames, self.first_frame_at, self.stalled = 0, None, 0.0
        self.waiting += held
        self._release()

    @property
    def playing(self) -> bool:
        return self.voice.speaker.busy

    @property
    def synthesizing(self) -> bool:
        """Frames are still to come (on a TTS thread of its own: perhaps being made)."""
        return not self.speech.done

    def end(self) -> None:
        """The answer is dropped unheard: its synthesis stops."""
        self.speech.end()

    def wait(self, seconds: float) -> None:
        """Until the TTS's own thread has made a frame, or at most `seconds`."""
        self.speech.wait(seconds)

    def stop(self) -> str:
        """Silence now; the words of the answer the user heard."""
        speaker = self.voice.speaker
        played = speaker.played_samples - self.played_base
        speaker.clear()
        # The session counts at the model's rate.
        return self.speech.heard(
            played * MODEL_RATE // speaker.rate // self.voice.tts.frame_samples
        )

    def account(self) -> None:
        """Write when the answer was first heard, how often it ran dry and how late its
        latest frame came."""
        speaker = self.voice.speaker
        if speaker.first_sound_at is not None:
            heard_at = speaker.first_sound_at + speaker.latency
            self.timings.first_audio_ms = (heard_at - self.started_at) * 1000
        self.timings.underruns = speaker.underruns - self.underruns_base
        self.timings.late_ms = self.late * 1000

    def live_rate(self) -> float | None:
        """Synthesis speed (audio seconds per second) this answer kept: what the whole
        loop gives the TTS, not the TTS alone, stalls left out (`STALL_FACTOR`)."""
        ran_dry = self.voice.speaker.underruns > self.underruns_base
        enough = LIVE_RATE_FRAMES_AFTER_GAP if ran_dry else LIVE_RATE_FRAMES
        if self.frames < enough or self.first_frame_at is None:
            return None
        assert self.last_frame_at is not None
        took = self.last_frame_at - self.first_frame_at - self.stalled
        return (self.frames - 1) * self.voice.tts.frame_seconds / took if took > 0 else None

    def _release(self) -> None:
        """Give the speaker what the playout buffer may let go of now."""
        if self.buffering and self.waiting and self._can_play_through():
            self.buffering = False
        if not self.buffering:
            for frame in self.waiting:
                self._play(frame)
            self.waiting.clear()
        if self.speech.done and not self.waiting:
            self.voice.speaker.expecting = False  # what runs dry from here on is the end

    def _can_play_through(self) -> bool:
        """Whether the frames in hand cover what the rest of the answer will fall behind
        by, at the speed synthesis runs here (`voice.playout`)."""
        if self.speech.done or not self.voice.playout_buffer:
            return True
        live = self.live_rate()
        rate = live if live is not None else self.voice.rate_prior
        total = len(self.waiting) + self.speech.frames_left() + self._unwritten_frames()
        jitter = self.voice.jitter_frames()
        pace = frames_to_buffer(rate / RATE_MARGIN, total)
        if self.run_from is None and len(self.waiting) >= pace:
            self.run_from, self.run_first = self.voice.clock(), self.made - len(self.waiting)
        if len(self.waiting) < min(total, pace + jitter):
            return False
        if not self.timings.buffered_frames:  # the answer's first start, not a re-buffer
            self.timings.buffered_frames = len(self.waiting)
            self.timings.predicted_frames = total
            self.timings.tts_rate = rate
            self.timings.jitter_frames = jitter
        return True

    def _unwritten_frames(self) -> int:
        """Frames the part of the answer not written yet is expected to take."""
        if self.written:
            return 0
        return self.speech.frames_for_words(max(0, self.voice.expected_words() - self.words))

    def _ran_dry(self) -> bool:
        """The answer was playing and the speaker ran out, with more to come: it has
        nothing left now, or it counted a gap since the last look (a step slower than a
        frame lets it run dry and refills it before the loop looks again)."""
        speaker = self.voice.speaker
        new_gap = speaker.underruns > self.underruns_seen
        self.underruns_seen = speaker.underruns
        if new_gap and self.starved:
            self.timings.text_gaps += 1
        self.starved = False
        if self.buffering or self.speech.done:
            return False
        return new_gap or speaker.pending_seconds() == 0

    def _play(self, frame: np.ndarray) -> None:
        speaker = self.voice.speaker
        speaker.expecting = not self.at_tool
        speaker.play(frame)
        if self.timings.first_chunk_ms is None:
            self.timings.first_chunk_ms = (self.voice.clock() - self.started_at) * 1000
            self._playing()
