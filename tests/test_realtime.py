"""The OpenAI Realtime API at /v1/realtime, spoken to with the official `openai` SDK's
realtime client, unchanged, on the tiny models: the tiny STT hears the trained question
in any speech, the tiny GPT-OSS answers it in Harmony, the tiny TTS speaks the final
channel."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import websockets

from mlx_harmony.bench.live_server import LiveServer, free_port
from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.engine import Engine
from mlx_harmony.llm.server import ServedModel, ServerLimits, create_app
from mlx_harmony.voice.config import VoiceConfig, apply_override
from mlx_harmony.voice.realtime.app import add_realtime
from mlx_harmony.voice.realtime.session import VoiceKit
from mlx_harmony.voice.web import add_page
from tests.support.browser import Browser
from tests.support.tiny_models import HARMONY_TURNS, TOOL_ARGS, TOOL_FINAL, TOOL_USER, WEATHER_TOOL
from tests.support.tiny_voice import HEARD

KEY = "sk-voice"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FRANCE = HARMONY_TURNS[1]
CHUNK_S = 0.1  # the client sends its microphone in pieces of this length, at its pace


def speech_wav(text: str, folder: Path, trailing_s: float = 1.2) -> Path:
    """espeak-ng's voice at 24 kHz, with quiet before and after it."""
    raw, out = folder / "raw.wav", folder / f"speech-{trailing_s}.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "24000", "-c", "1", "-b", "16", str(out),
                    "pad", "0.3", str(trailing_s)], check=True)  # fmt: skip
    return out


def speech(text: str, folder: Path, trailing_s: float = 1.2) -> np.ndarray:
    """The same, as PCM16 samples."""
    with wave.open(str(speech_wav(text, folder, trailing_s))) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> np.ndarray:
    return speech("What is the capital of France?", tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def server(gpt_oss_engine, transcriber, synthesizer) -> Iterator[LiveServer]:
    tiny = Engine(gpt_oss_engine.model, gpt_oss_engine.tokenizer, "tiny")
    config = VoiceConfig()
    for key, value in {"endpointing.silence_ms": 400, "endpointing.warmup_blocks": 0,
                       "tts.voice": "tiny-voice"}.items():  # fmt: skip
        config = apply_override(config, key, value)
    served = [ServedModel("tiny", "tiny-path", PromptConfig(sampling={"temperature": 0.0}))]
    # A header deadline far shorter than a conversation: a WebSocket, once upgraded, is
    # not cut by it.
    limits = ServerLimits(header_timeout_s=1.0)
    app = create_app(served, load=lambda _: tiny, api_key=KEY, preloaded=tiny, limits=limits)
    add_realtime(app, VoiceKit(config, transcriber, synthesizer))
    add_page(app)
    with LiveServer(app, free_port(), limits) as live:
        yield live


def client(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


async def stream_in(conn, pcm: np.ndarray) -> None:
    """Send the audio as a microphone would: a piece every CHUNK_S, in real time."""
    step = int(24_000 * CHUNK_S)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n, at in enumerate(range(0, len(pcm), step)):
        piece = pcm[at : at + step].tobytes()
        await conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
        await asyncio.sleep(max(0.0, start + (n + 1) * CHUNK_S - loop.time()))


async def until(conn, kind: str, seen: list | None = None):
    """Events up to the first of `kind` (kept in `seen`), which is returned."""
    async for event in conn:
        if seen is not None:
            seen.append(event)
        if event.type == kind:
            return event
    raise AssertionError(f"the connection closed before {kind}")


async def ask_in_words(conn, text: str) -> None:
    """A user message as text, and an answer asked for."""
    await conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )
    await conn.response.create()


def of(events: list, kind: str) -> list:
    return [e for e in events if e.type == kind]


def test_a_spoken_question_gets_the_trained_answer_as_transcript_and_audio(
    server, question
) -> None:
    async def talk() -> list:
        async with client(server).realtime.connect(model="tiny") as conn:
            created = await until(conn, "session.created")
            assert created.session.audio.output.voice == "tiny-voice"
            seen: list = []
            sender = asyncio.create_task(stream_in(conn, question))
            await until(conn, "response.done", seen)
            await sender
            return seen

    events = asyncio.run(talk())
    kinds = [e.type for e in events]
    order = ["speech_started", "speech_stopped", "committed"]
    at = [kinds.index(f"input_audio_buffer.{kind}") for kind in order]
    assert at == sorted(at)
    (heard,) = of(events, "conversation.item.input_audio_transcription.completed")
    assert heard.transcript == HEARD
    deltas = of(events, "conversation.item.input_audio_transcription.delta")
    assert "".join(d.delta for d in deltas).strip() == HEARD
    answer = "".join(d.delta for d in of(events, "response.output_audio_transcript.delta"))
    assert answer == FRANCE.final
    audio = b"".join(base64.b64decode(d.delta) for d in of(events, "response.output_audio.delta"))
    assert len(audio) > 2 * 24_000 * 0.5  # at least half a second of speech
    # The reasoning stays out of both the words and the audio's transcript.
    assert FRANCE.analysis not in answer
    (done,) = of(events, "response.done")
    assert done.response.status == "completed"
    assert done.response.output[0].content[0].transcript == FRANCE.final
    usage = done.response.usage
    assert usage.output_tokens > 0
    # The words were prefilled while the user spoke: at the end only the last ones and the
    # assistant's header were left (74 tokens, 64 cached; without it none of the question).
    assert usage.input_tokens - usage.input_token_details.cached_tokens <= 12
    speech_stopped = kinds.index("input_audio_buffer.speech_stopped")
    assert kinds.index("response.output_audio.delta") > speech_stopped


def test_text_in_text_out_with_modalities_text(server) -> None:
    async def talk() -> list:
        async with client(server).realtime.connect(model="tiny") as conn:
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            await until(conn, "session.updated")
            await ask_in_words(conn, FRANCE.user)
            seen: list = []
            await until(conn, "response.done", seen)
            return seen

    events = asyncio.run(talk())
    assert "".join(d.delta for d in of(events, "response.output_text.delta")) == FRANCE.final
    assert not of(events, "response.output_audio.delta")
    (done,) = of(events, "response.output_text.done")
    assert done.text == FRANCE.final


def test_speech_during_the_answer_cancels_it_and_truncation_keeps_what_was_heard(
    server, question
) -> None:
    async def talk() -> tuple[list, list]:
        async with client(server).realtime.connect(model="tiny") as conn:
            await ask_in_words(conn, FRANCE.user)
            first: list = []
            await until(conn, "response.output_audio.delta", first)
            # The user speaks over the answer: the server hears it start, and cancels.
            rest: list = []
            sender = asyncio.create_task(stream_in(conn, question))
            await until(conn, "response.done", rest)
            item_id = of(first, "response.output_audio.delta")[0].item_id
            await conn.conversation.item.truncate(item_id=item_id, content_index=0,
                                                  audio_end_ms=0)  # fmt: skip
            await until(conn, "conversation.item.truncated", rest)
            await until(conn, "response.done", rest)  # the answer to the interruption
            await sender
            return first, rest

    _, rest = asyncio.run(talk())
    kinds = [e.type for e in rest]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")
    cancelled = of(rest, "response.done")[0]
    assert cancelled.response.status == "cancelled"
    assert cancelled.response.status_details.reason == "turn_detected"
    assert of(rest, "response.done")[1].response.status == "completed"


def test_response_cancel_stops_the_answer(server) -> None:
    async def talk() -> list:
        async with client(server).realtime.connect(model="tiny") as conn:
            await ask_in_words(conn, FRANCE.user)
            seen: list = []
            await until(conn, "response.output_audio.delta", seen)
            await conn.response.cancel()
            await until(conn, "response.done", seen)
            return seen

    events = asyncio.run(talk())
    (done,) = of(events, "response.done")
    assert done.response.status == "cancelled"
    spoken = "".join(d.delta for d in of(events, "response.output_audio_transcript.delta"))
    assert len(spoken) < len(FRANCE.final)


def test_malformed_events_get_errors_and_the_connection_goes_on(server) -> None:
    bad = [
        ("not json", None),
        ('{"type": "session.explode"}', "type"),
        ('{"type": "input_audio_buffer.append", "audio": "***"}', "audio"),
        ('{"type": "session.update", "session": {"output_modalities": ["smell"]}}',
         "session.output_modalities.0"),
        ('{"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 5}', "item_id"),
        ('{"type": "response.cancel"}', None),
        ('{"type": "session.update", "session": {"audio": {"output": {"voice": "alloy"}}}}',
         "session.audio.output.voice"),
    ]  # fmt: skip

    async def talk() -> tuple[list, object]:
        async with client(server).realtime.connect(model="tiny") as conn:
            await until(conn, "session.created")
            errors = []
            for raw, _ in bad:
                await conn.send_raw(raw)
                errors.append(await until(conn, "error"))
            await conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
            return errors, await until(conn, "session.updated")

    errors, updated = asyncio.run(talk())
    for (raw, param), error in zip(bad, errors, strict=True):
        assert error.error.param == param, (raw, error.error.message)
        assert error.error.message and "\n" not in error.error.message
    assert updated.session.instructions == "Be brief."


def test_a_function_tool_surfaces_as_a_function_call_item(server) -> None:
    async def talk() -> tuple[list, list]:
        async with client(server).realtime.connect(model="tiny") as conn:
            await conn.session.update(session={
                "type": "realtime", "output_modalities": ["text"],
                "tools": [{"type": "function", **WEATHER_TOOL}],
            })  # fmt: skip
            await ask_in_words(conn, TOOL_USER)
            first: list = []
            await until(conn, "response.done", first)
            (call,) = of(first, "response.function_call_arguments.done")
            await conn.conversation.item.create(item={
                "type": "function_call_output", "call_id": call.call_id,
                "output": '{"sky":"sunny"}',
            })  # fmt: skip
            await conn.response.create()
            second: list = []
            await until(conn, "response.done", second)
            return first, second

    first, second = asyncio.run(talk())
    (call,) = of(first, "response.function_call_arguments.done")
    assert call.name == "get_weather" and call.arguments == TOOL_ARGS
    assert of(first, "response.done")[0].response.output[0].type == "function_call"
    assert "".join(d.delta for d in of(second, "response.output_text.delta")) == TOOL_FINAL


def test_one_voice_session_at_a_time_and_a_client_that_vanishes_frees_the_worker(server) -> None:
    async def talk() -> tuple[object, str]:
        async with client(server).realtime.connect(model="tiny") as first:
            await until(first, "session.created")
            async with client(server).realtime.connect(model="tiny") as second:
                refused = await until(second, "error")
            await ask_in_words(first, FRANCE.user)
            await until(first, "response.output_audio.delta")
        # Gone mid-answer: the next session is let in, and the HTTP API is answered.
        async with client(server).realtime.connect(model="tiny") as third:
            await until(third, "session.created")
        chat = await client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": FRANCE.user}],
            temperature=0.0,
        )  # fmt: skip
        return refused, chat.choices[0].message.content

    refused, answer = asyncio.run(talk())
    assert refused.error.code == "session_busy"
    assert answer == FRANCE.final


def test_the_key_is_required_and_a_browser_may_offer_it_as_a_subprotocol(server) -> None:
    url = server.url.replace("http", "ws") + "/v1/realtime?model=tiny"

    async def talk() -> str:
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(url):
                pass
        protocols = ["realtime", f"openai-insecure-api-key.{KEY}"]
        async with websockets.connect(url, subprotocols=protocols) as ws:
            assert ws.subprotocol == "realtime"
            return await ws.recv()

    assert '"session.created"' in asyncio.run(talk())
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/realtime" in httpx.get(
        server.url + "/web/app.js").text  # fmt: skip


def test_the_page_in_a_browser_hears_the_microphone_and_speaks_the_answer(server, tmp_path) -> None:
    """Headless Chromium with a fake microphone playing the question: the page connects
    with the key it keeps, streams the microphone, shows what was heard and the answer,
    plays the answer's audio and shows the turn's timings."""
    wav = speech_wav("What is the capital of France?", tmp_path, trailing_s=4.0)
    browser = Browser(wav, tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=server.url + "/")  # the key is asked once
        browser.wait_for("document.readyState === 'complete'", timeout=30)
        browser.evaluate(f"localStorage.setItem('mlx-harmony-key', '{KEY}')")
        browser.call("Page.navigate", url=server.url + "/?start=1")
        # The whole answer shown and half a second of it played (not all eleven seconds).
        shown = f"document.getElementById('log').innerText.includes({FRANCE.final!r})"
        timed = "document.getElementById('timings').innerText.includes('first sound')"
        browser.wait_for(f"window.harmony && harmony.playedMs > 500 && {shown} && {timed}", 120)
        page = browser.evaluate(
            "({played: harmony.playedMs, errors: harmony.errors,"
            " log: document.getElementById('log').innerText,"
            " timings: document.getElementById('timings').innerText})"
        )
        browser.screenshot(ARTIFACTS / "realtime-page.png")
    finally:
        browser.close()
    assert page["errors"] == []
    assert HEARD in page["log"] and FRANCE.final in page["log"]
    assert page["played"] > 500  # the answer's audio went out through the page
    assert "first sound" in page["timings"]
