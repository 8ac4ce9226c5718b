"""One answer's speech (`voice.speaking`) on a scripted TTS and speaker: held frames,
the playout buffer, what was heard when cut off, the pace learned."""

from __future__ import annotations

import pytest

from mlx_harmony.voice.playout import LATE_ANSWERS, frames_for_lateness
from mlx_harmony.voice.speaking import AHEAD_SECONDS, SpokenAnswer, Voice
from mlx_harmony.voice.timings import TurnTimings
from tests.support.scripted import Clock, ScriptedSpeaker, ScriptedSynthesizer

WORDS = "one two three four five six seven eight nine ten"


def voice(step_s: float, playout_buffer: bool = True) -> tuple[Voice, Clock, list[str]]:
    clock = Clock()
    notices: list[str] = []
    tts = ScriptedSynthesizer(clock, step_s)
    v = Voice(tts, ScriptedSpeaker(clock), clock, playout_buffer, notices.append)  # type: ignore[arg-type]
    return v, clock, notices


def speak(answer: SpokenAnswer, clock: Clock, tick: float = 0.005) -> None:
    """What the daemon does while the answer is written: TTS steps when wanted, time passing."""
    for _ in range(10_000):
        if answer.speech.done and not answer.waiting and not answer.playing:
            return
        if answer.wants_step():
            answer.step()
        clock.now += tick
    raise AssertionError("the answer never finished")


def test_a_held_answer_makes_a_few_frames_and_plays_nothing_until_confirmed() -> None:
    v, clock, _ = voice(step_s=0.01)
    started = []
    timings = TurnTimings()
    answer = v.answer(timings, clock(), held=True, playing=lambda: started.append(1))
    answer.write(WORDS)
    for _ in range(50):
        if answer.wants_step():
            answer.step()
    assert answer.held is not None
    # The TTS's own start is timed apart from the wait for the confirmation.
    assert timings.first_frame_ms == pytest.approx(10) and timings.first_chunk_ms is None
    clock.now += 0.2
    assert 0 < len(answer.held) * v.tts.frame_seconds <= AHEAD_SECONDS + v.tts.frame_seconds
    assert started == [] and not answer.playing
    held = len(answer.held)
    answer.confirm()
    assert started == [1] and answer.held is None
    assert timings.first_chunk_ms is not None and timings.first_chunk_ms > 200
    assert v.speaker.pending_seconds() == pytest.approx(held * v.tts.frame_seconds)


def test_the_words_the_first_frame_waited_for_are_kept() -> None:
    """The TTS reads ahead of what it says (this one a word, TTS 1.6B about five): the
    timings say how many of the answer's words were written when its first frame was."""
    v, clock, _ = voice(step_s=0.01)
    timings = TurnTimings()
    answer = v.answer(timings, clock(), held=False, playing=lambda: None)
    for word in WORDS.split():
        answer.write(word + " ")
        if answer.wants_step():
            answer.step()
    assert timings.first_frame_ms is not None and timings.first_frame_words == 2


def test_slow_synthesis_is_buffered_until_the_rest_can_play_without_a_gap() -> None:
    """Frames take 1.5 times their length to make: the answer waits for enough of them, then
    plays to its end without running dry; without the buffer it runs dry."""
    for buffered in (True, False):
        v, clock, _ = voice(step_s=0.12, playout_buffer=buffered)
        v.rate_prior = v.tts.frame_seconds / 0.12
        timings = TurnTimings()
        answer = v.answer(timings, clock(), held=False, playing=lambda: None)
        answer.write(WORDS)
        answer.finish()
        speak(answer, clock)
        answer.account()
        if buffered:
            assert timings.underruns == 0 and timings.buffered_frames > 1
        else:
            assert timings.underruns > 0


def test_an_answer_cut_off_keeps_the_words_played() -> None:
    v, clock, _ = voice(step_s=0.001)
    answer = v.answer(TurnTimings(), clock(), held=False, playing=lambda: None)
    answer.write(WORDS)
    answer.finish()
    while answer.wants_step():
        answer.step()
    clock.now += 3 * v.tts.frame_seconds  # three frames, one word each, have played
    assert answer.stop() == "one two three"
    assert not answer.playing


def test_the_pace_of_an_answer_that_ran_dry_is_learned_and_a_tools_pause_is_not() -> None:
    v, clock, notices = voice(step_s=0.1, playout_buffer=False)
    answer = v.answer(TurnTimings(), clock(), held=False, playing=lambda: None)
    answer.write("one two three ")
    answer.tool_call()
    clock.now += 5.0  # the tool runs: silence is expected, not a gap
    answer.tool_result()
    answer.write("four five six seven eight")
    answer.finish()
    speak(answer, clock)
    v.learn(answer)
    assert v.rate_prior < 1  # 0.08 s of audio each 0.1 s, not diluted by the tool's 5 s
    assert v.rate_prior > 0.6
    assert v.tts.adapted == [v.rate_prior] and notices == []  # adapt chose nothing new
    assert v.answer_words[-1] == 8


def test_one_stall_does_not_teach_a_slow_pace() -> None:
    """Synthesis three times faster than playback, but one step stalls for a second
    (a kernel built at the first use of a shape): the speech runs dry there, yet the next
    answer starts at once, and no codebook is cut; a pace that slow all along would."""
    v, clock, _ = voice(step_s=0.025)
    prior = v.rate_prior
    v.tts.stalls[4] = 1.0
    first = v.answer(TurnTimings(), clock(), held=False, playing=lambda: None)
    first.write(WORDS + " " + WORDS)
    first.finish()
    speak(first, clock)
    first.account()
    assert first.timings.underruns > 0
    v.learn(first)
    assert v.rate_prior > 2 and v.tts.adapted == [pytest.approx(v.rate_prior)]
    second = v.answer(TurnTimings(), clock(), held=False, playing=lambda: None)
    second.write(WORDS)
    second.finish()
    speak(second, clock)
    second.account()
    assert second.timings.buffered_frames == 1 and second.timings.underruns == 0
    assert second.timings.jitter_frames == 0  # a one-off stall is not buffered for
    assert prior > v.rate_prior  # the loop's own pace was learned, only the stall left out


def test_a_stall_that_recurs_is_buffered_for_until_it_stops() -> None:
    """Synthesis three times faster than playback, but in every answer one step stalls for
    half a second (another process's turn on the machine): the speech runs dry there in the
    first two answers; from the third the answers start and stay that much further ahead
    and play without a gap, at the pace's own buffer plus the frames the lateness asks
    for; once the stall has stopped recurring the extra buffer goes."""
    v, clock, _ = voice(step_s=0.025)

    def ask(stall: float) -> TurnTimings:
        v.tts.stalls[v.tts.steps + 4] = stall
        answer = v.answer(TurnTimings(), clock(), held=False, playing=lambda: None)
        answer.write(WORDS + " " + WORDS)
        answer.finish()
        speak(answer, clock)
        answer.account()
        v.learn(answer)
        clock.now += 5.0  # the user's next question
        return answer.timings

    first, second, third = ask(0.5), ask(0.5), ask(0.5)
    assert first.underruns == second.underruns == 1 and first.jitter_frames == 0
    # The stalled frame came after the four queued before it had played: 0.3 s late.
    assert 0.25 < first.late_ms / 1000 < 0.35 and second.jitter_frames == 0
    # Against the pace's buffer alone the stall still came as late: it is not forgotten.
    assert third.underruns == 0 and third.late_ms == pytest.approx(first.late_ms)
    assert third.jitter_frames == frames_for_lateness([first.late_ms / 1000] * 2, 0.08) == 5
    assert third.buffered_frames == 1 + third.jitter_frames
    # While an answer is still being written, the loop keeps that much more speech queued
    # before the language model gets a turn.
    assert v.ahead_seconds() == pytest.approx(AHEAD_SECONDS + 5 * v.tts.frame_seconds)
    later = [ask(0.0) for _ in range(LATE_ANSWERS)]
    # Buffered for while two of the last four answers met it.
    assert LATE_ANSWERS == 4 and [t.jitter_frames for t in later] == [5, 5, 5, 0]
    assert later[-1].buffered_frames == 1 and not any(t.underruns for t in later)


def test_a_tools_pause_is_not_a_late_frame() -> None:
    """The answer after a tool's result is timed afresh: the seconds the tool took are
    silence expected, not lateness to buffer the next answers for."""
    v, clock, _ = voice(step_s=0.01)
    answer = v.answer(TurnTimings(), clock(), held=False, playing=lambda: None)
    answer.write("one two three four ")
    while answer.wants_step():  # what can be spoken of it so far, playing
        answer.step()
    assert answer.made == 3 and answer.run_from is not None
    answer.tool_call()
    clock.now += 5.0
    answer.tool_result()
    answer.write("five six seven eight")
    answer.finish()
    speak(answer, clock)
    assert answer.made == 8 and answer.late < v.tts.frame_seconds


@pytest.mark.parametrize("made_ahead", [False, True], ids=["one-thread", "own-thread"])
def test_a_frame_that_comes_after_the_speaker_ran_dry_is_late(made_ahead: bool) -> None:
    """The loop busy with the engine for half a second: the speaker runs dry before the
    next frame is taken, and the loop sees that first (as the daemon drives it:
    `wants_step`, then `step`). The frame's lateness still counts, made then or (the TTS
    on its own thread) long before: what counts is when the speaker could have it."""
    v, clock, _ = voice(step_s=0.01)
    answer = v.answer(TurnTimings(), clock(), held=False, playing=lambda: None)
    answer.write(WORDS)
    answer.finish()
    answer.step()  # the first frame plays: the others are due a frame apart from here
    if made_ahead:
        take = answer.speech.take

        def made_earlier(clock_fn):
            frame, took, made_at = take(clock_fn)
            return frame, took, made_at - 0.5  # made long before the loop came to take it

        answer.speech.take = made_earlier  # type: ignore[method-assign]
    clock.now += 0.5  # an engine step
    assert answer.wants_step()  # sees the speaker dry: the answer buffers again
    answer.step()
    assert answer.late == pytest.approx(0.5 + 0.01 - v.tts.frame_seconds)
    # The rest is timed afresh from where it plays again: no later frame is that late.
    late = answer.late
    speak(answer, clock)
    answer.account()
    assert answer.timings.underruns == 1 and answer.late == late
