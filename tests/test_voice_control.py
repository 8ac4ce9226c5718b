"""The control socket: its protocol and its privacy, then a running assistant driven
through it (mute, ask, say, stop, new chat, bad commands), on the virtual devices or on
the test's clock."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlx_harmony.bench.virtual_audio import non_silent_seconds, read_wav
from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.voice.control import (
    ControlServer,
    Loading,
    NotRunning,
    Reply,
    Request,
    send_request,
)
from mlx_harmony.voice.typed_input import typed_request
from tests.support.tiny_voice import HEARD
from tests.support.voice_loop import SpokenTexts, serve

ANSWER = "The capital of France is Paris. It is also the largest city in the country."
NOBODY = 65534


class Answering:
    """A stand-in assistant for the protocol tests: answers every ask with two events."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def status(self) -> dict[str, Any]:
        return {"state": "listening"}

    def submit(self, request: Request, reply: Reply) -> None:
        self.requests.append(request)
        reply.event(event="answer", text="Par")
        reply.event(event="answer", text="is.")
        reply.done(answer="Paris.")


@pytest.fixture
def server(tmp_path: Path):
    handler = Answering()
    control = ControlServer(tmp_path / "run" / "voice.sock", handler, {"pid": 42})
    control.open()
    yield control, handler
    control.close()


def raw_exchange(path: Path, payload: bytes, answers: int) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(payload)
        reader = sock.makefile("rb")
        return [json.loads(reader.readline()) for _ in range(answers)]


def test_requests_stream_their_answer_and_status_carries_the_process_facts(server) -> None:
    control, handler = server
    events: list[dict[str, Any]] = []
    final = send_request(control.path, {"cmd": "ask", "text": "Capital?", "id": 7}, events.append)
    assert events == [
        {"id": 7, "event": "answer", "text": "Par"},
        {"id": 7, "event": "answer", "text": "is."},
    ]
    assert final == {"id": 7, "ok": True, "answer": "Paris."}
    assert handler.requests == [Request(cmd="ask", text="Capital?", id=7)]
    assert send_request(control.path, {"cmd": "status"}) == {
        "ok": True,
        "pid": 42,
        "state": "listening",
    }


def test_bad_requests_get_an_error_line_and_the_connection_goes_on(server) -> None:
    control, handler = server
    lines = [
        b"not json",
        b"[1, 2]",
        b'{"cmd": "dance"}',
        b'{"cmd": "say"}',
        b'{"cmd": "mute", "text": "x"}',
        b'{"cmd": "status", "extra": 1}',
        b"\xff\xfe",
        b"[" * 60_000,  # json recurses per level: a RecursionError in the connection's thread
        b'{"cmd": "status"}',
    ]
    answers = raw_exchange(control.path, b"\n".join(lines) + b"\n", len(lines))
    errors = [a["error"] for a in answers[:-1]]
    assert all(a["ok"] is False for a in answers[:-1])
    assert errors[0].startswith("not a JSON line")
    assert "JSON object" in errors[1]
    assert errors[2].startswith("field 'cmd'")
    assert errors[3] == "'say' needs a non-empty 'text'"
    assert errors[4] == "'mute' takes no 'text'"
    assert errors[5].startswith("field 'extra'")
    assert errors[7] == "not a request: nested too deeply"
    assert answers[-1] == {"ok": True, "pid": 42, "state": "listening"}
    assert handler.requests == []


def test_an_over_long_request_is_refused(server) -> None:
    control, _ = server
    (answer,) = raw_exchange(control.path, b"x" * (70 * 1024) + b"\n", 1)
    assert answer["ok"] is False and "longer than" in answer["error"]


def test_the_socket_is_private_single_and_removed_at_close(tmp_path: Path) -> None:
    path = tmp_path / "run" / "voice.sock"
    first = ControlServer(path, Answering())
    first.open()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    with pytest.raises(ConfigError, match="another mlx-harmony-voice is running"):
        ControlServer(path, Answering()).open()
    first.close()
    assert not path.exists()
    with pytest.raises(NotRunning, match="no assistant is running"):
        send_request(path, {"cmd": "status"})


def test_a_socket_left_by_a_dead_assistant_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "run" / "voice.sock"
    path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    os.chmod(path, 0o600)
    with pytest.raises(NotRunning, match="no assistant answers"):
        send_request(path, {"cmd": "status"})
    server = ControlServer(path, Answering())
    server.open()
    try:
        assert send_request(path, {"cmd": "status"})["ok"]
    finally:
        server.close()


def test_a_client_refuses_a_socket_others_may_use(server) -> None:
    control, handler = server
    os.chmod(control.path, 0o666)
    with pytest.raises(ConfigError, match=r"other users may use it \(mode 0o666\)"):
        send_request(control.path, {"cmd": "ask", "text": "secret question"})
    assert handler.requests == []


def test_a_server_refuses_a_folder_others_may_enter(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    with pytest.raises(ConfigError, match="other users may use it"):
        ControlServer(folder / "voice.sock", Answering()).open()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.heavy
def test_another_users_connection_is_refused_by_its_credentials() -> None:
    """Even with the file mode opened up, the kernel's peer credentials decide."""
    handler = Answering()
    # Outside pytest's private temporary folder, so that the other user can reach it.
    folder = Path(tempfile.mkdtemp(prefix="mlx-harmony-control-"))
    control = ControlServer(folder / "run" / "voice.sock", handler)
    control.open()
    try:
        for path, mode in ((folder, 0o755), (control.path.parent, 0o755), (control.path, 0o666)):
            os.chmod(path, mode)
        client = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\n"
            "try:\n"
            '    s.sendall(b\'{"cmd": "ask", "text": "hi"}\\n\')\n'
            "except OSError:  # refused before it could ask\n"
            "    pass\n"
            "print(s.makefile().readline(), end='')\n"
        )
        # The system's Python: the project's may live in a folder only its owner enters.
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        out = subprocess.run(
            [python, "-c", client, str(control.path)],
            user=NOBODY, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        control.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"ok": False, "error": "refused: another user's connection"}
    assert handler.requests == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file another user's")
def test_a_client_refuses_a_socket_of_another_user(server) -> None:
    control, _ = server
    os.chown(control.path, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}"):
        send_request(control.path, {"cmd": "status"})


def test_while_the_models_load_status_says_so_and_questions_are_refused(tmp_path) -> None:
    control = ControlServer(tmp_path / "run" / "voice.sock", Loading(), {"pid": 1})
    control.open()
    try:
        assert send_request(control.path, {"cmd": "status"}) == {
            "ok": True,
            "pid": 1,
            "state": "loading",
        }
        assert send_request(control.path, {"cmd": "ask", "text": "hi"}) == {
            "ok": False,
            "error": "the assistant is still loading its models",
        }
    finally:
        control.close()


def test_typed_lines_are_questions_and_backslash_lines_commands() -> None:
    assert typed_request("What time is it?") == Request(cmd="ask", text="What time is it?")
    assert typed_request("\\mute") == Request(cmd="mute")
    assert typed_request("\\new") == Request(cmd="new-chat")
    assert typed_request("\\say Tea is ready.") == Request(cmd="say", text="Tea is ready.")
    assert typed_request("\\quit") == "quit"
    assert typed_request("\\dance") == "help"
    assert typed_request("\\say") == "help"  # nothing to say
    assert typed_request("") == Request(cmd="listen")  # Enter: the push-to-talk key
    assert typed_request("\\listen") == Request(cmd="listen")


# ---------------------------------------------------------------------- live assistant


class Client:
    """The scenario's side of the socket: requests, with the answer's streamed events."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, cmd: str, text: str | None = None) -> tuple[dict, list[dict]]:
        events: list[dict] = []
        request = {"cmd": cmd} | ({"text": text} if text else {})
        return send_request(self.path, request, events.append, timeout=120), events


def controlled(assistant, tmp_path: Path) -> tuple[ControlServer, Client]:
    control = ControlServer(tmp_path / "run" / "voice.sock", assistant)
    control.open()
    return control, Client(control.path)


def active_messages(log_path: Path) -> list[dict[str, Any]]:
    log = json.loads(log_path.read_text())
    return log["chats"][log["active_chat_id"]]["messages"]


def user_messages(log_path: Path) -> list[str]:
    return [m["content"] for m in active_messages(log_path) if m["role"] == "user"]


def test_muted_it_hears_nothing_but_answers_a_question_from_the_socket_aloud(
    clocked_assistant, speech, tmp_path
) -> None:
    """On the test's clock (`clocked_assistant`); the client talks to the socket from a
    thread beside the loop, as it would from another process."""
    c = clocked_assistant()
    assistant, rec, log_path = c.assistant, c.rec, c.log_path
    control, ask = controlled(assistant, tmp_path)
    question = speech("What is the capital of France?", lead_silence=0.3)
    seen: dict[str, Any] = {}

    def scenario() -> None:
        seen["status"] = ask("status")[0]
        seen["mute"] = ask("mute")[0]
        seen["muted status"] = ask("status")[0]
        seen["garbage"] = raw_exchange(ask.path, b'{"cmd": "sing"}\nnonsense\n', 2)
        c.mic.say(question)
        assert c.mic.said.wait(60)
        played = len(c.speaker.played)
        seen["ask"] = ask("ask", "What is the capital of France?")
        rec.wait("status", "muted", count=2)  # back to muted once the answer is spoken
        seen["spoken"] = c.speaker.played[played:]
        seen["unmute"] = ask("unmute")[0]
        c.mic.say(question)
        rec.wait("turn_done", count=2)

    try:
        c.serve(scenario)
    finally:
        control.close()
    assert seen["status"]["state"] == "listening" and seen["status"]["muted"] is False
    assert seen["mute"] == {"ok": True, "muted": True}
    assert seen["muted status"]["state"] == "muted"
    assert [a["ok"] for a in seen["garbage"]] == [False, False]  # and it kept running
    final, events = seen["ask"]
    assert final == {"ok": True, "answer": ANSWER, "interrupted": False}
    assert "".join(e["text"] for e in events) == ANSWER
    assert non_silent_seconds(np.concatenate(seen["spoken"])) > 0.5  # the answer was spoken
    assert seen["unmute"] == {"ok": True, "muted": False}
    # The question said while muted was never heard; the one after unmuting was.
    assert rec.texts("status").count("hearing") == 1
    assert user_messages(log_path) == ["What is the capital of France?", HEARD]


def test_stop_ends_the_spoken_answer_and_keeps_what_was_heard(
    make_assistant, virtual_audio, tmp_path
) -> None:
    assistant, rec, log_path = make_assistant()
    control, ask = controlled(assistant, tmp_path)
    seen: dict[str, Any] = {}

    def scenario(stop: threading.Event) -> None:
        answer: dict[str, Any] = {}
        asking = threading.Thread(
            target=lambda: answer.update(final=ask("ask", "What is the capital of France?")[0])
        )
        asking.start()
        rec.wait("status", "speaking")
        seen["stop"] = ask("stop")[0]
        asking.join()
        seen["answer"] = answer["final"]
        seen["idle stop"] = ask("stop")[0]

    try:
        serve(assistant, scenario)
    finally:
        control.close()
    assert seen["stop"] == {"ok": True, "stopped": True}
    assert seen["answer"]["interrupted"] is True
    assert seen["answer"]["answer"].endswith("…") and seen["answer"]["answer"] != ANSWER
    assert seen["idle stop"] == {"ok": True, "stopped": False}
    log = json.loads(log_path.read_text())
    finals = [
        m for m in log["chats"][log["active_chat_id"]]["messages"] if m.get("channel") == "final"
    ]
    assert finals[-1]["content"] == seen["answer"]["answer"]


def test_say_speaks_without_touching_the_chat_and_new_chat_starts_one(
    make_assistant, virtual_audio, tmp_path
) -> None:
    prompt = PromptConfig(sampling={"temperature": 0.0}, assistant_greeting="Hello there.")
    assistant, rec, log_path = make_assistant(prompt=prompt)
    control, ask = controlled(assistant, tmp_path)
    recording = tmp_path / "speaker.wav"
    seen: dict[str, Any] = {}
    assert assistant.voice is not None
    spoken = assistant.voice.tts = SpokenTexts(assistant.voice.tts)

    def scenario(stop: threading.Event) -> None:
        recorder = virtual_audio.record_speaker(recording)
        try:
            seen["say"] = ask("say", "The tea is ready.")[0]
        finally:
            recorder.terminate()
            recorder.wait()
        seen["first chat"] = ask("status")[0]["chat_id"]
        seen["new"] = ask("new-chat")[0]
        rec.wait("status", "listening", count=4)  # the new chat's greeting was spoken

    try:
        serve(assistant, scenario)
    finally:
        control.close()
    assert seen["say"] == {"ok": True, "interrupted": False}
    assert non_silent_seconds(read_wav(recording)) > 0.3
    # The greeting opens each chat (spoken at start and in the new chat); "say" is not kept.
    assert spoken.spoken() == ["Hello there.", "The tea is ready.", "Hello there."]
    log = json.loads(log_path.read_text())
    assert len(log["chats"]) == 2 and log["active_chat_id"] == seen["new"]["chat_id"]
    assert seen["new"]["chat_id"] != seen["first chat"]
    for chat in log["chats"].values():
        assert [m["content"] for m in chat["messages"]] == ["Hello there."]


def test_without_microphone_or_speaker_questions_come_and_go_as_text(
    make_assistant, virtual_audio, tmp_path
) -> None:
    assistant, _, log_path = make_assistant(hears=False, speaks=False)
    control, ask = controlled(assistant, tmp_path)
    seen: dict[str, Any] = {}

    def scenario(stop: threading.Event) -> None:
        seen["status"] = ask("status")[0]
        seen["ask"] = ask("ask", "What is the capital of France?")[0]
        seen["say"] = ask("say", "Hello")[0]

    try:
        serve(assistant, scenario)
    finally:
        control.close()
    assert assistant.mic is None and assistant.speaker is None
    assert seen["status"]["state"] == "ready"
    assert seen["status"]["hears"] is False and seen["status"]["speaks"] is False
    assert seen["ask"] == {"ok": True, "answer": ANSWER, "interrupted": False}
    assert seen["say"] == {"ok": False, "error": "speech output is off (audio.use_tts)"}
    assert user_messages(log_path) == ["What is the capital of France?"]


def test_with_reasoning_skipped_the_answer_opens_on_the_final_channel(
    make_assistant, virtual_audio, tmp_path
) -> None:
    """llm.reasoning "skip": no analysis at all, the reply starts with answer words."""
    assistant, rec, log_path = make_assistant(
        hears=False, speaks=False, **{"llm.reasoning": "skip"}
    )
    control, ask = controlled(assistant, tmp_path)
    seen: dict[str, Any] = {}

    def scenario(stop: threading.Event) -> None:
        seen["ask"], seen["events"] = ask("ask", "What is the capital of France?")

    try:
        serve(assistant, scenario)
    finally:
        control.close()
    assert seen["ask"]["ok"] and seen["ask"]["answer"].strip()
    assert rec.texts("reasoning") == []
    assert [m.get("channel") for m in active_messages(log_path)] == [None, "final"]
