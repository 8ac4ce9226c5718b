"""The voice loop end to end with the tiny models (moshi-mlx STT, the tiny GPT-OSS,
moshi-mlx TTS): endpointing, speculative starts, tools, barge-in and echo.

Where the devices themselves are part of the story (sound out and back in through the
room, a device that stops delivering, barge-in while audio plays) the daemon runs on real
PortAudio devices of a private PulseAudio server, in real time: speech made with espeak-ng
is played into the virtual microphone while a helper thread plays the scenario and records
the virtual speaker. The rest run the same loop on a microphone and speaker that keep the
test's clock (`clocked_assistant`, `tests.support.scripted.ClockedMic`): the same speech,
block by block, no waiting for real time. The tiny STT is wired to hear "What is the
capital of France?", which the tiny GPT-OSS answers in Harmony with an analysis and a
two-sentence final message.
"""

from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest

from mlx_harmony.bench.virtual_audio import non_silent_seconds, read_wav, wait_recorded
from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.voice.control import Reply, Request
from tests.support.tiny_voice import HEARD
from tests.support.voice_loop import SpokenTexts, serve

ANSWER = "The capital of France is Paris. It is also the largest city in the country."
QUESTION = "What is the capital of France?"
BLOCK_MS = 80


def test_a_spoken_question_is_answered_aloud(make_assistant, virtual_audio, tmp_path) -> None:
    assistant, rec, log_path = make_assistant()
    assert assistant.voice is not None
    spoken = assistant.voice.tts = SpokenTexts(assistant.voice.tts)
    question = virtual_audio.say("What is the capital of France?", tmp_path, lead_silence=0.3)
    feeds: list[float] = []
    real_feed = assistant.stt.feed

    def spy(pcm):
        feeds.append(time.perf_counter())
        return real_feed(pcm)

    assistant.stt.feed = spy
    recording = tmp_path / "speaker.wav"
    played: dict[str, float] = {}

    def scenario(stop: threading.Event) -> None:
        recorder = virtual_audio.record_speaker(recording)
        try:
            wait_recorded(recording, 0.05)  # the recorder runs
            recording_started = time.perf_counter()
            player = virtual_audio.play_into_mic(question)
            played["start"] = time.perf_counter()
            player.wait()
            played["end"] = time.perf_counter()
            done = rec.wait("turn_done")
            # Everything played until the end of the turn, and the device's latency after.
            wait_recorded(recording, done - recording_started + 0.3)
        finally:
            recorder.terminate()
            recorder.wait()

    try:
        serve(assistant, scenario)
    finally:
        del assistant.stt.feed

    # The STT got frames while the question was still playing, not only after it.
    assert any(played["start"] < t < played["end"] for t in feeds)
    assert rec.texts("heard") == [HEARD]
    assert "".join(rec.texts("answer")) == ANSWER
    assert rec.texts("status")[:4] == ["listening", "hearing", "thinking", "speaking"]
    (t,) = rec.timings
    # (That the turn waits for the configured silence is checked on the test's clock,
    # below: here blocks arrive in bursts under load, and the silence is counted in audio.)
    assert t.stt_frames_while_speaking > 10
    # The first sentence was on its way to the speaker before the answer was complete.
    assert t.first_chunk_ms is not None and t.generation_ms is not None
    assert t.first_chunk_ms < t.generation_ms
    assert t.first_audio_ms is not None and not t.interrupted
    # One TTS session for the answer, and it started on its first words, not its first
    # sentence.
    assert spoken.spoken() == [ANSWER]
    first_sentence = ANSWER.split(". ")[0] + "."
    assert len(spoken.at_first_step[0].split()) < len(first_sentence.split())
    # The words heard while the user spoke were prefilled: the end left only the last one.
    assert 0 < t.prompt_tokens - t.cached_tokens <= 8
    assert non_silent_seconds(read_wav(recording)) > 0.5

    log = json.loads(log_path.read_text())
    messages = log["chats"][log["active_chat_id"]]["messages"]
    assert [(m["role"], m.get("channel")) for m in messages] == [
        ("user", None),
        ("assistant", "analysis"),
        ("assistant", "final"),
    ]
    assert messages[0]["content"] == HEARD and messages[2]["content"] == ANSWER
    assert messages[2]["voice_timings"]["endpoint_ms"] == pytest.approx(t.endpoint_ms, abs=0.1)


def test_barge_in_stops_the_answer_and_takes_the_new_words(clocked_assistant, speech) -> None:
    c = clocked_assistant(**{"barge_in.enabled": True})
    rec = c.rec
    c.say(speech(QUESTION, lead_silence=0.3))
    c.run_until(lambda: c.speaker.played_samples >= c.speaker.rate // 2)  # half a second heard
    # One breath: with a comma's pause in it, a quick answer to its first half can start
    # before the rest, which then barges into that answer too (a third turn).
    c.say(speech("Stop wait a moment please."))
    c.run_until(lambda: len(rec.timings) == 2)
    c.run_for(1.0)
    assert len(rec.timings) == 2, rec.story()
    first, second = rec.timings
    assert first.interrupted and not second.interrupted
    assert rec.texts("heard") == [HEARD, HEARD]  # the new utterance became the next turn
    log = json.loads(c.log_path.read_text())
    messages = log["chats"][log["active_chat_id"]]["messages"]
    finals = [m for m in messages if m.get("channel") == "final"]
    # Only what the user heard stays in the conversation, marked as cut off.
    assert finals[0]["content"].endswith("…") and finals[0]["content"] != ANSWER
    assert ANSWER.startswith(finals[0]["content"].removesuffix("…").strip())
    assert finals[0]["voice_timings"]["interrupted"] is True


def test_without_barge_in_the_assistant_does_not_hear_itself_as_a_new_turn(
    clocked_assistant, speech
) -> None:
    c = clocked_assistant(
        **{
            "barge_in.enabled": False,
            "llm.prefill_while_listening": False,
            "endpointing.detector": "silero",  # the model detector, in the live loop
        }
    )
    c.say(speech(QUESTION, lead_silence=0.3))
    c.run_until(lambda: c.assistant.state == "speaking")
    c.say(speech("The capital of France is Paris."))  # as if the microphone heard the speaker
    c.run_until(lambda: bool(c.rec.timings))
    c.run_for(1.0)  # and a second on: no turn is taken from it
    assert c.rec.texts("heard") == [HEARD]
    assert c.rec.texts("status").count("hearing") == 1
    assert not c.rec.timings[0].interrupted
    assert c.rec.timings[0].cached_tokens == 0  # nothing prefilled while listening


def test_a_microphone_that_stops_delivering_is_reopened(
    make_assistant, virtual_audio, tmp_path
) -> None:
    assistant, rec, _ = make_assistant()
    question = virtual_audio.say("What is the capital of France?", tmp_path, lead_silence=0.3)

    def scenario(stop: threading.Event) -> None:
        rec.wait("status", "listening")
        # The stream stays open and "active", but no audio arrives any more.
        virtual_audio.pactl("suspend-source", "mic", "1")
        rec.wait("status", "waiting for audio device", timeout=15)
        virtual_audio.pactl("suspend-source", "mic", "0")
        rec.wait("notice", "audio devices are back", timeout=20)
        rec.wait("status", "listening", count=2)
        virtual_audio.play_into_mic(question).wait()
        rec.wait("turn_done")

    serve(assistant, scenario)
    assert rec.texts("heard") == [HEARD]


def test_a_tool_call_is_announced_not_read_aloud(
    clocked_assistant, speech, voice_models, gpt_oss_python_path, tmp_path
) -> None:
    """The tiny tool model, asked aloud, checks the workspace with python: the assistant
    says a short notice while the tool runs and then the answer from its result; the
    result itself is never spoken, and the chat log keeps the call and the result."""
    from mlx_harmony.llm.engine import Engine
    from mlx_harmony.voice.stt import Transcriber
    from tests.support.tiny_models import PYTHON_CODE, PYTHON_FINALS, PYTHON_USER

    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "note.txt").write_text("hello")
    stt = Transcriber.load(str(voice_models / "stt-python"), max_seconds=16)
    stt.warmup()
    prompt = PromptConfig(
        sampling={"temperature": 0.0}, tools={"python": True, "workspace": str(workspace)}
    )
    engine = Engine.load(str(gpt_oss_python_path))
    c = clocked_assistant(prompt=prompt, engine=engine, transcriber=stt)
    assert c.assistant.voice is not None
    spoken = c.assistant.voice.tts = SpokenTexts(c.assistant.voice.tts)
    c.say(speech("Is there a note?", lead_silence=0.3))
    c.run_until(lambda: bool(c.rec.timings))

    rec = c.rec
    assert rec.texts("heard") == [PYTHON_USER]
    # One TTS session for the whole answer: the notice, then the answer from the result.
    assert spoken.spoken() == [f"Running some Python. {PYTHON_FINALS[True]}"]
    assert "→ python" in rec.texts("notice") and "← python: True" in rec.texts("notice")
    assert "".join(rec.texts("answer")) == PYTHON_FINALS[True]
    assert PYTHON_CODE not in "".join(rec.texts("reasoning"))  # the call is not reasoning
    messages = c.assistant.session.chat.messages
    assert [(m.role, m.recipient, m.name) for m in messages] == [
        ("user", None, None),
        ("assistant", None, None),
        ("assistant", "python", None),
        ("tool", None, "python"),
        ("assistant", None, None),
    ]
    assert messages[3].content == "True\n" and messages[4].content == PYTHON_FINALS[True]


def test_its_own_voice_through_the_room_does_not_interrupt_it_but_the_user_does(
    make_assistant, virtual_audio, tmp_path
) -> None:
    """Loudspeakers: the speaker is looped into the microphone with a room's delay. With
    echo cancellation (the default) the assistant's own voice is removed from what the
    microphone hears, so barge-in is on and only the user's voice interrupts it."""
    # Greedy: the answers are the trained ones, long enough to be interrupted (sampled,
    # a two-token answer once ended before the interruption was played).
    assistant, rec, _ = make_assistant(prompt=PromptConfig(sampling={"temperature": 0.0}))
    assert assistant.echo is not None and assistant.rules.barge_in
    loop = virtual_audio.loop_speaker_into_mic(delay_ms=60)
    question = virtual_audio.say("What is the capital of France?", tmp_path, lead_silence=0.3)
    interruption = virtual_audio.say("Stop, stop, wait a moment please.", tmp_path)
    echo_db: list[float | None] = []
    try:

        def scenario(stop: threading.Event) -> None:
            virtual_audio.play_into_mic(question).wait()
            rec.wait("turn_done", timeout=90)  # spoken to the end, over its own echo
            echo_db.append(assistant.echo.attenuation_db)  # before any double talk
            # A new chat: the same question gets the same long answer (after the first one
            # the tiny model answers in five words, which a loaded machine could finish
            # speaking before the interruption is heard).
            fresh = Reply()
            assistant.submit(Request(cmd="new-chat"), fresh)
            assert fresh.finished.wait(30)
            virtual_audio.play_into_mic(question).wait()
            rec.wait("status", "speaking", count=2, timeout=90)
            virtual_audio.play_into_mic(interruption).wait()
            rec.wait("notice", "(interrupted)", timeout=30)
            rec.wait("turn_done", count=2, timeout=90)  # the interrupted answer, recorded

        serve(assistant, scenario)
    finally:
        virtual_audio.unload_module(loop)
    first = rec.timings[0]
    assert not first.interrupted, rec.events
    assert rec.timings[1].interrupted
    assert rec.texts("heard")[:2] == [HEARD, HEARD]
    # Of the echo of its first answer (python -m mlx_harmony.bench.echo measures it on its own).
    assert echo_db[0] is not None and echo_db[0] > 15, echo_db


def test_without_echo_cancellation_its_own_voice_would_interrupt_it(
    make_assistant, virtual_audio, tmp_path
) -> None:
    """The control for the test above: the same loop, cancellation off and barge-in forced
    on — the echo is loud enough to count as speech (which is why barge-in defaults to
    off without cancellation)."""
    assistant, rec, _ = make_assistant(
        # The level is what echoes: the tiny TTS's sound need not sound like speech.
        **{"audio.echo_cancellation": "off", "barge_in.enabled": True,
           "endpointing.detector": "energy"}
    )  # fmt: skip
    assert assistant.echo is None
    loop = virtual_audio.loop_speaker_into_mic(delay_ms=60)
    question = virtual_audio.say("What is the capital of France?", tmp_path, lead_silence=0.3)
    try:

        def scenario(stop: threading.Event) -> None:
            virtual_audio.play_into_mic(question).wait()
            rec.wait("notice", "(interrupted)", timeout=90)
            rec.wait("turn_done", timeout=90)

        serve(assistant, scenario)
    finally:
        virtual_audio.unload_module(loop)
    assert rec.timings[0].interrupted


def asked_with_pause_head(pause: float, clocked_assistant, speech, transcriber, **settings):
    """The question asked on the loop with the STT's pause head forced to predict "a
    pause comes" with probability `pause` at every frame."""
    import mlx.core as mx

    # Six outputs, the first at logit a and the rest at 0: its probability is
    # e^a / (e^a + 5).
    logits = mx.array([math.log(5 * pause / (1 - pause)), 0, 0, 0, 0, 0])
    heads = transcriber.lm.extra_heads
    saved = heads[2]
    heads[2] = lambda x: mx.zeros((*x.shape[:-1], 6)) + logits
    try:
        c = clocked_assistant(**settings)
        c.say(speech(QUESTION))
        c.run_until(lambda: bool(c.rec.timings))
    finally:
        heads[2] = saved
    return c


def test_a_predicted_pause_ends_the_turn_long_before_the_silence(
    clocked_assistant, speech, transcriber
) -> None:
    """The STT's pause head, forced to predict a pause everywhere: the loop ends the turn
    at the first silent block once the utterance is old enough, where the silence rule
    (set to 2 s here) would have waited."""
    c = asked_with_pause_head(
        0.99, clocked_assistant, speech, transcriber, **{"endpointing.silence_ms": 2000}
    )
    assert c.assistant.rules.semantic
    assert (
        "end of turn: predicted pause (or 2000 ms of silence); answer started after 320 ms "
        "or at a likely pause"
    ) in c.rec.texts("notice")
    assert c.rec.texts("heard") == [HEARD]
    assert c.rec.timings[0].endpoint_ms < 1000, c.rec.timings[0]  # on the test's clock


def test_a_likely_pause_starts_the_answer_and_the_silence_confirms_it(
    clocked_assistant, speech, transcriber
) -> None:
    """The pause head forced to "likely" (0.5: past the 0.4 that starts the answer, short of
    the 0.6 that ends the turn): the loop starts the answer at the first silent block once
    the utterance is old enough, the STT hearing on, and the silence confirms it."""
    c = asked_with_pause_head(
        0.5, clocked_assistant, speech, transcriber,
        **{"endpointing.silence_ms": 700, "endpointing.speculate_ms": 0},
    )  # fmt: skip
    assert c.assistant.rules.semantic and c.assistant.rules.pause_speculate == 0.4
    assert c.assistant.speculations["confirmed"] == 1, c.assistant.speculations
    (t,) = c.rec.timings
    assert t.speculative and t.transcript_ms < t.endpoint_ms  # taken before the end
    assert t.endpoint_ms >= 700 - BLOCK_MS  # the turn waited for the configured silence
    assert c.rec.texts("heard") == [HEARD]


def test_a_pause_mid_question_drops_the_speculative_answer_and_the_end_confirms_one(
    clocked_assistant, speech
) -> None:
    """Speculative start: a pause longer than `speculate_ms` inside the question starts an
    answer that the rest of the question drops unheard; at the end the answer is started
    early and played once the silence confirms the end."""
    c = clocked_assistant(
        **{"endpointing.semantic": "off", "endpointing.silence_ms": 700,
           "endpointing.speculate_ms": 160}
    )  # fmt: skip
    assistant, rec = c.assistant, c.rec
    assert assistant.rules.speculate_blocks == 2
    c.say(np.concatenate([speech("What is the capital"), speech("of France?", 0.35)]))
    c.run_until(lambda: bool(rec.timings))
    c.run_until(lambda: not c.speaker.busy)
    assert assistant.speculations["dropped"] >= 1, assistant.speculations
    assert assistant.speculations["confirmed"] == 1, assistant.speculations
    (t,) = rec.timings
    assert t.speculative and not t.interrupted
    assert rec.texts("status")[-3:] == ["thinking", "speaking", "listening"]
    # The answer was ready before the end was confirmed: the transcript came first.
    assert t.transcript_ms < t.endpoint_ms
    # One utterance, one STT stream: the speculative start took the words at the pause and
    # left the stream as it was, so the whole question is heard once, as without it.
    assert rec.texts("heard") == [HEARD]
    assert "".join(rec.texts("answer"))
    assert non_silent_seconds(np.concatenate(c.speaker.played)) > 0.5
    messages = assistant.session.chat.messages
    assert [m.role for m in messages].count("user") == 1


def test_stopping_during_a_pause_drops_the_speculative_answer_unsaved(
    clocked_assistant, speech
) -> None:
    """The assistant stopped while a speculative answer waits for the end of the turn: the
    question was not known to be finished, so nothing of that turn is saved or reported."""
    c = clocked_assistant(
        **{"endpointing.semantic": "off", "endpointing.silence_ms": 5000,
           "endpointing.speculate_ms": 160}
    )  # fmt: skip
    c.say(speech("What is the capital"))
    c.run_until(lambda: c.assistant.speculations["started"] >= 1)  # the pause started one
    c.close()
    assert c.assistant.speculations["started"] == 1
    assert c.assistant.speculations["dropped"] == 1
    assert c.rec.timings == [] and c.rec.texts("heard") == []
    log = json.loads(c.log_path.read_text()) if c.log_path.exists() else {"chats": {}}
    saved = [m for chat in log["chats"].values() for m in chat["messages"]]
    assert not [m for m in saved if m["role"] == "user"], saved


def test_the_turn_model_ends_a_finished_question_before_the_silence_would(
    make_assistant, virtual_audio, tmp_path
) -> None:
    """The live loop with the real Smart Turn: the finished question is scored at its
    silent blocks, off the loop, and the turn detector — not the 2 s of silence that are
    the maximum here — decides the end; the log says so."""
    assistant, rec, log_path = make_assistant(
        turn_model=True,
        **{"endpointing.semantic": "off", "endpointing.silence_ms": 2000,
           "endpointing.max_wait_ms": 2000, "endpointing.speculate_ms": 0},
    )  # fmt: skip
    assert assistant.rules.policy is not None
    assert assistant.status()["end_of_turn"].startswith("turn model + hold words >= 0.2")
    question = virtual_audio.say("What is the capital of France?", tmp_path)

    def scenario(stop: threading.Event) -> None:
        virtual_audio.play_into_mic(question).wait()
        rec.wait("turn_done", timeout=90)

    serve(assistant, scenario)
    assert any(n.startswith("end of turn: turn model + hold words") for n in rec.texts("notice"))
    assert rec.texts("heard") == [HEARD]
    (t,) = rec.timings
    assert t.ended_by == "turn detector", (t, assistant.scorer.turnarounds)
    log = json.loads(log_path.read_text())
    messages = log["chats"][log["active_chat_id"]]["messages"]
    assert messages[-1]["voice_timings"]["ended_by"] == "turn detector"


def test_the_chat_models_text_signal_is_read_while_listening_and_leaves_the_answer_intact(
    clocked_assistant, speech
) -> None:
    """With `text_weight`, the words heard are scored by the chat model itself between
    microphone blocks (never while an answer runs on its cache), and the answer that
    follows is the one the model gives without them."""
    c = clocked_assistant(
        **{"endpointing.semantic": "off", "endpointing.text_weight": 1.0,
           "endpointing.hold_words": [], "endpointing.max_wait_ms": 1500},
    )  # fmt: skip
    assistant = c.assistant
    assert "chat model" in assistant.status()["end_of_turn"]
    scored: list[tuple[str, bool]] = []
    real = assistant.engine.end_of_turn_probability

    def spy(conversation):
        scored.append((conversation.history[-1].content, assistant.turn is None))
        return real(conversation)

    assistant.engine.end_of_turn_probability = spy
    try:
        c.say(speech(QUESTION))
        c.run_until(lambda: bool(c.rec.timings))
    finally:
        del assistant.engine.end_of_turn_probability
    assert scored and all(idle for _, idle in scored), scored
    assert c.rec.texts("heard") == [HEARD]
    assert "".join(c.rec.texts("answer")) == ANSWER
