"""Speech that never stutters: the TTS speed measured at start, the codebook count chosen
from it, and the playout buffer that holds an answer back on a machine that synthesizes
slower than it plays.

The daemon tests slow the tiny TTS down on purpose (a sleep in every step) and play into
a speaker paced by the clock, as a sound card consumes (`bench.file_audio.ClockSpeaker`).
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from mlx_harmony.bench.file_audio import ClockSpeaker
from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.session import Session
from mlx_harmony.voice import tts as tts_module
from mlx_harmony.voice.audio_io import MODEL_RATE, Speaker
from mlx_harmony.voice.checkpoints import is_quantized
from mlx_harmony.voice.config import VoiceConfig, apply_override
from mlx_harmony.voice.control import Request
from mlx_harmony.voice.daemon import VoiceAssistant
from mlx_harmony.voice.playout import RATE_MARGIN, frames_for_lateness, frames_to_buffer
from mlx_harmony.voice.speaking import SpokenAnswer
from mlx_harmony.voice.tts import SpeechSession, Synthesizer
from mlx_harmony.voice.tts_speed import (
    MOST_CUTS,
    FrameCost,
    StepTimes,
    TtsSpeed,
    choose_codebooks,
    fit_codebooks,
    frame_cost,
    line_through,
)
from mlx_harmony.voice.vad import make_detector
from tests.support.voice_loop import Recorder, serve

FRAME_S = 0.08


# ------------------------------------------------------------------------ the playout rule
def gaps(rate: float, total: int, buffered: int) -> int:
    """Frames that would arrive after their turn to play, starting with `buffered` in
    hand: frame j is ready (j - buffered + 1) / rate frame-lengths after the start and
    plays at j."""
    return sum((j - buffered + 1) / rate > j + 1e-9 for j in range(buffered, total))


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.77, 0.9, 0.99])
@pytest.mark.parametrize("total", [2, 7, 40, 250])
def test_the_buffer_is_the_least_that_plays_the_answer_without_a_gap(rate, total) -> None:
    need = frames_to_buffer(rate, total)
    assert gaps(rate, total, need) == 0
    if need > 1:
        assert gaps(rate, total, need - 1) > 0


def test_a_machine_that_keeps_up_plays_the_first_frame_at_once() -> None:
    assert frames_to_buffer(1.0, 500) == 1
    assert frames_to_buffer(3.0, 500) == 1
    assert frames_to_buffer(0.5, 1) == 1
    # Far too slow: the whole answer is synthesized first.
    assert frames_to_buffer(0.0, 30) == 30


# --------------------------------------------------------------- the codebook count chosen
def test_frame_cost_splits_the_frame_into_fixed_work_and_each_codebook() -> None:
    times = StepTimes(32, backbone=[0.020, 0.021, 0.019], full=[0.150, 0.148], decode=[0.010])
    cost = frame_cost(times)
    assert cost.fixed == pytest.approx(0.030)
    assert cost.per_codebook == pytest.approx((0.149 - 0.030) / 32)
    assert cost.frame(32) == pytest.approx(0.149)


def test_the_most_codebooks_that_stay_ahead_of_playback_are_chosen() -> None:
    cost = FrameCost(fixed=0.030, per_codebook=0.004)  # 32: 158 ms, 8: 62 ms
    # 66.7 ms a frame at a 1.2 margin: 0.030 + 0.004 k <= 0.0667 → k = 9
    assert choose_codebooks(cost, 32, 8, 1.2, FRAME_S) == 9
    assert choose_codebooks(FrameCost(0.01, 0.001), 32, 8, 1.2, FRAME_S) == 32
    # Nothing keeps up: the floor, never fewer; a model with fewer than the floor: all.
    assert choose_codebooks(FrameCost(0.2, 0.01), 32, 8, 1.2, FRAME_S) == 8
    assert choose_codebooks(FrameCost(0.2, 0.01), 4, 8, 1.2, FRAME_S) == 4
    assert choose_codebooks(FrameCost(0.2, 0.01), 32, 1, 1.2, FRAME_S) == 2  # Mimi's least


def test_a_second_measured_point_replaces_the_first_guess() -> None:
    cost = line_through((32, 0.150), (12, 0.070))
    assert cost.per_codebook == pytest.approx(0.004)
    assert cost.frame(12) == pytest.approx(0.070)
    assert choose_codebooks(cost, 12, 8, 1.2, FRAME_S) == 11


def test_cuts_go_on_until_a_measured_frame_keeps_the_margin() -> None:
    """A frame whose codebooks cost more the more there are (each depformer pass attends
    over the ones before it): a line through two measures overestimates what a cut
    saves, and two cuts (what start-up once stopped at) left 13 codebooks at 1.17x real
    time; the cuts go on to 11, the most that keep 1.2x."""

    def frame(k: int) -> float:
        return 0.06 + 0.00005 * k * k

    def times(k: int) -> StepTimes:
        return StepTimes(k, backbone=[0.02], full=[frame(k)], decode=[0.0])

    cuts: list[int] = []

    def cut(k: int) -> StepTimes:
        cuts.append(k)
        return times(k)

    first = times(32)
    _, last = fit_codebooks(first, frame_cost(first), cut, 2, 1.2, FRAME_S)
    assert FRAME_S / frame(cuts[1]) < 1.2 and len(cuts) > 2
    assert last.codebooks == 11 and FRAME_S / last.frame >= 1.2
    assert FRAME_S / frame(12) < 1.2


def test_cuts_stop_at_the_floor_or_after_a_few() -> None:
    cuts: list[int] = []

    def cut(k: int) -> StepTimes:  # nothing fits: 200 ms whatever is kept
        cuts.append(k)
        return StepTimes(k, backbone=[0.1], full=[0.2], decode=[0.0])

    first = StepTimes(32, backbone=[0.1], full=[0.2], decode=[0.0])
    _, last = fit_codebooks(first, frame_cost(first), cut, 8, 1.2, FRAME_S)
    assert last.codebooks == 8 and cuts == [8]
    cuts.clear()

    def never(k: int) -> StepTimes:  # every cut saves less; 0.1 ms short even at 0
        cuts.append(k)
        return StepTimes(k, backbone=[0.05], full=[0.0668 + 1e-5 * k * k], decode=[0.0])

    first = StepTimes(32, backbone=[0.05], full=[0.0668 + 1e-5 * 32 * 32], decode=[0.0])
    _, last = fit_codebooks(first, frame_cost(first), never, 2, 1.2, FRAME_S)
    assert len(cuts) == MOST_CUTS and last.codebooks == cuts[-1] > 2


def test_the_status_line_says_what_was_chosen_and_how_fast_it_runs() -> None:
    fast = TtsSpeed(12, 32, 0.05, FRAME_S, chosen=True, margin=1.2)
    assert fast.rate == pytest.approx(1.6)
    assert fast.describe() == (
        "12 of 32 codebooks (chosen for this machine), 1.60x real time (50 ms a frame)"
    )
    slow = TtsSpeed(8, 32, 0.1, FRAME_S, chosen=False, margin=1.2)
    assert not slow.keeps_up
    assert slow.describe().startswith("8 of 32 codebooks (set in tts.codebooks), 0.80x real")
    assert "under the 1.2x margin" in slow.describe()


# ---------------------------------------------------------------------- gaps are counted
def test_the_speaker_counts_a_gap_mid_answer_but_not_the_start_or_the_end() -> None:
    speaker = Speaker(None)  # not opened: its callback is called here as a sound card would
    block = MODEL_RATE // 50

    def period() -> None:
        speaker._callback(np.zeros((block, 1), np.float32), block, None, None)

    period()  # before the answer: silence is no gap
    speaker.expecting = True
    period()
    speaker.play(np.ones(2 * block, np.float32))
    period(), period()
    assert speaker.underruns == 0
    period()  # ran dry with more to come
    period()  # the same gap
    assert speaker.underruns == 1
    speaker.play(np.ones(block, np.float32))
    period()
    speaker.expecting = False  # the last frame is queued: what follows is the end
    speaker.play(np.ones(block // 2, np.float32))
    period(), period()
    assert speaker.underruns == 1


# ------------------------------------------------------------- on the tiny TTS, slowed down
def slow_down(monkeypatch, seconds: float, per_codebook: float = 0.0) -> None:
    """Every TTS step takes `seconds` longer, plus `per_codebook` per depformer pass."""
    step = SpeechSession.step

    def slowed(self: SpeechSession) -> np.ndarray | None:
        out = step(self)
        time.sleep(seconds + per_codebook * self.last_slices)
        return out

    monkeypatch.setattr(SpeechSession, "step", slowed)


def fresh_tts(voice_models) -> Synthesizer:
    """Its own copy: choosing codebooks cuts the model it measures."""
    folder = voice_models / "tts"
    return Synthesizer.load(str(folder), "tiny-voice", str(folder / "voices"), temperature=0.0)


def test_a_machine_that_keeps_up_keeps_every_codebook(voice_models) -> None:
    tts = fresh_tts(voice_models)
    tts.warmup()
    speed = tts.calibrate(auto=True, floor=2, margin=1.2)
    assert (speed.codebooks, speed.of, tts.lm.dep_q) == (4, 4, 4)
    assert speed.chosen and speed.keeps_up


def test_auto_cuts_to_the_most_codebooks_this_machine_keeps_up_with(
    voice_models, monkeypatch
) -> None:
    # 90 ms a codebook against a 320 ms budget (a 0.25 margin, to dwarf the tiny model's
    # own few ms under any load): 3 codebooks take 270 ms, 4 take 360.
    slow_down(monkeypatch, 0.0, per_codebook=0.09)
    tts = fresh_tts(voice_models)
    speed = tts.calibrate(auto=True, floor=2, margin=0.25)
    assert (speed.codebooks, speed.of, tts.lm.dep_q) == (3, 4, 3)
    assert speed.keeps_up
    frames = list(tts.speak("Hello there"))  # and it speaks with what it kept
    assert frames and all(f.shape == (tts.frame_samples,) for f in frames)


def test_a_machine_too_slow_for_any_count_gets_the_floor_and_is_told(
    voice_models, monkeypatch
) -> None:
    slow_down(monkeypatch, 0.1)  # every step longer than the 80 ms it makes
    tts = fresh_tts(voice_models)
    speed = tts.calibrate(auto=True, floor=3, margin=1.2)
    assert (speed.codebooks, tts.lm.dep_q) == (3, 3)
    assert not speed.keeps_up and "under the 1.2x margin" in speed.describe()


def slowed_unless_quantized(monkeypatch, exact: float, quantized: float) -> None:
    """Every TTS step takes `exact` seconds longer on the clock the TTS times itself
    with, or `quantized` once its weights are: added to that clock, not slept, so a
    loaded machine's own slowness stays small beside it."""
    added = [0.0]
    step = SpeechSession.step

    def slowed(self: SpeechSession) -> np.ndarray | None:
        out = step(self)
        added[0] += quantized if is_quantized(self.synth.lm) else exact
        return out

    monkeypatch.setattr(SpeechSession, "step", slowed)
    clock = SimpleNamespace(perf_counter=lambda: time.perf_counter() + added[0])
    monkeypatch.setattr(tts_module, "time", clock)


def test_where_the_fewest_codebooks_fall_short_8_bit_weights_are_kept_if_faster(
    voice_models, monkeypatch
) -> None:
    slowed_unless_quantized(monkeypatch, 0.15, 0.0)
    tts = fresh_tts(voice_models)
    speed = tts.calibrate(auto=True, floor=4, margin=1.2)  # no codebook to cut
    assert speed.bits == 8 and is_quantized(tts.lm)
    assert speed.describe().startswith("4 of 4 codebooks, 8-bit weights (chosen for this")
    assert speed.as_log()["bits"] == 8
    frames = list(tts.speak("Hello there"))  # and it speaks with them
    assert frames and all(f.shape == (tts.frame_samples,) for f in frames)


def test_8_bit_weights_that_are_no_faster_are_put_back(voice_models, monkeypatch) -> None:
    slowed_unless_quantized(monkeypatch, 0.1, 0.2)
    tts, exact = fresh_tts(voice_models), fresh_tts(voice_models)
    speed = tts.calibrate(auto=True, floor=4, margin=1.2)
    assert speed.bits is None and not is_quantized(tts.lm)
    assert "under the 1.2x margin" in speed.describe() and "Pocket TTS" in speed.describe()
    monkeypatch.undo()
    text = "Hello there, how are you?"
    assert np.array_equal(
        np.concatenate(list(tts.speak(text))), np.concatenate(list(exact.speak(text)))
    )


ANSWER = "Hello! How can I help you today?"


def assistant_on_clock(engine, synthesizer, tmp_path, prompt=None, **overrides):
    """An assistant without microphone, speaking into a clock-paced speaker."""
    config = VoiceConfig()
    for key, value in ({"tts.greeting": False, "activation.earcons": False} | overrides).items():
        config = apply_override(config, key, value)
    prompt = prompt or PromptConfig(sampling={"temperature": 0.0})
    session = Session(engine, prompt, tmp_path / "chat.json", "tiny")
    session.new_chat()
    rec, speaker = Recorder(), ClockSpeaker()
    assistant = VoiceAssistant(
        config, engine, prompt, None, synthesizer, make_detector(config.endpointing, MODEL_RATE),
        session, rec, speaker=speaker,
    )  # fmt: skip
    return assistant, rec, speaker


def ask(assistant, rec, questions: list[str]) -> None:
    def scenario(stop: threading.Event) -> None:
        for n, question in enumerate(questions, 1):
            assistant.submit(Request(cmd="ask", text=question))
            rec.wait("turn_done", timeout=120, count=n)

    serve(assistant, scenario)


def ask_slowly(engine, synthesizer, tmp_path, monkeypatch, **overrides):
    """'Hello' asked as text of an assistant whose TTS runs at about 0.7x real time;
    its timings and the speaker."""
    monkeypatch.setattr(synthesizer, "speed", None)  # restored after the test
    slow_down(monkeypatch, 0.11)
    synthesizer.calibrate(auto=False, floor=2, margin=1.2)
    assert synthesizer.speed is not None and synthesizer.speed.rate < 0.8
    assistant, rec, speaker = assistant_on_clock(engine, synthesizer, tmp_path, **overrides)
    ask(assistant, rec, ["Hello"])
    assert "".join(rec.texts("answer")) == ANSWER
    (timings,) = rec.timings
    return timings, speaker


def test_a_slow_tts_plays_the_answer_without_a_gap_after_the_predicted_buffer(
    engine, synthesizer, tmp_path, monkeypatch
) -> None:
    t, speaker = ask_slowly(engine, synthesizer, tmp_path, monkeypatch)
    assert t.underruns == 0
    assert t.tts_rate is not None and t.tts_rate < 0.8
    # The answer waited for the frames the rule asks for at that speed and length (one or
    # two more where the speed estimate rose as the frame came: the answer's own pace
    # replaces the start-up figure after a few frames), and the length it predicted was
    # not short of what was played.
    need = frames_to_buffer(t.tts_rate / RATE_MARGIN, t.predicted_frames)
    assert 1 < need <= t.buffered_frames <= need + 2
    played_frames = speaker.played_samples // synthesizer.frame_samples
    assert played_frames <= t.predicted_frames


def test_without_the_playout_buffer_the_same_answer_stutters(
    engine, synthesizer, tmp_path, monkeypatch
) -> None:
    t, _ = ask_slowly(engine, synthesizer, tmp_path, monkeypatch, **{"tts.playout_buffer": False})
    assert t.buffered_frames == 0
    assert t.underruns > 0


def all_codebooks_then_a_loaded_loop(voice_models, monkeypatch) -> Synthesizer:
    """A TTS that keeps all its codebooks when timed alone at start; then every pass of
    the loop that hands its frames over takes 100 ms more (what the start-up measurement
    cannot see)."""
    tts = fresh_tts(voice_models)
    tts.warmup()
    assert tts.calibrate(auto=True, floor=2, margin=1.2).codebooks == 4
    step = SpokenAnswer.step

    def loaded(self) -> None:
        time.sleep(0.1)  # the load itself, not a wait for anything
        step(self)

    monkeypatch.setattr(SpokenAnswer, "step", loaded)
    return tts


def test_answers_that_run_dry_teach_it_the_loops_pace_and_cost_codebooks(
    voice_models, engine, tmp_path, monkeypatch
) -> None:
    """Timed alone at start the TTS keeps up with all its codebooks; in the answers the
    loop adds 100 ms to every step (what the start-up measurement cannot see): the first
    answer runs dry and buffers for the pace it sees, and from then on fewer codebooks are
    kept and answers are buffered for that pace from their start."""
    tts = all_codebooks_then_a_loaded_loop(voice_models, monkeypatch)
    assistant, rec, _ = assistant_on_clock(engine, tts, tmp_path)
    ask(assistant, rec, ["Hello", "Hello"])
    first, second = rec.timings
    # Every step is slower than a frame, so the speaker runs dry and is refilled before
    # the loop looks: the gaps it counted still stop the answer to buffer, and once it
    # has run dry two frames' pace size the buffer (not the 50-odd gaps of playing on).
    assert 0 < first.underruns <= 3 and first.text_gaps == 0
    (notice,) = [n for n in rec.texts("notice") if n.startswith("text to speech ran at")]
    assert "now 2 of 4 codebooks" in notice and tts.lm.dep_q == 2
    assert second.underruns == 0 and second.buffered_frames > 1


def test_a_tool_that_takes_its_time_is_a_pause_not_a_gap(
    gpt_oss_python_path, synthesizer, tmp_path, monkeypatch
) -> None:
    """While a tool runs the answer stops on purpose (its notice said so): that silence
    is not counted as a gap, and the pace of the answer's speech is timed without it, so
    the next answer is not buffered as if the TTS were slow."""
    from mlx_harmony.llm.engine import Engine
    from mlx_harmony.llm.tools.toolbox import Toolbox
    from tests.support.tiny_models import PYTHON_FINALS, PYTHON_USER

    run = Toolbox.run

    def slow(self, call):
        time.sleep(1.5)
        return run(self, call)

    monkeypatch.setattr(Toolbox, "run", slow)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "note.txt").write_text("hello")
    prompt = PromptConfig(
        sampling={"temperature": 0.0}, tools={"python": True, "workspace": str(workspace)}
    )
    engine = Engine.load(str(gpt_oss_python_path))
    assistant, rec, speaker = assistant_on_clock(engine, synthesizer, tmp_path, prompt=prompt)

    def scenario(stop: threading.Event) -> None:
        for n in (1, 2):  # each in a chat of its own: the tiny model knows one turn
            assistant.submit(Request(cmd="new-chat"))
            assistant.submit(Request(cmd="ask", text=PYTHON_USER))
            rec.wait("turn_done", timeout=120, count=n)

    serve(assistant, scenario)
    assert "".join(rec.texts("answer")) == PYTHON_FINALS[True] * 2
    first, second = rec.timings
    assert speaker.played_samples > 0
    assert first.underruns == 0 and second.underruns == 0
    assert second.buffered_frames == 1


def test_on_its_own_thread_the_tts_keeps_its_pace_when_the_loop_is_slow(
    voice_models, engine, tmp_path, monkeypatch
) -> None:
    """The same loaded loop (100 ms more on every pass that hands frames over) with the TTS
    on its own thread: synthesis does not wait for the loop, each pass hands over every
    frame made since, and the pace the answers teach is synthesis's own: no codebook is
    cut and the second answer plays without a gap."""
    tts = all_codebooks_then_a_loaded_loop(voice_models, monkeypatch)
    assistant, rec, _ = assistant_on_clock(engine, tts, tmp_path, **{"tts.own_thread": True})
    ask(assistant, rec, ["Hello", "Hello"])
    second = rec.timings[1]
    assert not [n for n in rec.texts("notice") if n.startswith("text to speech ran at")]
    assert tts.lm.dep_q == 4
    assert second.underruns == 0


def test_a_stall_is_buffered_for_where_it_recurs() -> None:
    """The extra frames an answer holds back for stalls: none for a one-off one, however
    long; where two of the last answers' frames came late, the smaller of the two lateness
    figures in frames, rounded up with at least half a frame to spare; a frame late by under
    a tenth of a frame is no stall."""
    frame = 0.08
    assert frames_for_lateness([], frame) == 0
    assert frames_for_lateness([1.0, 0.0, 0.0], frame) == 0
    # 0.2 s late is two and a half frames: three, and half a frame for the spread.
    assert frames_for_lateness([1.0, 0.2, 0.0], frame) == 3
    assert frames_for_lateness([0.16, 0.16], frame) == 3  # two frames exactly: and a half
    assert frames_for_lateness([0.007, 0.007], frame) == 0
    assert frames_for_lateness([0.009, 0.009], frame) == 1


def test_the_daemon_buffers_for_a_stall_that_recurs_in_its_answers(
    clocked_assistant, monkeypatch
) -> None:
    """The real loop, the tiny models, a speaker on the test's clock: the TTS's fifth frame
    of every answer takes half a second of that clock (the machine busy elsewhere). The
    first two answers run dry there; the third holds back for it and plays without a gap;
    the chat log keeps each answer's lateness and the frames held for it."""
    c = clocked_assistant(**{"tts.greeting": False, "activation.earcons": False})
    step = SpeechSession.step

    def stalling(self: SpeechSession) -> np.ndarray | None:
        out = step(self)
        if out is not None:
            self.frames_out = getattr(self, "frames_out", 0) + 1
            if self.frames_out == 5:
                c.clock.now += 0.5
        return out

    monkeypatch.setattr(SpeechSession, "step", stalling)
    for n in range(1, 4):
        # Each in a chat of its own: the same answer each time.
        c.assistant.submit(Request(cmd="new-chat"))
        c.assistant.submit(Request(cmd="ask", text="Hello"))
        c.run_until(lambda n=n: len(c.rec.timings) == n)
        c.run_until(lambda: not c.speaker.busy)
    first, second, third = c.rec.timings
    assert "".join(c.rec.texts("answer")) == ANSWER * 3
    assert first.underruns >= 1 and second.underruns >= 1 and first.late_ms > 100
    assert first.jitter_frames == second.jitter_frames == 0
    assert third.underruns == 0 and third.jitter_frames > 0
    assert third.buffered_frames > third.jitter_frames
    c.close()  # the chat log written
    log = json.loads(c.log_path.read_text())
    messages = log["chats"][log["active_chat_id"]]["messages"]
    answer = [m for m in messages if m.get("voice_timings")][-1]
    assert answer["voice_timings"]["jitter_frames"] == third.jitter_frames
    assert answer["voice_timings"]["late_ms"] == pytest.approx(third.late_ms, abs=0.1)
