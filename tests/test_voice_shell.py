"""The voice daemon's shell driven pass by pass (`VoiceAssistant.step()`), with scripted
devices, STT and engine on an injected clock: what it does with the turn rules' actions."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.session import Session
from mlx_harmony.voice.config import VoiceConfig, apply_override
from mlx_harmony.voice.control import Request
from mlx_harmony.voice.daemon import VoiceAssistant
from mlx_harmony.voice.vad import make_detector
from tests.support.scripted import (
    Clock,
    ScriptedEngine,
    ScriptedMic,
    ScriptedSpeaker,
    ScriptedSynthesizer,
    ScriptedTranscriber,
    run_until,
)
from tests.support.voice_loop import Recorder

QUESTION = "what is the capital of France"


@dataclass
class Shell:
    voice: VoiceAssistant
    clock: Clock
    mic: ScriptedMic
    stt: ScriptedTranscriber
    engine: ScriptedEngine
    rec: Recorder
    tts: ScriptedSynthesizer | None = None
    speaker: ScriptedSpeaker | None = None


def assistant(
    tmp_path,
    tts_step_s: float | None = None,
    word_s: float = 0.0,
    answer: str = "Paris is the capital.",
    **overrides,
):
    """A hearing assistant; with `tts_step_s` it speaks (each frame taking that long to
    synthesize), else the answer is shown, not spoken."""
    config = VoiceConfig()
    settings = {
        "tts.greeting": False,
        "activation.earcons": False,
        "endpointing.detector": "energy",
        "endpointing.turn_model": None,
        "endpointing.semantic": "off",
        "endpointing.silence_ms": 400,  # 5 blocks
        "endpointing.speculate_ms": 160,  # 2 blocks
        "audio.use_tts": tts_step_s is not None,
        "audio.echo_cancellation": "off",
    } | overrides
    for key, value in settings.items():
        config = apply_override(config, key, value)
    clock = Clock()
    mic, stt = ScriptedMic(clock), ScriptedTranscriber(QUESTION)
    engine, rec = ScriptedEngine(answer, clock, word_s), Recorder()
    tts = ScriptedSynthesizer(clock, tts_step_s) if tts_step_s is not None else None
    speaker = ScriptedSpeaker(clock) if tts is not None else None
    session = Session(engine, PromptConfig(), tmp_path / "chat.json", "scripted")
    session.new_chat()
    voice = VoiceAssistant(
        config, engine, PromptConfig(), stt, tts, make_detector(config.endpointing, 24_000),
        session, rec, clock=clock, sleep=clock.sleep, mic=mic, speaker=speaker,
    )  # fmt: skip
    voice.open()
    return Shell(voice, clock, mic, stt, engine, rec, tts, speaker)


def hear(voice: VoiceAssistant, mic: ScriptedMic, pattern: str) -> None:
    """Each block handled on its own pass, as a live microphone delivers them."""
    for c in pattern:
        mic.hear(c)
        run_until(voice.step, lambda: not mic.queued)


def test_an_answer_started_early_is_not_slowed_by_feeding_the_stt_silence_nobody_needs(
    tmp_path,
) -> None:
    """While an answer started at a pause waits to be confirmed, the silent blocks are not
    run through the STT (a model step each, on the loop the answer runs on); once the
    silence confirms the turn they are never needed."""
    sh = assistant(tmp_path)
    voice, mic, stt, engine, rec = sh.voice, sh.mic, sh.stt, sh.engine, sh.rec
    hear(voice, mic, "ssssss..")  # the second silent block takes the transcript early
    assert stt.peeks == 1 and voice.speculations["started"] == 1
    assert stt.fed == list(range(8))
    hear(voice, mic, "..")
    assert stt.fed == list(range(8)), "silence fed while the answer waits"
    hear(voice, mic, ".")  # 400 ms: the end is confirmed
    run_until(voice.step, lambda: voice.turn is None)
    assert voice.speculations["confirmed"] == 1 and stt.fed == list(range(8))
    assert engine.asked == [QUESTION] and rec.texts("heard") == [QUESTION]
    assert "".join(rec.texts("answer")).strip() == engine.answer


def test_speaking_on_after_an_early_start_gives_the_stt_the_pause_first_in_order(
    tmp_path,
) -> None:
    """The user speaks on: the answer is dropped and the STT hears the whole utterance,
    the pause's blocks it was spared included, in order, before the new speech."""
    sh = assistant(tmp_path)
    voice, mic, stt, engine, rec = sh.voice, sh.mic, sh.stt, sh.engine, sh.rec
    hear(voice, mic, "ssssss....")
    assert voice.speculations["started"] == 1 and stt.fed == list(range(8))
    hear(voice, mic, "ss")
    assert voice.speculations["dropped"] == 1 and engine.rollbacks == 1
    assert stt.fed == list(range(12))
    hear(voice, mic, ".....")
    run_until(voice.step, lambda: voice.turn is None)
    assert voice.speculations["confirmed"] == 1
    assert rec.texts("heard") == [QUESTION]


@pytest.mark.parametrize("speculate_ms", [160, 0])
def test_a_hearing_assistant_without_a_voice_answers_in_text(tmp_path, speculate_ms) -> None:
    """audio.use_tts false: the end of the turn (confirmed early start or not) shows the
    answer and records the turn."""
    sh = assistant(tmp_path, **{"endpointing.speculate_ms": speculate_ms})
    voice, mic, engine, rec = sh.voice, sh.mic, sh.engine, sh.rec
    hear(voice, mic, "ssssss.....")
    run_until(voice.step, lambda: voice.turn is None and bool(rec.timings))
    assert "".join(rec.texts("answer")).strip() == engine.answer
    voice.close()
    log = json.loads((tmp_path / "chat.json").read_text())
    messages = log["chats"][log["active_chat_id"]]["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", QUESTION), ("assistant", engine.answer)
    ]  # fmt: skip


# ---------------------------------------------------------------------------- pace and gaps
LONG_ANSWER = " ".join(["word"] * 24)


def ask_and_finish(sh: Shell) -> None:
    sh.voice.submit(Request(cmd="ask", text="tell me"))
    run_until(sh.voice.step, lambda: bool(sh.rec.timings), sh.clock)


def test_gaps_while_the_voice_waits_for_the_models_words_cost_no_codebooks(tmp_path) -> None:
    """The language model writes a word every 300 ms and each is 80 ms of speech; the TTS
    itself is four times faster than playback. The speech runs dry between words: those
    gaps are the text's, and cutting codebooks would cost quality and gain nothing."""
    sh = assistant(tmp_path, tts_step_s=0.02, word_s=0.3, answer=LONG_ANSWER)
    ask_and_finish(sh)
    (t,) = sh.rec.timings
    assert t.underruns > 0 and t.text_gaps == t.underruns
    assert sh.tts is not None and sh.tts.adapted == []
    # Each side's longest step is in the log: here the engine's word, not a TTS frame.
    assert t.slowest_engine_step_ms == pytest.approx(300)
    assert t.slowest_tts_step_ms == pytest.approx(20)


def test_gaps_while_synthesis_falls_behind_teach_the_pace(tmp_path) -> None:
    """The words are all there at once, but each 80 ms frame takes 100 ms to make: the
    gaps are the synthesis's, and the pace it kept is what codebooks are cut for."""
    sh = assistant(tmp_path, tts_step_s=0.1, answer=LONG_ANSWER, **{"tts.playout_buffer": False})
    ask_and_finish(sh)
    (t,) = sh.rec.timings
    assert t.underruns > 0 and t.text_gaps == 0
    assert sh.tts is not None and len(sh.tts.adapted) == 1 and sh.tts.adapted[0] < 1
    assert t.slowest_tts_step_ms == pytest.approx(100) and t.slowest_engine_step_ms == 0


def pace_learned(tmp_path, speculate_ms: int) -> float:
    """The pace an answer that runs dry teaches, asked by voice (100 ms a frame)."""
    sh = assistant(
        tmp_path, tts_step_s=0.1, answer=LONG_ANSWER,
        **{"tts.playout_buffer": False, "endpointing.speculate_ms": speculate_ms},
    )  # fmt: skip
    hear(sh.voice, sh.mic, "ssssss..")
    if speculate_ms:
        run_until(
            sh.voice.step,
            lambda: bool(sh.voice.turn and sh.voice.turn.speech and sh.voice.turn.speech.held),
        )
    hear(sh.voice, sh.mic, "...")  # the fifth silent block ends the turn
    run_until(sh.voice.step, lambda: bool(sh.rec.timings), sh.clock)
    (t,) = sh.rec.timings
    assert t.speculative == bool(speculate_ms) and t.underruns > 0
    assert sh.tts is not None and len(sh.tts.adapted) == 1
    return sh.tts.adapted[0]


def test_the_pace_of_an_answer_held_until_confirmed_counts_from_the_confirmation(
    tmp_path,
) -> None:
    """An answer started at a pause makes its first frames, then stands still until the
    silence confirms the turn. Its synthesis falls behind playback and the pace it kept is
    learned — the same pace as the same answer started at the end: the wait for the
    confirmation is not the synthesis's slowness."""
    assert pace_learned(tmp_path, 160) == pytest.approx(pace_learned(tmp_path, 0), rel=0.03)
