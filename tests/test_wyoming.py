"""The Wyoming server (Home Assistant's Assist pipeline), spoken to with the `wyoming`
package's own client on the tiny models: it lists its programs, transcribes a WAV, speaks
a sentence, and answers a question as a conversation agent."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from mlx_harmony.bench.live_server import free_port
from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.engine import Engine
from mlx_harmony.voice.config import VoiceConfig, apply_override
from mlx_harmony.voice.wyoming_server import Service, serve
from tests.support.tiny_models import HARMONY_TURNS
from tests.support.tiny_voice import HEARD

FRANCE = HARMONY_TURNS[1]


@pytest.fixture(scope="module")
def server(gpt_oss_engine, transcriber, synthesizer) -> Iterator[int]:
    config = apply_override(VoiceConfig(), "tts.voice", "tiny-voice")
    yield from serving(config, gpt_oss_engine, transcriber, synthesizer)


def serving(config: VoiceConfig, gpt_oss_engine, transcriber, tts) -> Iterator[int]:
    tiny = Engine(gpt_oss_engine.model, gpt_oss_engine.tokenizer, "tiny")
    prompt = PromptConfig(sampling={"temperature": 0.0})
    port, up = free_port(), threading.Event()
    loop = asyncio.new_event_loop()
    service = Service(config, tiny, prompt, "tiny", transcriber, tts)
    task = loop.create_task(serve(f"tcp://127.0.0.1:{port}", service, up.set))
    thread = threading.Thread(target=loop.run_until_complete, args=(task,), daemon=True)
    thread.start()
    assert up.wait(timeout=30)
    yield port
    loop.call_soon_threadsafe(task.cancel)
    thread.join(timeout=30)


async def exchange(port: int, events: list[Event], until: str) -> list[Event]:
    """Send the events, then read the answer up to (and with) the first `until`."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        for event in events:
            await client.write_event(event)
        out = []
        while (event := await client.read_event()) is not None:
            out.append(event)
            if event.type in (until, "error"):
                return out
    raise AssertionError(f"closed before {until}")


def test_describe_lists_the_three_programs(server) -> None:
    (event,) = asyncio.run(exchange(server, [Describe().event()], "info"))
    info = Info.from_event(event)
    assert [v.name for p in info.tts for v in p.voices] == ["tiny-voice"]
    assert info.asr[0].supports_transcript_streaming and info.asr[0].models
    assert [m.name for p in info.handle for m in p.models] == ["tiny"]


def test_a_wav_is_transcribed(server, tmp_path: Path) -> None:
    wav = tmp_path / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "What is the capital of France?"], check=True)
    with wave.open(str(wav)) as w:  # espeak's own rate (22 050 Hz): the server resamples
        rate, pcm = w.getframerate(), w.readframes(w.getnframes())
    pcm += bytes(rate)  # half a second of quiet after the words
    chunks = [pcm[i : i + 4096] for i in range(0, len(pcm), 4096)]
    events = [Transcribe().event(), AudioStart(rate=rate, width=2, channels=1).event()]
    events += [AudioChunk(rate=rate, width=2, channels=1, audio=c).event() for c in chunks]
    events += [AudioStop().event()]
    out = asyncio.run(exchange(server, events, "transcript"))
    assert Transcript.from_event(out[-1]).text == HEARD
    assert [e.type for e in out[:1]] == ["transcript-start"]


def test_a_sentence_is_spoken(server) -> None:
    out = asyncio.run(exchange(server, [Synthesize(text="Hello there.").event()], "audio-stop"))
    start = AudioStart.from_event(out[0])
    assert (start.rate, start.width, start.channels) == (24_000, 2, 1)
    audio = b"".join(AudioChunk.from_event(e).audio for e in out if e.type == "audio-chunk")
    samples = np.frombuffer(audio, dtype="<i2")
    assert len(samples) > 24_000 * 0.2 and np.abs(samples).max() > 0


def test_a_sentence_is_spoken_in_the_pocket_voice(
    gpt_oss_engine, transcriber, pocket_synthesizer
) -> None:
    """Pocket TTS, loaded on this thread, speaks on the server's."""
    pocket = apply_override(VoiceConfig(), "tts.backend", "pocket")
    # A cloned voice's file is named, not its folders.
    config = apply_override(pocket, "tts.voice", "/home/someone/voices/tiny-pocket.wav")
    running = serving(config, gpt_oss_engine, transcriber, pocket_synthesizer)
    port = next(running)
    try:
        (event,) = asyncio.run(exchange(port, [Describe().event()], "info"))
        ask = Synthesize(text="Hello there.", voice=SynthesizeVoice(name="tiny-pocket")).event()
        out = asyncio.run(exchange(port, [ask], "audio-stop"))
    finally:
        next(running, None)
    (program,) = Info.from_event(event).tts
    assert program.name == "pocket-tts" and [v.name for v in program.voices] == ["tiny-pocket"]
    audio = b"".join(AudioChunk.from_event(e).audio for e in out if e.type == "audio-chunk")
    assert len(np.frombuffer(audio, dtype="<i2")) > 24_000 * 0.2


def test_another_voice_is_refused_by_name(server) -> None:
    ask = Synthesize(text="Hi.", voice=SynthesizeVoice(name="alloy")).event()
    (event,) = asyncio.run(exchange(server, [ask], "audio-stop"))
    assert "voice 'alloy' is not served here" in Error.from_event(event).text


def test_a_question_is_answered_as_a_conversation_agent(server) -> None:
    ask = Transcript(text=FRANCE.user, context={"conversation_id": "kitchen"}).event()
    out = asyncio.run(exchange(server, [ask], "handled"))
    assert Handled.from_event(out[-1]).text == FRANCE.final
    chunks = "".join(HandledChunk.from_event(e).text for e in out if e.type == "handled-chunk")
    assert chunks == FRANCE.final
