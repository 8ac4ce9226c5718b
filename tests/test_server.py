"""The HTTP server on loopback, spoken to with the official `openai` client."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from mlx_harmony.bench.live_server import LiveServer, free_port
from mlx_harmony.llm.config import PromptConfig, SamplingParams
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.engine import Engine, collect
from mlx_harmony.llm.messages import ChatMessage
from mlx_harmony.llm.server import ServedModel, ServerLimits, create_app
from tests.support.tiny_models import (
    HARMONY_TURNS,
    TOOL_ARGS,
    TOOL_FINAL,
    TOOL_RESULT,
    TOOL_USER,
    WEATHER_TOOL,
)

pytestmark = pytest.mark.slow
HELLO, FRANCE = HARMONY_TURNS[0], HARMONY_TURNS[1]
KEY = "sk-test"
ENDLESS_BIAS = {"200002": -100, "200012": -100}  # forbid the stop tokens


def stream_post(server: LiveServer, body: dict):
    return httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )


@pytest.fixture(scope="module")
def tiny(gpt_oss_engine: Engine) -> Engine:
    # Same weights, its own conversation cache.
    return Engine(gpt_oss_engine.model, gpt_oss_engine.tokenizer, "tiny")


@pytest.fixture(scope="module")
def server(tiny: Engine) -> Iterator[LiveServer]:
    served = [ServedModel("tiny", "tiny-path", PromptConfig())]
    app = create_app(
        served,
        load=lambda _: tiny,
        api_key=KEY,
        preloaded=tiny,
        limits=ServerLimits(
            max_body_bytes=200_000, max_messages=50, max_tokens=20_000, max_prompt_tokens=2_000
        ),
    )
    with LiveServer(app, free_port()) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completion_separates_reasoning_from_answer(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": FRANCE.user}], temperature=0
    )
    choice = r.choices[0]
    assert choice.message.content == FRANCE.final
    assert choice.message.model_extra["reasoning_content"] == FRANCE.analysis
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens


def test_streaming_deltas_and_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": HELLO.user}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for c in chunks
        if c.choices
    )
    assert content == HELLO.final and reasoning == HELLO.analysis
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stream_ends_with_done(server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": HELLO.user}], "temperature": 0, "stream": True}
    with stream_post(server, body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"


def test_tool_call_round_trip(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": WEATHER_TOOL}]
    messages: list[dict] = [{"role": "user", "content": TOOL_USER}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=tools, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == json.loads(TOOL_ARGS)
    messages.append(choice.message.model_dump(exclude_none=True, exclude={"reasoning_content"}))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT})
    r2 = client.chat.completions.create(model="tiny", messages=messages, tools=tools, temperature=0)
    assert r2.choices[0].message.content == TOOL_FINAL
    assert r2.choices[0].finish_reason == "stop"


def test_streamed_tool_call(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": WEATHER_TOOL}]
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": TOOL_USER}],
            tools=tools,
            temperature=0,
            stream=True,
        )
    )
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_same_tokens_as_the_chat_path_and_prefix_reuse(client: openai.OpenAI, tiny: Engine) -> None:
    messages = [{"role": "user", "content": FRANCE.user}]
    r = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0.5, seed=42, max_tokens=40
    )
    fresh = Engine(tiny.model, tiny.tokenizer, "chat")
    prompt = PromptConfig(sampling=SamplingParams(temperature=0.5, seed=42, max_tokens=40))
    done = collect(fresh.stream(Conversation([ChatMessage("user", FRANCE.user)], prompt)))
    final = "".join(m.content for m in done.messages if m.channel == "final")
    assert r.choices[0].message.content == (final or None)
    assert r.usage.completion_tokens == len(done.tokens)
    again = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0.5, seed=42, max_tokens=40
    )
    assert again.choices[0].message.content == r.choices[0].message.content
    # A follow-up that shares the conversation prefix reuses the cache.
    messages += [
        {"role": "assistant", "content": FRANCE.final},
        {"role": "user", "content": "Tell me a joke"},
    ]
    r2 = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1


def test_stop_sequence_cuts_the_answer(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": FRANCE.user}],
        temperature=0,
        stop=["Paris"],
    )
    assert r.choices[0].message.content == "The capital of France is "
    assert r.choices[0].finish_reason == "stop"


def test_models_and_health(server: LiveServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()  # no key needed
    assert health["status"] == "ok"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "temprature": 1}, 400, "temprature"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "model"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}] * 51}, 400, "messages"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"999999999": 1}},
            400,
            "logit_bias",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, 400, "seed"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": True}, 400, "n"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"١٢": 1}},
            400,
            "logit_bias",
        ),
        (
            {"messages": [{"role": "user", "content": "many words " * 2_000}]},
            400,
            "over this server's limit of 2000 (--max-prompt-tokens)",
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    server: LiveServer, body: dict, status: int, param: str
) -> None:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param or param in err["message"]
    assert err["type"] and err["message"]


def test_malformed_and_oversized_bodies(server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers=headers)
    assert r.status_code == 400 and "error" in r.json()
    big = {"messages": [{"role": "user", "content": "x" * 300_000}]}
    r = httpx.post(url, json=big, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    # The same body in chunks, without a declared length, is refused the same way.
    data = json.dumps(big).encode()
    pieces = (data[i : i + 16_384] for i in range(0, len(data), 16_384))
    r = httpx.post(url, content=pieces, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    small = json.dumps({"messages": [{"role": "user", "content": HELLO.user}], "temperature": 0})
    r = httpx.post(url, content=iter([small[:10].encode(), small[10:].encode()]), headers=headers)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == HELLO.final


def test_api_key_is_required(server: LiveServer) -> None:
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.fixture
def generated(tiny: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Events each generation on the tiny engine streamed, one count per generation."""
    counts: list[int] = []
    stream = tiny.stream

    def counted(*args, **kwargs):
        counts.append(0)
        index = len(counts) - 1
        for event in stream(*args, **kwargs):
            counts[index] += 1
            yield event

    monkeypatch.setattr(tiny, "stream", counted)
    return counts


def test_disconnect_mid_stream_cancels_generation(
    server: LiveServer, client: openai.OpenAI, generated: list[int]
) -> None:
    body = {
        "messages": [{"role": "user", "content": HELLO.user}],
        "temperature": 0,
        "stream": True,
        "max_tokens": 20_000,
        "logit_bias": ENDLESS_BIAS,
    }
    with stream_post(server, body) as r:
        for line in r.iter_lines():
            if "content" in line:
                break  # hang up while the model is still generating
    # 20,000 tokens would take minutes; the next request is served because the abandoned
    # generation was cancelled, a few tokens after the client left.
    r2 = client.chat.completions.create(
        model="tiny", temperature=0, messages=[{"role": "user", "content": HELLO.user}]
    )
    assert r2.choices[0].message.content == HELLO.final
    abandoned, _ = generated
    assert abandoned < 2_000, generated


def test_a_client_that_leaves_while_queued_costs_nothing(
    server: LiveServer, client: openai.OpenAI, generated: list[int]
) -> None:
    endless = {
        "messages": [{"role": "user", "content": HELLO.user}],
        "temperature": 0,
        "max_tokens": 20_000,
        "logit_bias": ENDLESS_BIAS,
    }
    with stream_post(server, {**endless, "stream": True}) as running:
        for line in running.iter_lines():
            if "content" in line:
                break  # the worker is busy with this one
        # Queued behind it, this client gives up; its 20,000 tokens must never be generated.
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                server.url + "/v1/chat/completions",
                json=endless,
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=httpx.Timeout(30, read=1.0),
            )
    r = client.chat.completions.create(
        model="tiny", temperature=0, messages=[{"role": "user", "content": HELLO.user}]
    )
    assert r.choices[0].message.content == HELLO.final
    # Neither the running nor the queued endless request ran its 20,000 tokens.
    assert all(count < 2_000 for count in generated[:-1]), generated


def test_silent_connections_are_closed_and_capped(tiny: Engine) -> None:
    limits = ServerLimits(header_timeout_s=0.5, max_connections=8)
    app = create_app([ServedModel("tiny", "tiny-path", PromptConfig())], preloaded=tiny)
    with LiveServer(app, free_port(), limits) as live:
        silent = [socket.create_connection(("127.0.0.1", live.port), timeout=20) for _ in range(8)]
        extra = socket.create_connection(("127.0.0.1", live.port), timeout=20)
        try:
            assert extra.recv(1) == b""  # over the cap: closed at once
            for conn in silent:  # no request headers within the deadline: closed
                assert conn.recv(1) == b""
        finally:
            for conn in [*silent, extra]:
                conn.close()
        assert httpx.get(live.url + "/health", timeout=10).json()["status"] == "ok"


def test_connections_that_send_headers_but_no_body_cannot_take_the_server(tiny: Engine) -> None:
    """Forty connections send their headers and a Content-Length, then nothing: each
    request's body has a deadline, and a full server still answers /health from its
    reserve (and refuses anything else there with a 503)."""
    limits = ServerLimits(header_timeout_s=5.0, max_connections=40)
    app = create_app([ServedModel("tiny", "tiny-path", PromptConfig())], preloaded=tiny)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    with LiveServer(app, free_port(), limits) as live:
        held = [socket.create_connection(("127.0.0.1", live.port), timeout=30) for _ in range(40)]
        try:
            for conn in held:
                conn.sendall(head)
            assert httpx.get(live.url + "/health", timeout=10).json()["status"] == "ok"
            busy = httpx.get(live.url + "/v1/models", timeout=10)
            assert busy.status_code == 503 and "connection limit" in busy.text
            for conn in held:  # no body within the deadline: closed
                with contextlib.suppress(ConnectionResetError):
                    while conn.recv(4096):
                        pass
        finally:
            for conn in held:
                conn.close()
        assert httpx.get(live.url + "/v1/models", timeout=10).status_code in (200, 401)


@pytest.mark.heavy
def test_negative_limits_are_refused_at_start() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.llm.cli.serve", "--max-prompt-tokens", "-5"],
        cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--max-prompt-tokens: -5 is not above zero" in out.stderr


def test_queued_requests_are_served_in_turn(client: openai.OpenAI) -> None:
    results: list[str | None] = []

    def ask() -> None:
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": HELLO.user}], temperature=0
        )
        results.append(r.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [HELLO.final] * 3


def test_openapi_schema_fuzz_gives_no_server_error(gpt_oss_engine: Engine) -> None:
    """Random requests drawn from the served OpenAPI schema: never a 5xx, errors in shape.

    Driven through hypothesis directly: schemathesis's pytest plugin does not run under
    pytest 9.
    """
    # Short answers keep a hundred random requests to seconds.
    prompt = PromptConfig(sampling=SamplingParams(max_tokens=4))
    tiny = Engine(gpt_oss_engine.model, gpt_oss_engine.tokenizer, "fuzz")
    app = create_app(
        [ServedModel("tiny", "tiny-path", prompt)],
        load=lambda _: tiny,
        preloaded=tiny,
        limits=ServerLimits(max_tokens=8),
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {o.path for o in operations} == {"/health", "/v1/models", "/v1/chat/completions"}
    for operation in operations:

        @settings(
            derandomize=True,
            max_examples=40 if operation.method == "post" else 5,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case) -> None:
            response = case.call()
            assert response.status_code < 500, (case.body, response.text[:300])
            if response.status_code >= 400:
                assert "error" in response.json()  # OpenAI's error shape, always

        check()


def start_server_command(model: Path, *extra: str) -> tuple[subprocess.Popen, int, dict]:
    """`mlx-harmony-server` in a process of its own; returns it once /health answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_harmony.llm.cli.serve",
         "--model", str(model), "--port", str(port),
         "--api-key", KEY, *extra],
        cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        try:
            return proc, port, httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
        except httpx.TransportError:
            time.sleep(0.2)


def test_server_command_serves_until_interrupted(gpt_oss_path: Path, tmp_path: Path) -> None:
    debug = tmp_path / "debug.log"
    proc, port, health = start_server_command(gpt_oss_path, "--debug-file", str(debug))
    try:
        assert health["loaded_model"] == str(gpt_oss_path)  # loaded before serving
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY)
        r = client.chat.completions.create(
            model=str(gpt_oss_path),
            messages=[{"role": "user", "content": HELLO.user}],
            temperature=0,
        )
        assert r.choices[0].message.content == HELLO.final
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    # Warmed up before it served: no client pays the kernel compiles (the greedy answer
    # above is unchanged by it; tests/test_engine.py checks the cache it leaves).
    assert out.index("Warmed up the model in") < out.index(f"Serving on http://127.0.0.1:{port}")
    # --debug-file: the request's prompt and raw response, as the chat's debug log has them.
    logged = debug.read_text()
    assert HELLO.user in logged and "<|channel|>final<|message|>" + HELLO.final in logged
    assert debug.stat().st_mode & 0o777 == 0o600


def test_the_neutral_fields_clients_send_are_taken(client: openai.OpenAI) -> None:
    """What frameworks send by default (the SDK's own spelling of each field)."""
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": HELLO.user}],
        temperature=0,
        frequency_penalty=0,
        presence_penalty=0,
        logprobs=False,
        top_logprobs=0,
        metadata={},
        store=False,
        user="someone",
        service_tier="auto",
        modalities=["text"],
        response_format={"type": "text"},
        prompt_cache_key="k",
        safety_identifier="s",
    )
    assert r.choices[0].message.content == HELLO.final


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("logprobs", True, "log probabilities are not returned"),
        ("store", True, "stores no completions"),
        ("response_format", {"type": "json_object"}, "structured output"),
        ("modalities", ["text", "audio"], "text only"),
        ("presence_penalty", 3, "less than or equal to 2"),
        ("not_a_field", 1, "Extra inputs are not permitted"),
    ],
)
def test_fields_asking_for_what_is_not_here_are_refused_by_name(
    client: openai.OpenAI, field: str, value: object, why: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body={field: value}
        )
    error = err.value.body
    assert isinstance(error, dict) and error["param"] == field, error
    assert error["message"].startswith(f"{field}: ") and why in error["message"], error


@pytest.mark.heavy
def test_a_port_in_use_is_said_before_anything_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "mlx_harmony.llm.cli.serve",
             "--model", "/no/such/model", "--port",
             str(port)],
            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode == 2
    assert f"error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)" in (
        out.stderr
    )
    assert "Loading" not in out.stderr  # the model was never loaded


def test_a_body_that_is_not_json_names_no_field() -> None:
    from fastapi.testclient import TestClient

    app = create_app([ServedModel("tiny", "x", PromptConfig())], load=lambda _: None)
    r = TestClient(app).post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] is None
    assert error["message"].startswith("the request body is not valid JSON: Expecting property")
    assert error["message"].endswith("(at character 1)")


def test_sigterm_stops_the_server_promptly_despite_running_and_queued_work(
    gpt_oss_path: Path,
) -> None:
    proc, port, _ = start_server_command(gpt_oss_path)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    endless = {
        "messages": [{"role": "user", "content": HELLO.user}],
        "temperature": 0,
        "max_tokens": 16_000,  # the command's default limit
        "logit_bias": ENDLESS_BIAS,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    generating = threading.Event()

    def running() -> None:
        try:
            with httpx.stream("POST", url, json={**endless, "stream": True}, headers=headers,
                              timeout=120) as r:  # fmt: skip
                for line in r.iter_lines():
                    if "content" in line:
                        generating.set()
        except httpx.HTTPError:
            pass  # the server went away: expected

    def queued() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(url, json=endless, headers=headers, timeout=120)

    threads = [threading.Thread(target=running), threading.Thread(target=queued)]
    try:
        threads[0].start()
        assert generating.wait(60), "the first request never started generating"
        threads[1].start()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)  # not after 32,000 tokens
    finally:
        proc.kill()
        for t in threads:
            if t.ident is not None:
                t.join(timeout=60)
    assert proc.returncode == 0, out


@pytest.mark.parametrize(
    "choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"]
)
def test_tool_choice_forces_a_call(client: openai.OpenAI, choice) -> None:
    # "Hello" alone never makes the model call a tool; tool_choice makes it.
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": HELLO.user}],
        temperature=0,
        tools=[{"type": "function", "function": WEATHER_TOOL}],
        tool_choice=choice,
        max_tokens=30,
    )
    calls = r.choices[0].message.tool_calls
    # The tiny model, forced into a call after "Hello", may first write a stray message to
    # the function before its real call: every message it writes goes to get_weather.
    assert calls and {c.function.name for c in calls} == {"get_weather"}
    assert r.choices[0].finish_reason == "tool_calls"


def test_tool_choice_naming_an_unknown_function_is_refused(server: LiveServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": WEATHER_TOOL}],
        "tool_choice": {"type": "function", "function": {"name": "launch"}},
    }
    r = httpx.post(
        server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_a_request_names_a_profile_and_a_prompt_config_the_server_offers(tiny: Engine) -> None:
    """As in the original tool: `profile` picks a served profile, `prompt_config` one of the
    prompt configs the server was given — by name, never a path of the client's choosing."""
    terse = PromptConfig(sampling=SamplingParams(max_tokens=3))
    app = create_app(
        [ServedModel("tiny", "tiny-path", PromptConfig()), ServedModel("dave", "tiny-path",
                                                                        PromptConfig())],
        load=lambda _: tiny,
        preloaded=tiny,
        prompt_configs={"terse": terse, "terse.json": terse},
    )  # fmt: skip
    with LiveServer(app, free_port()) as live:

        def ask(**fields: object) -> httpx.Response:
            body = {"messages": [{"role": "user", "content": HELLO.user}], "temperature": 0}
            return httpx.post(live.url + "/v1/chat/completions", json=body | fields, timeout=60)

        r = ask(profile="dave")
        assert r.status_code == 200 and r.json()["model"] == "dave"
        assert r.json()["choices"][0]["message"]["content"] == HELLO.final
        r = ask(prompt_config="terse")
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        r = ask(profile="nobody")
        assert r.status_code == 404 and r.json()["error"]["param"] == "profile"
        r = ask(model="tiny", profile="dave")
        assert r.status_code == 400 and r.json()["error"]["param"] == "profile"
        r = ask(prompt_config="/etc/passwd")
        assert r.status_code == 400
        assert "known: terse, terse.json" in r.json()["error"]["message"]


def test_offered_prompt_configs_are_named_by_path_file_name_and_stem(tmp_path: Path) -> None:
    from mlx_harmony.llm.config import load_prompt_config
    from mlx_harmony.llm.server import offered_prompt_configs

    (tmp_path / "dave.json").write_text(json.dumps({"assistant_name": "Dave"}))
    path = str(tmp_path / "dave.json")
    offered = offered_prompt_configs([path, path], lambda p: load_prompt_config(Path(p)))
    assert set(offered) == {path, "dave.json", "dave"}
    assert offered["dave"].assistant_name == "Dave"


def test_a_model_switched_to_is_warmed_up_before_it_answers(tiny: Engine) -> None:
    warmed: list[str] = []

    class Counted(Engine):
        def warmup(self, prompt: PromptConfig) -> bool:
            warmed.append(self.model_id)
            return super().warmup(prompt)

    def load(entry: ServedModel) -> Engine:
        return Counted(tiny.model, tiny.tokenizer, entry.name)

    app = create_app(
        [ServedModel("a", "a-path", PromptConfig()), ServedModel("b", "b-path", PromptConfig())],
        load=load,
        preloaded=tiny,
    )
    with LiveServer(app, free_port()) as live:
        body = {"messages": [{"role": "user", "content": HELLO.user}], "temperature": 0}
        r = httpx.post(live.url + "/v1/chat/completions", json=body | {"model": "b"}, timeout=120)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == HELLO.final
    assert warmed == ["b"]


def test_the_model_worker_lives_as_long_as_the_app_is_served() -> None:
    """Creating the app starts nothing; its lifespan starts the one model worker and
    stops it (a model switched to is loaded on it, once, and said by /health)."""
    from fastapi.testclient import TestClient

    from tests.support.scripted import ScriptedEngine

    loads: list[str] = []

    def load(entry: ServedModel) -> ScriptedEngine:
        loads.append(entry.model)
        return ScriptedEngine("Hi.")

    app = create_app([ServedModel("tiny", "tiny-path", PromptConfig())], load=load)
    slot = app.state.models
    with pytest.raises(RuntimeError, match="lifespan"):
        slot.worker  # noqa: B018
    with TestClient(app) as client:
        assert client.get("/health").json()["loaded_model"] is None
        for _ in range(2):
            r = client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hey"}]}
            )
            assert r.json()["choices"][0]["message"]["content"] == "Hi."
        assert (
            loads == ["tiny-path"] and client.get("/health").json()["loaded_model"] == "tiny-path"
        )
        worker = slot.worker
    assert not worker._thread.is_alive()
    with pytest.raises(RuntimeError, match="lifespan"):
        slot.worker  # noqa: B018
