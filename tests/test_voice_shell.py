"""The voice daemon's shell driven pass by pass (`VoiceAssistant.step()`), with scripted
devices, STT and engine on an injected clock: what it does with the turn rules' actions."""

from __future__ import annotations

import json

import pytest

from mlx_harmony.llm.chatlog import Chat, ChatLog
from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.voice.config import VoiceConfig, apply_override
from mlx_harmony.voice.daemon import VoiceAssistant
from mlx_harmony.voice.vad import make_detector
from tests.support.scripted import (
    Clock,
    ScriptedEngine,
    ScriptedMic,
    ScriptedTranscriber,
    run_until,
)
from tests.support.voice_loop import Recorder

QUESTION = "what is the capital of France"


def assistant(tmp_path, **overrides):
    """A hearing assistant without a voice: the answer is shown, not spoken."""
    config = VoiceConfig()
    settings = {
        "tts.greeting": False,
        "activation.earcons": False,
        "endpointing.detector": "energy",
        "endpointing.turn_model": None,
        "endpointing.semantic": "off",
        "endpointing.silence_ms": 400,  # 5 blocks
        "endpointing.speculate_ms": 160,  # 2 blocks
        "audio.use_tts": False,
    } | overrides
    for key, value in settings.items():
        config = apply_override(config, key, value)
    clock = Clock()
    mic, stt, engine, rec = (
        ScriptedMic(clock),
        ScriptedTranscriber(QUESTION),
        ScriptedEngine(),
        Recorder(),
    )
    log = ChatLog()
    log.start_chat(Chat.new("scripted"))
    voice = VoiceAssistant(
        config, engine, PromptConfig(), stt, None, make_detector(config.endpointing, 24_000),
        log, tmp_path / "chat.json", rec, clock=clock, mic=mic,
    )  # fmt: skip
    voice.open()
    return voice, mic, stt, engine, rec


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
    voice, mic, stt, engine, rec = assistant(tmp_path)
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
    voice, mic, stt, engine, rec = assistant(tmp_path)
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
    voice, mic, _, engine, rec = assistant(tmp_path, **{"endpointing.speculate_ms": speculate_ms})
    hear(voice, mic, "ssssss.....")
    run_until(voice.step, lambda: voice.turn is None and bool(rec.timings))
    assert "".join(rec.texts("answer")).strip() == engine.answer
    voice.close()
    log = json.loads((tmp_path / "chat.json").read_text())
    messages = log["chats"][log["active_chat_id"]]["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", QUESTION), ("assistant", engine.answer)
    ]  # fmt: skip
