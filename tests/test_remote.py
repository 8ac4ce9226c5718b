"""The remote backend: the project's own server on loopback as the remote, and a scripted
HTTP server for the failures (dropped connections, timeouts, errors, lost streams)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from mlx_harmony.llm.config import PromptConfig, RemoteConfig, load_profiles
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.engine import Engine, collect
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.messages import (
    CallFunction,
    ChatMessage,
    MessageDone,
    TextDelta,
    TurnDone,
)
from mlx_harmony.llm.remote import RemoteEngine, RemoteError, to_openai_messages
from mlx_harmony.llm.tool_loop import respond
from tests.support.tiny_models import HARMONY_TURNS, TOOL_FINAL, TOOL_USER
from tests.test_tool_loop import WeatherTool

GREEDY = PromptConfig(sampling={"temperature": 0.0})
KEY_ENV = "MLX_HARMONY_TEST_REMOTE_KEY"
KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def remote_url(gpt_oss_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """mlx-harmony-server with the tiny GPT-OSS (served as "tiny") on loopback, behind an
    API key."""
    port = _free_port()
    profiles = tmp_path_factory.mktemp("remote") / "profiles.json"
    profiles.write_text(json.dumps({"tiny": {"model": str(gpt_oss_path)}}))
    env = {**os.environ, "MLX_HARMONY_API_KEY": KEY}
    cmd = [
        sys.executable, "-m", "mlx_harmony.llm.cli.serve",
        "--profiles", str(profiles), "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    yield f"{url}/v1"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def remote(remote_url: str, monkeypatch) -> RemoteEngine:
    monkeypatch.setenv(KEY_ENV, KEY)
    return RemoteEngine(RemoteConfig(base_url=remote_url, api_key_env=KEY_ENV), "tiny")


def test_remote_turn_gives_the_same_events_as_the_local_engine(
    remote: RemoteEngine, engine: Engine
) -> None:
    turn = HARMONY_TURNS[1]
    history = [ChatMessage("user", turn.user)]
    events = list(remote.stream(Conversation(history, GREEDY)))
    finals = "".join(e.text for e in events if isinstance(e, TextDelta) and e.channel == "final")
    analysis = "".join(
        e.text for e in events if isinstance(e, TextDelta) and e.channel == "analysis"
    )
    assert finals == turn.final and analysis == turn.analysis
    done = events[-1]
    assert isinstance(done, TurnDone) and done.finish_reason == "stop"
    assert [(m.channel, m.content) for m in done.messages] == [
        ("analysis", turn.analysis),
        ("final", turn.final),
    ]
    assert done.stats.prompt_tokens > 0 and done.stats.generated_tokens > 0
    local = collect(engine.stream(Conversation(history, GREEDY)))
    assert [m.content for m in local.messages] == [m.content for m in done.messages]


def test_tool_calls_round_trip_through_the_remote(remote: RemoteEngine) -> None:
    tool = WeatherTool()
    events = list(respond(remote, [ChatMessage("user", TOOL_USER)], GREEDY, tool))
    assert len(tool.calls) == 1 and tool.calls[0].recipient == "functions.get_weather"
    done = events[-1]
    assert isinstance(done, TurnDone) and done.finish_reason == "stop"
    assert done.messages[-1].content == TOOL_FINAL


def test_a_forced_call_reaches_the_remote_as_its_tool_choice(remote: RemoteEngine) -> None:
    """ "Hello" alone never makes the tiny model call; CallFunction, sent as the API's
    tool_choice, does (the server forces the call's header)."""
    hello = Conversation(
        [ChatMessage("user", HARMONY_TURNS[0].user)],
        PromptConfig(sampling={"temperature": 0.0, "max_tokens": 30}),
        tools=WeatherTool().declarations,
    )
    assert collect(remote.stream(hello)).finish_reason == "stop"
    forced = collect(remote.stream(hello, start=CallFunction("get_weather")))
    assert forced.finish_reason == "tool_call"
    assert {m.recipient for m in forced.messages} == {"functions.get_weather"}


def test_history_goes_back_as_openai_messages() -> None:
    history = [
        ChatMessage("user", "hi"),
        ChatMessage("assistant", "think", "analysis"),
        ChatMessage("assistant", '{"city":"Paris"}', "commentary", "functions.get_weather"),
        ChatMessage("tool", '{"sky":"sunny"}', name="functions.get_weather"),
        ChatMessage("assistant", "Sunny.", "final"),
    ]
    prompt = PromptConfig(developer_instructions="Be brief.")
    msgs = to_openai_messages(history, prompt, None)
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "think",
            "tool_calls": [
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_2", "content": '{"sky":"sunny"}'},
        {"role": "assistant", "content": "Sunny."},
    ]


def test_chat_cli_with_a_remote_profile(remote_url: str, tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.json"
    profiles.write_text(
        json.dumps(
            {
                "shared": {
                    "model": "tiny",
                    "remote": {"base_url": remote_url, "api_key_env": KEY_ENV},
                }
            }
        )
    )
    assert load_profiles(profiles)["shared"].remote is not None
    cmd = [
        sys.executable, "-m", "mlx_harmony.llm.cli.chat",
        "--profiles", str(profiles), "--profile", "shared",
        "--temperature", "0", "--chat", str(tmp_path / "log.json"), "--no-markdown",
    ]  # fmt: skip
    env = {**os.environ, KEY_ENV: KEY}
    out = subprocess.run(
        cmd, input="Hello\n\\show\n", capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert HARMONY_TURNS[0].final in out.stdout
    assert f"remote {remote_url}" in out.stdout


def test_our_server_relays_to_a_remote(remote_url: str, monkeypatch) -> None:
    """mlx-harmony-server with a remote profile serves a model it does not load."""
    import openai

    from mlx_harmony.llm.server import ServedModel, create_app
    from tests.test_server import LiveServer, free_port

    monkeypatch.setenv(KEY_ENV, KEY)
    remote = RemoteConfig(base_url=remote_url, api_key_env=KEY_ENV)
    app = create_app([ServedModel("relay", "tiny", PromptConfig(), remote)])
    with LiveServer(app, free_port()) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(
            model="relay",
            messages=[{"role": "user", "content": HARMONY_TURNS[1].user}],
            temperature=0,
        )
    assert r.choices[0].message.content == HARMONY_TURNS[1].final
    assert r.choices[0].message.model_extra["reasoning_content"] == HARMONY_TURNS[1].analysis


def test_wrong_key_and_missing_key_are_one_line_errors(remote_url: str, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, "wrong")
    bad = RemoteEngine(RemoteConfig(base_url=remote_url, api_key_env=KEY_ENV), "tiny")
    with pytest.raises(RemoteError, match=rf"remote {remote_url}: HTTP 401: "):
        collect(bad.stream(Conversation([ChatMessage("user", "Hello")], GREEDY)))
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=f"environment variable {KEY_ENV} is not set"):
        RemoteEngine(RemoteConfig(base_url=remote_url, api_key_env=KEY_ENV), "tiny")


def test_cancel_stops_the_remote_stream(remote: RemoteEngine) -> None:
    seen: list[TextDelta] = []
    stream = remote.stream(
        Conversation([ChatMessage("user", HARMONY_TURNS[1].user)], GREEDY),
        should_stop=lambda: bool(seen),
    )
    for event in stream:
        if isinstance(event, TextDelta):
            seen.append(event)
        if isinstance(event, TurnDone):
            assert event.finish_reason == "cancelled"
    assert len(seen) == 1


# ----------------------------------------------------------------- failures, scripted

SSE_OK = (
    'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
    'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    "data: [DONE]\n\n"
)


class Scripted(BaseHTTPRequestHandler):
    """Answers each request by the next action of the server's script."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        action = self.server.script.pop(0) if self.server.script else "ok"  # type: ignore[attr-defined]
        self.server.requests += 1  # type: ignore[attr-defined]
        if action == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action == "slow":
            time.sleep(3)
        if action == "error":
            body = json.dumps({"error": {"message": "model 'x' does not exist\nmore"}}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        data = SSE_OK.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if action == "cut":  # promise more than is sent, then hang up
            self.send_header("Content-Length", str(len(data) + 500))
            self.end_headers()
            self.wfile.write(data[: data.index(b"\n\n") + 12])  # one event and a bit
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.script = []  # type: ignore[attr-defined]
    server.requests = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _engine(server: ThreadingHTTPServer, **cfg: float) -> RemoteEngine:
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return RemoteEngine(RemoteConfig(base_url=url, backoff_s=0.05, **cfg), "m")


def test_dropped_connections_are_retried(scripted) -> None:
    scripted.script = ["drop", "drop"]
    done = collect(
        _engine(scripted, retries=2).stream(Conversation([ChatMessage("user", "x")], GREEDY))
    )
    assert done.messages[-1].content == "Hi" and scripted.requests == 3


def test_retries_run_out_with_a_clear_error(scripted) -> None:
    scripted.script = ["drop", "drop"]
    with pytest.raises(RemoteError, match=r"cannot connect .* after 2 tries"):
        collect(
            _engine(scripted, retries=1).stream(Conversation([ChatMessage("user", "x")], GREEDY))
        )


def test_nothing_listening(scripted) -> None:
    port = _free_port()
    engine = RemoteEngine(
        RemoteConfig(base_url=f"http://127.0.0.1:{port}/v1", retries=1, backoff_s=0.01), "m"
    )
    with pytest.raises(RemoteError, match=rf"remote http://127.0.0.1:{port}/v1: cannot connect"):
        collect(engine.stream(Conversation([ChatMessage("user", "x")], GREEDY)))


def test_timeout(scripted) -> None:
    scripted.script = ["slow"]
    with pytest.raises(RemoteError, match=r"no answer within 0\.5 s"):
        collect(
            _engine(scripted, timeout_s=0.5).stream(
                Conversation([ChatMessage("user", "x")], GREEDY)
            )
        )


def test_http_error_names_the_server_and_its_message(scripted) -> None:
    scripted.script = ["error"]
    with pytest.raises(RemoteError) as err:
        collect(_engine(scripted).stream(Conversation([ChatMessage("user", "x")], GREEDY)))
    assert str(err.value).endswith("HTTP 404: model 'x' does not exist")


def test_connection_lost_mid_answer_is_not_retried(scripted) -> None:
    scripted.script = ["cut"]
    events: list = []
    with pytest.raises(RemoteError, match="connection lost mid-answer"):
        for event in _engine(scripted).stream(Conversation([ChatMessage("user", "x")], GREEDY)):
            events.append(event)
    assert scripted.requests == 1
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hi"]
    assert not any(isinstance(e, MessageDone) for e in events)


def test_a_server_relaying_to_a_remote_that_is_down_answers_502() -> None:
    """The remote's failure is not the client's mistake: a 502 naming the remote, where a
    bad request field is a 400."""
    from fastapi.testclient import TestClient

    from mlx_harmony.llm.server import ServedModel, create_app

    port = _free_port()
    remote = RemoteConfig(base_url=f"http://127.0.0.1:{port}/v1", retries=0, backoff_s=0)
    app = create_app([ServedModel("relay", "m", PromptConfig(), remote)])
    with TestClient(app) as client:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 502, r.text
        assert f"remote http://127.0.0.1:{port}/v1: cannot connect" in r.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json={**body, "n": 3}).status_code == 400


def test_the_remote_gets_the_same_system_part_as_a_chat_template_model() -> None:
    """Identity, instructions and a client's system message: one system message, as the
    chat-template path renders it (the remote path dropped the identity)."""
    from mlx_harmony.llm.system_part import system_text

    prompt = PromptConfig(system_model_identity="You are Dave.", developer_instructions="Be brief.")
    history = [ChatMessage("system", "Answer in French."), ChatMessage("user", "hi")]
    msgs = to_openai_messages(history, prompt, None)
    assert msgs == [
        {"role": "system", "content": "You are Dave.\n\nBe brief.\n\nAnswer in French."},
        {"role": "user", "content": "hi"},
    ]
    assert msgs[0]["content"] == system_text(prompt, history, None)


@pytest.mark.heavy
def test_a_remote_nobody_answers_ends_a_command_like_any_wrong_setting() -> None:
    """Exit status 2, as for every other error a user can fix, not 1."""
    port = _free_port()
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.llm.cli.generate",
         "--remote", f"http://127.0.0.1:{port}/v1",
         "--model", "m", "hi"],
        cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: remote http://127.0.0.1:{port}/v1: cannot connect")
