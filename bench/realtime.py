"""The Realtime API's latency beside the local daemon's, in one process on the same
models: a question streamed over /v1/realtime in real time (80 ms pieces, as a browser's
microphone sends them), and the time from the server's `speech_stopped` to the first
`response.output_audio.delta`. The daemon's counterpart is its first chunk handed to
the speaker after its end of turn (`first_chunk - endpointing`)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import websockets

from mlx_harmony.bench.live_server import LiveServer, free_port
from mlx_harmony.llm.cli.common import Setup
from mlx_harmony.llm.engine import Engine
from mlx_harmony.llm.server import ServedModel, create_app
from mlx_harmony.voice.config import VoiceConfig
from mlx_harmony.voice.realtime.app import add_realtime
from mlx_harmony.voice.realtime.session import VoiceKit
from mlx_harmony.voice.stt import Transcriber
from mlx_harmony.voice.synthesis import TextToSpeech

PIECE_S = 0.08
TRAILING_S = 1.5  # quiet the client goes on sending after the question, as a microphone


@dataclass(frozen=True)
class RealtimeRecord:
    turn: int
    after_speech_stopped_ms: float  # speech_stopped → first audio delta (the client's view)
    after_speech_end_ms: float  # the end of speech (the server's, sent in real time) → delta
    first_word_ms: float | None  # speech_stopped → first transcript delta
    audio_ms: float  # audio received for the answer
    status: str

    def row(self) -> dict:
        return asdict(self)


def run(
    config: VoiceConfig,
    setup: Setup,
    engine: Engine,
    stt: Transcriber,
    tts: TextToSpeech,
    clips: list[np.ndarray],
    rounds: int,
) -> list[RealtimeRecord]:
    """`rounds` questions, each in a session of its own (a fresh conversation, as the
    daemon's rounds), after one untimed round (kernels compile on the worker's thread)."""
    served = [ServedModel("bench", setup.model, setup.prompt)]
    app = create_app(served, load=lambda _: engine, preloaded=engine)
    add_realtime(app, VoiceKit(config, stt, tts))
    records = []
    with LiveServer(app, free_port()) as live:
        url = live.url.replace("http", "ws") + "/v1/realtime"
        for turn in range(rounds + 1):
            silence_s = config.endpointing.silence_ms / 1000
            record = asyncio.run(_ask(url, clips[turn % len(clips)], turn - 1, silence_s))
            if turn:
                records.append(record)
    return records


async def _ask(url: str, clip: np.ndarray, turn: int, silence_s: float) -> RealtimeRecord:
    pcm16 = (np.clip(clip, -1.0, 32767 / 32768) * 32768).astype("<i2")
    quiet = np.zeros(int(24_000 * TRAILING_S), dtype="<i2")
    audio = np.concatenate([pcm16, quiet])
    step = int(24_000 * PIECE_S)
    async with websockets.connect(url, max_size=None) as ws:
        stopped: float | None = None
        speech_end_s = 0.0  # in the audio sent: where the server heard the speech end
        first_audio = first_word = None
        audio_samples, status = 0, "none"
        answered = asyncio.Event()

        async def read() -> None:
            nonlocal stopped, speech_end_s, first_audio, first_word, audio_samples, status
            async for message in ws:
                event, now = json.loads(message), time.perf_counter()
                kind = event["type"]
                if kind == "input_audio_buffer.speech_stopped" and stopped is None:
                    stopped, speech_end_s = now, event["audio_end_ms"] / 1000 - silence_s
                elif kind == "response.output_audio.delta":
                    first_audio = first_audio or now
                    audio_samples += len(base64.b64decode(event["delta"])) // 2
                elif kind == "response.output_audio_transcript.delta":
                    first_word = first_word or now
                elif kind == "response.done":
                    status = event["response"]["status"]
                    answered.set()
                    return
                elif kind == "error":
                    raise RuntimeError(event["error"]["message"])

        reader = asyncio.create_task(read())
        start = time.perf_counter()
        n = 0
        # The microphone goes on (quiet after the question) until the answer is done.
        while not answered.is_set() and not reader.done():
            piece = audio[n * step : (n + 1) * step]
            if not len(piece):
                piece = np.zeros(step, dtype="<i2")
            msg = {"type": "input_audio_buffer.append", "audio": base64.b64encode(piece).decode()}
            await ws.send(json.dumps(msg))
            n += 1
            await asyncio.sleep(max(0.0, start + n * PIECE_S - time.perf_counter()))
        await reader
    assert stopped is not None and first_audio is not None, "no spoken answer came"
    return RealtimeRecord(
        turn=turn,
        after_speech_stopped_ms=(first_audio - stopped) * 1000,
        # The audio is sent in real time: its second s left the client at start + s.
        after_speech_end_ms=(first_audio - start - speech_end_s) * 1000,
        first_word_ms=(first_word - stopped) * 1000 if first_word else None,
        audio_ms=audio_samples / 24,
        status=status,
    )
