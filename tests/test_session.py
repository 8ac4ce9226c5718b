"""The session: a chat log resumed or started, chats switched, turns recorded and saved —
what the text chat and the voice daemon share."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlx_harmony.llm.chatlog import Chat, load_chat_log
from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.messages import ChatMessage
from mlx_harmony.llm.session import Session
from tests.support.scripted import ScriptedEngine

DATA = Path(__file__).parent / "data"
GREETING = PromptConfig(assistant_greeting="Hello, I am {assistant}.", assistant_name="Ada")


def test_a_new_log_starts_a_chat_opened_by_the_greeting_and_is_written_on_save(
    tmp_path,
) -> None:
    engine = ScriptedEngine()
    path = tmp_path / "chat.json"
    session = Session(engine, GREETING, path, "some/model", "prompt.json")
    assert session.resume_or_start() is None
    assert [(m.role, m.content) for m in session.chat.messages] == [
        ("assistant", "Hello, I am Ada.")
    ]
    assert session.chat.metadata.last_model_path == "some/model" and engine.resets == 1
    assert not path.exists()  # nothing written until asked
    assert session.save() is None
    log, _ = load_chat_log(path)
    assert log.active().messages[0].content == "Hello, I am Ada."


def test_an_old_log_is_resumed_with_a_backup_of_the_original(tmp_path) -> None:
    path = tmp_path / "chat.json"
    shutil.copy(DATA / "chatlog-v1.json", path)
    session = Session(ScriptedEngine(), GREETING, path, "m")
    opened = session.resume_or_start()
    assert opened is not None and opened.version == 1
    assert opened.backup == tmp_path / "chat.json.v1.bak" and opened.backup.exists()
    assert len(session.chat.messages) == 2  # its own messages, no greeting added


def test_a_log_that_does_not_load_leaves_the_session_as_it_was(tmp_path) -> None:
    session = Session(ScriptedEngine(), PromptConfig(), tmp_path / "a.json", "m")
    session.new_chat()
    before = session.chat.chat_id
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json"):
        session.open(bad)
    assert session.chat.chat_id == before and session.log_path == tmp_path / "a.json"


def test_a_turn_is_recorded_in_order_with_its_settings_and_the_front_ends_fields(
    tmp_path,
) -> None:
    session = Session(ScriptedEngine(), PromptConfig(), tmp_path / "chat.json", "m")
    session.new_chat()
    turn = [
        ChatMessage("user", "What is 2+2?"),
        ChatMessage("assistant", "Simple sum.", "analysis"),
        ChatMessage("assistant", "Four.", "final"),
    ]
    session.record(turn, {"temperature": 0.5}, extra={"voice_timings": {"first_audio_ms": 1}})
    assert session.save() is None
    raw = json.loads((tmp_path / "chat.json").read_text())
    messages = raw["chats"][raw["active_chat_id"]]["messages"]
    assert [m["content"] for m in messages] == ["What is 2+2?", "Simple sum.", "Four."]
    assert [bool(m.get("hyperparameters")) for m in messages] == [False, False, True]
    assert messages[-1]["voice_timings"] == {"first_audio_ms": 1}


def test_switching_chats_resets_the_engine_and_a_new_chat_is_active(tmp_path) -> None:
    engine = ScriptedEngine()
    session = Session(engine, PromptConfig(), tmp_path / "chat.json", "m")
    session.new_chat()
    first = session.chat.chat_id
    session.new_chat()
    assert session.chat.chat_id != first and session.log.chat_order[0] == first
    session.continue_chat(first)
    assert session.chat.chat_id == first and engine.resets == 3


def test_a_save_that_fails_says_why_and_keeps_the_conversation(tmp_path) -> None:
    (tmp_path / "a-file").write_text("")
    session = Session(ScriptedEngine(), PromptConfig(), tmp_path / "a-file" / "chat.json", "m")
    session.new_chat()
    session.record([ChatMessage("user", "hi")])
    why = session.save()
    assert why  # the reason, as the operating system gives it
    assert session.chat.messages[-1].content == "hi"


def test_a_resumed_chat_without_messages_is_opened_by_the_greeting_once(tmp_path) -> None:
    session = Session(ScriptedEngine(), GREETING, tmp_path / "chat.json", "m")
    session.log.start_chat(Chat.new("m"))
    assert session.greet() == "Hello, I am Ada." and session.greet() == "Hello, I am Ada."
    assert [m.content for m in session.chat.messages] == ["Hello, I am Ada."]
