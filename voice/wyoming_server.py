"""mlx-harmony-voice wyoming: the Wyoming protocol for Home Assistant's Assist pipeline,
offering the voice config's speech-to-text, its text-to-speech voice, and the Harmony
engine as a conversation agent (`handle`), each usable on its own.

All model work runs on one model worker thread (`llm.worker`), as in the HTTP server:
connections wait their turn for it, and one that goes away mid-answer cancels its work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
from rich.console import Console
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop
from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    Describe,
    HandleModel,
    HandleProgram,
    Info,
    TtsProgram,
    TtsVoice,
)
from wyoming.server import AsyncEventHandler, AsyncServer
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
)

from mlx_harmony.llm.backends import ChatEngine, load_engine
from mlx_harmony.llm.cli.common import add_model_options
from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.messages import ChatMessage, TextDelta, TurnDone
from mlx_harmony.llm.tool_loop import respond
from mlx_harmony.llm.worker import Job, ModelWorker
from mlx_harmony.voice.cli import add_config_options, configured, load_voice_models
from mlx_harmony.voice.config import VoiceConfig
from mlx_harmony.voice.speakable import SpeakableStream
from mlx_harmony.voice.stt import Transcriber
from mlx_harmony.voice.synthesis import TextToSpeech

RATE, WIDTH, CHANNELS = 24_000, 2, 1  # what the Kyutai models hear and speak
KYUTAI = Attribution(name="Kyutai", url="https://kyutai.org")
PROJECT = Attribution(name="mlx-harmony", url="https://github.com/")
# Conversations kept by id (Home Assistant's conversation_id), the oldest forgotten.
CONVERSATIONS = 32


class Service:
    """What every connection shares: the models, their one worker thread, and the
    conversations by id."""

    def __init__(
        self,
        config: VoiceConfig,
        engine: ChatEngine,
        prompt: PromptConfig,
        model_name: str,
        stt: Transcriber | None,
        tts: TextToSpeech | None,
    ) -> None:
        self.config, self.engine, self.prompt, self.model_name = config, engine, prompt, model_name
        self.stt, self.tts = stt, tts
        self.worker = ModelWorker()
        self.hearing = asyncio.Lock()  # one transcription at a time: the STT has one stream
        self.conversations: OrderedDict[str, list[ChatMessage]] = OrderedDict()

    def info(self) -> Info:
        c = self.config
        asr = [AsrProgram(
            name="kyutai-stt", description="Kyutai streaming speech to text (MLX)",
            attribution=KYUTAI, installed=True, version=None,
            models=[AsrModel(name=c.stt.model, description=c.stt.model, attribution=KYUTAI,
                             installed=True, version=None, languages=["en", "fr"])],
            supports_transcript_streaming=True,
        )] if self.stt is not None else []  # fmt: skip
        pocket = c.tts.backend == "pocket"
        tts = [TtsProgram(
            name=f"{c.tts.backend}-tts",
            description=f"Kyutai {'Pocket TTS' if pocket else 'streaming text to speech'} (MLX)",
            attribution=KYUTAI, installed=True, version=None,
            voices=[TtsVoice(name=c.tts.voice_name, description=f"{c.tts.model}: "
                             f"{c.tts.voice_name}", attribution=KYUTAI, installed=True,
                             version=None, languages=["en"] if pocket else ["en", "fr"])],
            supports_synthesize_streaming=True,
        )] if self.tts is not None else []  # fmt: skip
        handle = [HandleProgram(
            name="mlx-harmony", description="the Harmony chat engine on MLX",
            attribution=PROJECT, installed=True, version=None,
            models=[HandleModel(name=self.model_name, description=self.model_name,
                                attribution=PROJECT, installed=True, version=None,
                                languages=["en"])],
            supports_handled_streaming=True,
        )]  # fmt: skip
        return Info(asr=asr, tts=tts, handle=handle)

    def history(self, conversation: str | None) -> list[ChatMessage]:
        if conversation is None:
            return []
        history = self.conversations.pop(conversation, [])
        self.conversations[conversation] = history
        while len(self.conversations) > CONVERSATIONS:
            self.conversations.popitem(last=False)
        return history

    async def close(self) -> None:
        await asyncio.to_thread(self.worker.close)


class Handler(AsyncEventHandler):
    """One Wyoming connection."""

    def __init__(self, service: Service, *args: Any) -> None:
        super().__init__(*args)
        self.service = service
        self.converter = AudioChunkConverter(rate=RATE, width=WIDTH, channels=CHANNELS)
        self.transcribing = False
        self.streaming_transcript = False
        self.speech: list[str] | None = None  # streamed text to speak (synthesize-start)
        self.jobs: list[Job] = []

    async def handle_event(self, event: Event) -> bool:
        try:
            await self._handle(event)
        except ConfigError as e:  # a request this server cannot serve: said in one line
            await self.write_event(Error(text=str(e), code="refused").event())
        return True

    async def disconnect(self) -> None:
        for job in self.jobs:  # gone mid-answer: the worker is freed at its next step
            job.cancelled.set()
        if self.transcribing and self.service.stt is not None:
            self.transcribing = False
            await self.service.worker.call(self.service.stt.stop)
            self.service.hearing.release()

    async def _handle(self, event: Event) -> None:
        s = self.service
        if Describe.is_type(event.type):
            await self.write_event(s.info().event())
        elif Transcribe.is_type(event.type):
            self._need(s.stt, "speech to text", "audio.use_stt")
            self.streaming_transcript = True
        elif AudioStart.is_type(event.type) and s.stt is not None:
            if not self.transcribing:  # a second start begins the utterance again
                await s.hearing.acquire()
            self.transcribing = True
            await s.worker.call(s.stt.start)
            if self.streaming_transcript:
                await self.write_event(TranscriptStart().event())
        elif AudioChunk.is_type(event.type) and self.transcribing:
            assert s.stt is not None
            chunk = self.converter.convert(AudioChunk.from_event(event))
            pcm = np.frombuffer(chunk.audio, dtype="<i2").astype(np.float32) / 32768.0
            piece = await s.worker.call(partial(s.stt.feed, pcm))
            if piece and self.streaming_transcript:
                await self.write_event(TranscriptChunk(text=piece).event())
        elif AudioStop.is_type(event.type) and self.transcribing:
            assert s.stt is not None
            text = await s.worker.call(s.stt.finish)
            self.transcribing = False
            s.hearing.release()
            if self.streaming_transcript:
                await self.write_event(TranscriptStop().event())
            await self.write_event(Transcript(text=text).event())
        elif Transcript.is_type(event.type):
            transcript = Transcript.from_event(event)
            await self._answer(transcript.text, (transcript.context or {}).get("conversation_id"))
        elif Synthesize.is_type(event.type):
            self._need(s.tts, "text to speech", "audio.use_tts")
            synthesize = Synthesize.from_event(event)
            self._voice(synthesize.voice.name if synthesize.voice else None)
            if self.speech is None:  # within a stream, the full text repeats what was sent
                await self._speak(iter([synthesize.text]))
        elif SynthesizeStart.is_type(event.type):
            self._need(s.tts, "text to speech", "audio.use_tts")
            start = SynthesizeStart.from_event(event)
            self._voice(start.voice.name if start.voice else None)
            self.speech = []
        elif SynthesizeChunk.is_type(event.type) and self.speech is not None:
            self.speech.append(SynthesizeChunk.from_event(event).text)
        elif SynthesizeStop.is_type(event.type) and self.speech is not None:
            text, self.speech = "".join(self.speech), None
            await self._speak(iter([text]))
            await self.write_event(SynthesizeStopped().event())

    @staticmethod
    def _need(model: object, what: str, field: str) -> None:
        if model is None:
            raise ConfigError(f"this server offers no {what} ({field} is off)")

    def _voice(self, name: str | None) -> None:
        voice = self.service.config.tts.voice_name
        if name is not None and name != voice:
            raise ConfigError(f"voice '{name}' is not served here: this server speaks with "
                              f"'{voice}' (tts.voice in its voice config)")  # fmt: skip

    async def _speak(self, texts: Iterator[str]) -> None:
        """Audio for the text, streamed as it is synthesized."""
        tts = self.service.tts
        assert tts is not None

        def run(should_stop: Callable[[], bool]) -> Iterator[np.ndarray]:
            session, stream = tts.session(), SpeakableStream()
            for text in texts:
                session.push(stream.push(text))
            session.push(stream.flush())
            session.close()
            while not session.done and not should_stop():
                if (frame := session.step()) is not None:
                    yield frame

        await self.write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())
        job = Job(run)
        self.jobs.append(job)
        async for frame in self.service.worker.submit(job):
            pcm = (np.clip(frame, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()
            await self.write_event(AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS,
                                              audio=pcm).event())  # fmt: skip
        self.jobs.remove(job)
        await self.write_event(AudioStop().event())

    async def _answer(self, text: str, conversation: str | None) -> None:
        """The engine's answer to what was said: its final channel, streamed."""
        s = self.service
        history = s.history(conversation)
        user = ChatMessage("user", text)

        def run(should_stop: Callable[[], bool]) -> Iterator[Any]:
            yield from respond(s.engine, [*history, user], s.prompt, should_stop=should_stop,
                               start=s.config.llm.reply_start())  # fmt: skip

        job = Job(run)
        self.jobs.append(job)
        context = {"conversation_id": conversation} if conversation else None
        await self.write_event(HandledStart(context=context).event())
        answer, done = "", None
        async for ev in s.worker.submit(job):
            if isinstance(ev, TextDelta) and ev.kind == "answer":
                answer += ev.text
                await self.write_event(HandledChunk(text=ev.text).event())
            elif isinstance(ev, TurnDone):
                done = ev
        self.jobs.remove(job)
        await self.write_event(HandledStop().event())
        await self.write_event(Handled(text=answer, context=context).event())
        if done is not None and conversation is not None:
            history += [user, *done.messages]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-harmony-voice wyoming", description=__doc__)
    p.add_argument("--uri", default="tcp://127.0.0.1:10300",
                   help="where to listen (default tcp://127.0.0.1:10300)")  # fmt: skip
    add_config_options(p)
    add_model_options(p)
    return p


async def serve(uri: str, service: Service, ready: Callable[[], None] | None = None) -> None:
    try:
        server = AsyncServer.from_uri(uri)
    except ValueError as e:
        raise ConfigError(f"--uri {uri}: {e}") from None
    try:
        await server.start(lambda reader, writer: Handler(service, reader, writer))
        if ready is not None:
            ready()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
    finally:
        await server.stop()
        await service.close()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, highlight=False)
    config, setup = configured(args, console)
    console.print(f"Loading {setup.model} …")
    engine = load_engine(setup.model, lazy=setup.prompt.lazy, remote=setup.remote)
    engine.warmup(setup.prompt)
    stt, tts = load_voice_models(config, console)
    service = Service(config, engine, setup.prompt, setup.model, stt, tts)
    ready = partial(console.print, f"Serving Wyoming on {args.uri} (Ctrl-C stops)")

    async def until_stopped() -> None:
        # Ctrl-C or a service manager's SIGTERM: the server closes and the worker stops.
        main, loop = asyncio.current_task(), asyncio.get_running_loop()
        assert main is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, main.cancel)
        await serve(args.uri, service, ready)

    asyncio.run(until_stopped())
    return 0
