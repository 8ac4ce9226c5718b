"""The TTS on a thread of its own (`voice.synthesis_thread`), on scripted synthesizers:
the loop never waits for a step in flight, the frames are the ones stepping gives, and a
dropped answer stops being synthesized."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mlx_harmony.voice.synthesis_thread import ThreadedSpeech, ThreadedTTS
from tests.support.scripted import Clock, ScriptedSpeech, ScriptedSynthesizer

pytestmark = pytest.mark.unit

HANG_GUARD_S = 30.0  # only a broken worker gets near this


class GatedSpeech(ScriptedSpeech):
    """Each step starts (`started` is released) and then waits for the test to let it
    finish (`gate`)."""

    def step(self) -> np.ndarray:
        tts = self.tts
        assert isinstance(tts, GatedSynthesizer)
        tts.threads.add(threading.get_ident())
        tts.started.release()
        assert tts.gate.acquire(timeout=HANG_GUARD_S), "the test never let the step finish"
        if tts.fail_at == tts.steps:
            raise RuntimeError("the GPU fell over")
        frame = super().step()
        tts.events.append(f"step {tts.steps} ended")
        return frame * (self.frames)  # each frame tells its number


class GatedSynthesizer(ScriptedSynthesizer):
    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, step_s=0.01)
        self.started, self.gate = threading.Semaphore(0), threading.Semaphore(0)
        self.threads: set[int] = set()
        self.events: list[str] = []
        self.fail_at: int | None = None

    def session(self, batch: bool = True) -> GatedSpeech:
        return GatedSpeech(self)

    def adapt(self, observed_rate: float):
        self.threads.add(threading.get_ident())
        return super().adapt(observed_rate)

    def let(self, steps: int) -> None:
        """Let `steps` steps run to their end."""
        for _ in range(steps):
            self.gate.release()


@pytest.fixture
def gated():
    clock = Clock()
    tts = GatedSynthesizer(clock)
    threaded = ThreadedTTS(tts, clock)
    yield threaded, tts
    tts.let(100)  # a step still waiting may end
    threaded.close()


def until(threaded: ThreadedTTS, predicate) -> None:
    """Wait for the worker's state to satisfy `predicate` (the lock it changes under)."""
    with threaded._cond:
        assert threaded._cond.wait_for(predicate, HANG_GUARD_S)


def frames_of(speech: ThreadedSpeech) -> list[np.ndarray]:
    out = []
    while not speech.done:
        speech.wait(HANG_GUARD_S)
        frame, _, _ = speech.take(Clock())
        if frame is not None:
            out.append(frame)
    return out


def test_the_frames_are_the_ones_stepping_gives_in_order() -> None:
    clock = Clock()
    inline = ScriptedSynthesizer(clock, 0.02, frames_per_word=2).session()
    threaded = ThreadedTTS(ScriptedSynthesizer(clock, 0.02, frames_per_word=2), clock)
    try:
        speech = threaded.session()
        for s in (inline, speech):
            s.push("one two three ")
            s.push("four")
            s.close()
        expected = []
        while not inline.done:
            expected.append(inline.step())
        got = frames_of(speech)
        assert len(got) == len(expected) == 8
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
        assert speech.heard(4) == inline.heard(4) == "one two"
    finally:
        threaded.close()


def test_the_loop_never_waits_for_a_step_in_flight(gated) -> None:
    """While the worker is inside a step the loop takes nothing and goes on (text is still
    pushed); the frame is there once the step ends, timed on the worker, made by it."""
    threaded, tts = gated
    speech = threaded.session()
    speech.push("one two three ")
    assert tts.started.acquire(timeout=HANG_GUARD_S)  # the worker is inside step 1
    assert not speech.ready and speech.take(Clock()) == (None, 0.0, pytest.approx(1000.0))
    speech.push("four ")  # the loop goes on: nothing here waits for the step
    assert not speech.done and not speech.wants_text
    tts.let(1)
    speech.wait(HANG_GUARD_S)
    frame, took, at = speech.take(Clock())
    assert frame is not None and frame[0] == pytest.approx(0.1)
    assert took == pytest.approx(0.01) and at > 1000.0  # the worker's clock, its step
    assert tts.threads == {threaded._thread.ident}


def test_it_synthesizes_ahead_of_what_the_loop_takes(gated) -> None:
    threaded, tts = gated
    speech = threaded.session()
    speech.push("one two three four ")
    speech.close()
    tts.let(4)
    for _ in range(4):
        assert tts.started.acquire(timeout=HANG_GUARD_S)
    until(threaded, lambda: speech.frames_made == 4)  # handed over after its step
    assert speech.frames_made == 4 and speech.frames_left() == 4
    assert [speech.take(Clock())[0][0] for _ in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert speech.done


def test_a_dropped_answer_stops_being_synthesized(gated) -> None:
    """`end` returns once the step in flight is over, and nothing of the answer is stepped
    after it; the next answer's session starts afresh."""
    threaded, tts = gated
    speech = threaded.session()
    speech.push("one two three four five six ")
    speech.close()
    assert tts.started.acquire(timeout=HANG_GUARD_S)
    ended = threading.Thread(target=lambda: (speech.end(), tts.events.append("end returned")))
    ended.start()
    until(threaded, lambda: threaded._current is None)  # given up, its step still in flight
    tts.let(1)  # end waits for this step, which then finishes
    ended.join(HANG_GUARD_S)
    assert not ended.is_alive() and tts.events == ["step 1 ended", "end returned"]
    steps = tts.steps
    tts.let(10)
    nxt = threaded.session()  # a call on the worker: it has run every step it ever will
    assert tts.steps == steps == 1
    nxt.push("seven ")
    nxt.close()
    assert len(frames_of(nxt)) == 1


def test_a_new_answer_gives_up_the_one_still_synthesizing(gated) -> None:
    threaded, tts = gated
    old = threaded.session()
    old.push("one two three four five six ")
    old.close()
    assert tts.started.acquire(timeout=HANG_GUARD_S)  # its first step in flight
    opened: list[ThreadedSpeech] = []
    opening = threading.Thread(target=lambda: opened.append(threaded.session()))
    opening.start()
    until(threaded, lambda: bool(threaded._calls))  # the new session waits for the worker
    tts.let(10)  # the step in flight ends, then the call runs: no other step of the old
    opening.join(HANG_GUARD_S)
    (new,) = opened
    new.push("seven ")
    new.close()
    assert len(frames_of(new)) == 1
    assert tts.steps == 2


def test_a_failed_step_is_raised_on_the_loops_next_take(gated) -> None:
    threaded, tts = gated
    tts.fail_at = 0
    speech = threaded.session()
    speech.push("one two ")
    tts.let(1)
    speech.wait(HANG_GUARD_S)
    assert speech.ready
    with pytest.raises(RuntimeError, match="GPU fell over"):
        speech.take(Clock())


def test_model_calls_run_on_the_worker_and_return_here(gated) -> None:
    threaded, tts = gated
    assert threaded.adapt(0.9) is None and tts.adapted == [0.9]
    assert tts.threads == {threaded._thread.ident} != {threading.get_ident()}
    threaded.close()
    with pytest.raises(RuntimeError, match="closed"):
        threaded.adapt(0.9)
