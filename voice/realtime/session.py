"""One Realtime API connection: its session settings, its conversation, the audio the
client appends, and the response being made.

Three parts run side by side, so that none waits for another: the connection's reader
(`handle`, which judges appended audio at once and so can interrupt an answer the moment
the user speaks), the hearing task (speech to text on the model thread, in order), and
the response task (the engine and the text-to-speech on the model thread, streaming
events out). All model work goes through the server's one model worker, in turn with the
HTTP API's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.messages import ChatMessage, FunctionTool, MessageDone, TextDelta, TurnDone
from mlx_harmony.llm.server import ModelSlot, ServerTools
from mlx_harmony.llm.tool_loop import respond
from mlx_harmony.llm.worker import Job
from mlx_harmony.voice.config import VoiceConfig
from mlx_harmony.voice.realtime import protocol as p
from mlx_harmony.voice.realtime.listening import (
    Dropped,
    Ended,
    Listener,
    ListenEvent,
    Speech,
    Started,
)
from mlx_harmony.voice.speakable import SpeakableStream
from mlx_harmony.voice.stt import Transcriber
from mlx_harmony.voice.synthesis import SpeechStream, TextToSpeech
from mlx_harmony.voice.turn_scorer import TurnScorer
from mlx_harmony.voice.vad import make_detector

Send = Callable[[dict[str, Any]], Awaitable[None]]
log = logging.getLogger(__name__)


@dataclass
class VoiceKit:
    """The speech models a server's realtime sessions use, loaded once; one session at a
    time holds them (`busy`), as one microphone stream fits one speech-to-text state."""

    config: VoiceConfig
    stt: Transcriber | None
    tts: TextToSpeech | None
    scorer: TurnScorer | None = None
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def voice(self) -> str:
        return self.config.tts.voice_name


@dataclass
class Entry:
    """A conversation item: its API shape and the messages the engine reads for it."""

    item: dict[str, Any]
    messages: list[ChatMessage]
    speech: SpeechStream | None = None  # an answer's speech, to truncate it by time


@dataclass(frozen=True)
class Frame:
    pcm: np.ndarray


@dataclass(frozen=True)
class SpeechOpened:
    """The answer's speech session, for the response to truncate by time."""

    speech: SpeechStream


@dataclass
class Response:
    id: str
    job: Job | None = None
    task: asyncio.Task | None = None
    reason: str | None = None  # why it was cancelled


@dataclass(frozen=True)
class Commit:
    """The client committed its buffer (no turn detection): transcribe it whole."""

    pcm: np.ndarray
    item_id: str
    event_id: str | None


class RealtimeSession:
    def __init__(self, kit: VoiceKit, slot: ModelSlot, send: Send) -> None:
        self.kit, self.slot, self._send = kit, slot, send
        audio = kit.tts is not None
        self.settings: dict[str, Any] = {
            "instructions": None,
            "output_modalities": ["audio" if audio else "text"],
            "turn_detection": p.TurnDetection() if kit.stt is not None else None,
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
        }
        self.id = p.new_id("sess")
        self.entries: list[Entry] = []
        self.listener: Listener | None = None
        self.buffer: list[np.ndarray] = []  # appended, not committed (client-committed mode)
        self.response: Response | None = None
        self._hearing: asyncio.Queue[tuple[ListenEvent | Commit, str]] = asyncio.Queue()
        self._hearing_task: asyncio.Task | None = None
        self._words = ""  # the utterance's transcript so far
        # One clock reading per utterance: the prompt prefilled while listening and the
        # answer's agree on any date placeholder.
        self._now = datetime.now()
        self._utterance: str | None = None  # its item id, from speech_started on
        self.closed = False

    # ------------------------------------------------------------------ the connection
    async def open(self) -> None:
        self._new_listener()
        self._hearing_task = asyncio.create_task(self._hear())
        await self.send("session.created", session=self.describe())

    async def close(self) -> None:
        """The client left (or the server stops): free the model worker now."""
        self.closed = True
        self._cancel_response("client_closed")
        if self._hearing_task is not None:
            self._hearing_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._hearing_task
        if self.response is not None and self.response.task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.response.task
        if self.kit.stt is not None and self.kit.stt.active:
            await self.slot.worker.call(self.kit.stt.stop)

    async def send(self, kind: str, **fields: Any) -> None:
        if not self.closed:
            await self._send(p.event(kind, **fields))

    async def handle(self, raw: str | bytes) -> None:
        """One client event; a bad one is answered with an `error` event, and the
        connection goes on."""
        event_id = None
        try:
            event = p.parse_event(raw)
            event_id = event.event_id
            await self._dispatch(event)
        except p.EventError as e:
            await self._send(p.error_event(e.message, e.code, e.param, e.event_id or event_id))
        except Exception as e:  # a fault of this server: said, logged, and the session goes on
            log.exception("realtime event failed")
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            await self._send(p.error_event(why, "server_error", None, event_id, "server_error"))

    async def _dispatch(self, event: Any) -> None:
        match event:
            case p.SessionUpdate():
                self._update(event.session)
                await self.send("session.updated", session=self.describe())
            case p.AppendAudio():
                await self._append(p.decode_pcm16(event.audio))
            case p.CommitAudio():
                await self._commit(event.event_id)
            case p.ClearAudio():
                self.buffer.clear()
                self._new_listener()
                await self.send("input_audio_buffer.cleared")
            case p.CreateItem():
                await self._add(self._client_item(event.item), event.previous_item_id)
            case p.TruncateItem():
                await self._truncate(event)
            case p.DeleteItem():
                entry = self._entry(event.item_id, "item_id")
                self.entries.remove(entry)
                await self.send("conversation.item.deleted", item_id=event.item_id)
            case p.CreateResponse():
                if self.response is not None:
                    raise p.EventError(
                        "a response is in progress: cancel it first (response.cancel)",
                        code="conversation_already_has_active_response",
                    )
                self._start_response(event.response)
            case p.CancelResponse():
                if self.response is None:
                    raise p.EventError(
                        "no response is in progress", code="response_cancel_not_active"
                    )
                self._cancel_response("client_cancelled")

    # ------------------------------------------------------------------ settings
    def _update(self, fields: p.SessionFields) -> None:
        """Apply a session.update whole, or (a value this server cannot serve) not at all."""
        s, given = dict(self.settings), fields.model_fields_set
        for name in ("instructions", "output_modalities", "tool_choice", "max_output_tokens"):
            if name in given and getattr(fields, name) is not None:
                s[name] = getattr(fields, name)
        if "tools" in given:
            s["tools"] = fields.tools or []
        if "audio" in s["output_modalities"] and self.kit.tts is None:
            raise p.EventError(
                "session.output_modalities: this server speaks no audio (audio.use_tts is "
                'off): ask for ["text"]',
                "session.output_modalities",
            )
        audio = fields.audio
        voice = audio.output.voice if audio is not None and audio.output is not None else None
        if voice is not None and voice != self.kit.voice:
            raise p.EventError(
                f"session.audio.output.voice: this server speaks with "
                f"'{self.kit.voice}' (tts.voice in its voice config)",
                "session.audio.output.voice",
            )
        heard = audio.input if audio is not None else None
        listening = heard is not None and "turn_detection" in heard.model_fields_set
        if listening:
            assert heard is not None
            if heard.turn_detection is not None and self.kit.stt is None:
                raise p.EventError(
                    "session.audio.input.turn_detection: this server hears no audio "
                    "(audio.use_stt is off)",
                    "session.audio.input.turn_detection",
                )
            s["turn_detection"] = heard.turn_detection
        self.settings = s
        if listening:
            self._new_listener()

    def describe(self) -> dict[str, Any]:
        s = self.settings
        detection = s["turn_detection"]
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": self.slot.default.name,
            "instructions": s["instructions"] or "",
            "output_modalities": s["output_modalities"],
            "audio": {
                "input": {
                    "format": p.FORMAT,
                    "transcription": {"model": self.kit.config.stt.model},
                    "turn_detection": detection.model_dump() if detection else None,
                },
                "output": {"format": p.FORMAT, "voice": self.kit.voice, "speed": 1.0},
            },
            "tools": [t.model_dump() for t in s["tools"]],
            "tool_choice": s["tool_choice"],
            "max_output_tokens": s["max_output_tokens"],
        }

    def _new_listener(self) -> None:
        detection = self.settings["turn_detection"]
        if detection is None:
            self.listener = None
            return
        cfg = self.kit.config
        endpointing = cfg.endpointing
        if detection.threshold is not None and endpointing.detector == "silero":
            endpointing = endpointing.model_copy(update={"speech_threshold": detection.threshold})
        detector = make_detector(endpointing, p.RATE)
        scorer = self.kit.scorer if detection.type == "semantic_vad" else None
        self.listener = Listener(endpointing, cfg.audio.block_ms, detection, detector, scorer)

    # ------------------------------------------------------------------ hearing
    async def _append(self, pcm: np.ndarray) -> None:
        if self.kit.stt is None:
            raise p.EventError("this server hears no audio (audio.use_stt is off)", "audio")
        if self.listener is None:
            self.buffer.append(pcm)
            return
        for ev in self.listener.feed(pcm, lambda: self._words):
            if isinstance(ev, Started):
                self._utterance = p.new_id("item")
                await self.send(
                    "input_audio_buffer.speech_started",
                    audio_start_ms=ev.at_ms,
                    item_id=self._utterance,
                )
                detection = self.settings["turn_detection"]
                if self.response is not None and detection.interrupt_response:
                    self._cancel_response("turn_detected")
            elif isinstance(ev, Ended):
                await self.send(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=ev.at_ms,
                    item_id=self._utterance,
                )
            if self._utterance is not None:
                self._hearing.put_nowait((ev, self._utterance))
            if isinstance(ev, Ended | Dropped):
                self._utterance = None

    async def _commit(self, event_id: str | None) -> None:
        if self.listener is not None:
            raise p.EventError(
                "the server commits the audio itself while turn detection is "
                "on (set turn_detection to null to commit)",
                code="turn_detection_on",
            )
        pcm = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.float32)
        if len(pcm) < p.RATE // 10:
            raise p.EventError(
                "buffer too small: at least 100 ms of audio is needed to commit",
                code="input_audio_buffer_commit_empty",
                event_id=event_id,
            )
        self.buffer.clear()
        item_id = p.new_id("item")
        self._hearing.put_nowait((Commit(pcm, item_id, event_id), item_id))

    async def _hear(self) -> None:
        """Speech to text on the model thread, utterance by utterance, in order. A failure
        is said to the client (`conversation.item.input_audio_transcription.failed`) and
        the next utterance is heard afresh."""
        failed = None  # the rest of an utterance that failed is not heard
        while True:
            ev, item_id = await self._hearing.get()
            if item_id == failed:
                continue
            try:
                await self._hear_one(ev, item_id)
            except Exception as e:
                failed = item_id
                log.exception("realtime transcription failed")
                if self.kit.stt is not None and self.kit.stt.active:
                    await self.slot.worker.call(self.kit.stt.stop)
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                error = {"type": "server_error", "code": "transcription_failed", "message": why}
                await self.send("conversation.item.input_audio_transcription.failed",
                                item_id=item_id, content_index=0, error=error)  # fmt: skip

    async def _hear_one(self, ev: ListenEvent | Commit, item_id: str) -> None:
        stt, worker = self.kit.stt, self.slot.worker
        if stt is None:
            return
        if isinstance(ev, Started | Commit):
            self._words, self._now = "", datetime.now()
            await worker.call(stt.start)
        if isinstance(ev, Dropped):
            await worker.call(stt.stop)
            return
        pcm = ev.preroll if isinstance(ev, Started) else None
        if isinstance(ev, Speech | Commit):
            pcm = ev.pcm
        if pcm is not None and len(pcm):
            piece = await worker.call(lambda: stt.feed(pcm))
            if piece:
                self._words += piece
                await self.send(
                    "conversation.item.input_audio_transcription.delta",
                    item_id=item_id,
                    content_index=0,
                    delta=piece,
                )
                if isinstance(ev, Speech):
                    await self._prefill()
        if isinstance(ev, Ended | Commit):
            silence_s = ev.silence_s if isinstance(ev, Ended) else 0.0
            words = await worker.call(lambda: stt.finish(silence_s))
            await self._heard(item_id, words)

    async def _prefill(self) -> None:
        """While the user speaks, feed the engine the conversation up to the words heard so
        far (`Engine.prefill`, as the daemon does), so that at the end of the turn only the
        last words are left to prefill. Not while an answer runs (the cache is its), nor
        with the server's own tools (their declarations are made with the answer)."""
        prompt, _ = self._prompt(None)
        if (
            not self.kit.config.llm.prefill_while_listening
            or self.response is not None
            or prompt.tools.enabled
        ):
            return
        history = [*self.history(), ChatMessage("user", self._words)]
        conversation = Conversation(history, prompt, now=self._now, tools=self._tools())
        await self.slot.worker.call(lambda: self.slot.engine().prefill(conversation))

    def _tools(self) -> list[FunctionTool]:
        s = self.settings
        if s["tool_choice"] == "none":
            return []
        return [FunctionTool(t.name, t.description, t.parameters) for t in s["tools"]]

    async def _heard(self, item_id: str, words: str) -> None:
        previous = self.entries[-1].item["id"] if self.entries else None
        await self.send("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        content = {"type": "input_audio", "transcript": words}
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [content],
        }
        await self._add(Entry(item, [ChatMessage("user", words)] if words else []), previous)
        await self.send(
            "conversation.item.input_audio_transcription.completed",
            item_id=item_id,
            content_index=0,
            transcript=words,
        )
        detection = self.settings["turn_detection"]
        if words and detection is not None and detection.create_response:
            if self.response is not None:
                self._cancel_response("turn_detected")
                await self._wait_response()
            self._start_response(None)

    # ------------------------------------------------------------------ conversation
    def _client_item(self, item: p.MessageItem | p.FunctionCallOutputItem) -> Entry:
        item_id = item.id or p.new_id("item")
        if isinstance(item, p.FunctionCallOutputItem):
            call = next(
                (e for e in reversed(self.entries) if e.item.get("call_id") == item.call_id), None
            )
            if call is None:
                raise p.EventError(
                    f"item.call_id: no function call '{item.call_id}' in this conversation",
                    "item.call_id",
                )
            shape = {
                "id": item_id,
                "object": "realtime.item",
                "type": "function_call_output",
                "call_id": item.call_id,
                "output": item.output,
                "status": "completed",
            }
            return Entry(
                shape, [ChatMessage("tool", item.output, name=f"functions.{call.item['name']}")]
            )
        text = "".join(c.text for c in item.content)
        kind = "output_text" if item.role == "assistant" else "input_text"
        shape = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": item.role,
            "status": "completed",
            "content": [{"type": kind, "text": text}],
        }
        role = "developer" if item.role == "system" else item.role
        channel = "final" if item.role == "assistant" else None
        return Entry(shape, [ChatMessage(role, text, channel)])

    async def _add(self, entry: Entry, previous_item_id: str | None) -> None:
        if previous_item_id is not None and previous_item_id != (
            self.entries[-1].item["id"] if self.entries else None
        ):
            at = next(
                (i for i, e in enumerate(self.entries) if e.item["id"] == previous_item_id), None
            )
            if at is None:
                raise p.EventError(
                    f"previous_item_id: no item '{previous_item_id}'", "previous_item_id"
                )
            self.entries.insert(at + 1, entry)
        else:
            self.entries.append(entry)
        await self.send(
            "conversation.item.added", previous_item_id=previous_item_id, item=entry.item
        )
        await self.send(
            "conversation.item.done", previous_item_id=previous_item_id, item=entry.item
        )

    def _entry(self, item_id: str, param: str) -> Entry:
        for entry in self.entries:
            if entry.item["id"] == item_id:
                return entry
        raise p.EventError(
            f"{param}: no item '{item_id}' in this conversation", param, "item_not_found"
        )

    async def _truncate(self, event: p.TruncateItem) -> None:
        """The client played `audio_end_ms` of an answer (it was interrupted): the words
        after that were never heard, and leave the conversation."""
        entry = self._entry(event.item_id, "item_id")
        if entry.speech is None or self.kit.tts is None:
            raise p.EventError(
                "item_id: only an answer spoken in this session can be truncated", "item_id"
            )
        frames = event.audio_end_ms * p.RATE // 1000 // self.kit.tts.frame_samples
        heard = entry.speech.heard(frames)
        for part in entry.item["content"]:
            if part.get("type") == "output_audio":
                part["transcript"] = heard
        kept = [m for m in entry.messages if m.channel != "final"]
        entry.messages = [*kept, ChatMessage("assistant", f"{heard} …".strip(), "final")]
        await self.send(
            "conversation.item.truncated",
            item_id=event.item_id,
            content_index=event.content_index,
            audio_end_ms=event.audio_end_ms,
        )

    def history(self) -> list[ChatMessage]:
        return [m for e in self.entries for m in e.messages]

    # ------------------------------------------------------------------ responding
    def _start_response(self, fields: p.ResponseFields | None) -> None:
        response = Response(p.new_id("resp"))
        self.response = response
        response.task = asyncio.create_task(self._respond(response, fields))

    def _cancel_response(self, reason: str) -> None:
        response = self.response
        if response is not None and response.reason is None:
            response.reason = reason
            if response.job is not None:
                response.job.cancelled.set()

    async def _wait_response(self) -> None:
        if self.response is not None and self.response.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.response.task

    def _prompt(self, fields: p.ResponseFields | None) -> tuple[PromptConfig, bool]:
        s = self.settings
        modalities = (fields.output_modalities if fields else None) or s["output_modalities"]
        instructions = (fields.instructions if fields else None) or s["instructions"]
        limit = (fields.max_output_tokens if fields else None) or s["max_output_tokens"]
        prompt = self.slot.default.prompt
        if instructions:
            prompt = prompt.model_copy(update={"developer_instructions": instructions})
        if isinstance(limit, int):
            sampling = prompt.sampling.model_copy(update={"max_tokens": limit})
            prompt = prompt.model_copy(update={"sampling": sampling})
        return prompt, "audio" in modalities and self.kit.tts is not None

    async def _respond(self, response: Response, fields: p.ResponseFields | None) -> None:
        prompt, audio = self._prompt(fields)
        modalities = ["audio"] if audio else ["text"]
        tools = self._tools()
        history, now = self.history(), self._now
        server_side = ServerTools(prompt.tools)
        tts = self.kit.tts if audio else None

        def run(should_stop: Callable[[], bool]) -> Iterator[Any]:
            engine = self.slot.engine()
            try:
                events = respond(
                    engine,
                    history,
                    prompt,
                    server_side.open(),
                    should_stop=should_stop,
                    now=now,
                    tools=tools,
                    start=self.kit.config.llm.reply_start(),
                )
                yield from _with_speech(events, tts, should_stop)
            finally:
                server_side.close()

        response.job = Job(run)
        if response.reason is not None:
            response.job.cancelled.set()  # cancelled before it started
        out = _Output(self, response, audio)
        await self.send("response.created", response=out.shape("in_progress", modalities))
        done: TurnDone | None = None
        failure: str | None = None
        try:
            async for ev in self.slot.worker.submit(response.job):
                if isinstance(ev, Frame):
                    await out.audio(ev.pcm)
                elif isinstance(ev, SpeechOpened):
                    out.speech = ev.speech
                elif isinstance(ev, TextDelta) and ev.kind == "answer":
                    await out.text(ev.text)
                elif isinstance(ev, MessageDone) and not server_side.handles(ev.message.recipient):
                    if (ev.message.recipient or "").startswith("functions."):
                        await out.function_call(ev.message)
                elif isinstance(ev, TurnDone):
                    done = ev
        except Exception as e:  # the engine refused (context full, a token out of range)
            log.exception("realtime response %s failed", response.id)
            failure = str(e).splitlines()[0] if str(e) else type(e).__name__
        await out.finish(done, modalities, failure)
        if self.response is response:
            self.response = None


def _with_speech(
    events: Iterator[Any], tts: TextToSpeech | None, should_stop: Callable[[], bool]
) -> Iterator[Any]:
    """The engine's events with the final channel's speech in between, synthesized as
    the words come (no playout pacing: the client buffers what it is sent)."""
    if tts is None:
        yield from events
        return
    speech, text = tts.session(), SpeakableStream()
    yield SpeechOpened(speech)
    done = None
    for ev in events:
        if isinstance(ev, TurnDone):
            done = ev
            speech.push(text.flush())
            speech.close()
        else:
            yield ev
            final = isinstance(ev, TextDelta) and ev.kind == "answer"
            if final and (words := text.push(ev.text)):
                speech.push(words)
        while speech.ready and not should_stop():
            pcm = speech.step()
            if pcm is not None:
                yield Frame(pcm)
    if done is not None:
        yield done


class _Output:
    """The events of one response's output items, opened as their first part comes."""

    def __init__(self, session: RealtimeSession, response: Response, audio: bool) -> None:
        self.session, self.response, self.audio_out = session, response, audio
        self.items: list[dict[str, Any]] = []
        self.message: dict[str, Any] | None = None
        self.transcript = ""
        self.speech: SpeechStream | None = None

    def shape(
        self,
        status: str,
        modalities: list[str],
        details: dict | None = None,
        usage: dict | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": self.items,
            "output_modalities": modalities,
            "conversation_id": self.session.id,
            "usage": usage,
            "audio": {"output": {"format": p.FORMAT, "voice": self.session.kit.voice}},
        }

    def _where(self) -> dict[str, Any]:
        assert self.message is not None
        return {
            "response_id": self.response.id,
            "item_id": self.message["id"],
            "output_index": len(self.items) - 1,
            "content_index": 0,
        }

    async def _open(self) -> None:
        if self.message is not None:
            return
        kind = "output_audio" if self.audio_out else "output_text"
        part = {"type": kind, "transcript": ""} if self.audio_out else {"type": kind, "text": ""}
        self.message = {
            "id": p.new_id("item"),
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        self.items.append(self.message)
        send = self.session.send
        await send(
            "response.output_item.added",
            response_id=self.response.id,
            output_index=len(self.items) - 1,
            item=self.message,
        )
        await send("response.content_part.added", **self._where(), part=part)

    async def text(self, delta: str) -> None:
        await self._open()
        self.transcript += delta
        kind = (
            "response.output_audio_transcript.delta"
            if self.audio_out
            else ("response.output_text.delta")
        )
        await self.session.send(kind, **self._where(), delta=delta)

    async def audio(self, pcm: np.ndarray) -> None:
        await self._open()
        await self.session.send(
            "response.output_audio.delta", **self._where(), delta=p.encode_pcm16(pcm)
        )

    async def function_call(self, call: ChatMessage) -> None:
        await self._close_message()
        name = (call.recipient or "").removeprefix("functions.")
        item = {
            "id": p.new_id("item"),
            "object": "realtime.item",
            "type": "function_call",
            "status": "completed",
            "call_id": p.new_id("call"),
            "name": name,
            "arguments": call.content,
        }
        self.items.append(item)
        send, at = self.session.send, len(self.items) - 1
        where = {"response_id": self.response.id, "item_id": item["id"], "output_index": at}
        await send(
            "response.output_item.added",
            response_id=self.response.id,
            output_index=at,
            item={**item, "status": "in_progress", "arguments": ""},
        )
        await send(
            "response.function_call_arguments.delta",
            **where,
            call_id=item["call_id"],
            delta=call.content,
        )
        await send(
            "response.function_call_arguments.done",
            **where,
            call_id=item["call_id"],
            name=name,
            arguments=call.content,
        )
        await send(
            "response.output_item.done", response_id=self.response.id, output_index=at, item=item
        )

    async def _close_message(self, status: str = "completed") -> None:
        if self.message is None or self.message["status"] != "in_progress":
            return
        send, where = self.session.send, self._where()
        if self.audio_out:
            part = {"type": "output_audio", "transcript": self.transcript}
            await send("response.output_audio.done", **where)
            await send("response.output_audio_transcript.done", **where, transcript=self.transcript)
        else:
            part = {"type": "output_text", "text": self.transcript}
            await send("response.output_text.done", **where, text=self.transcript)
        await send("response.content_part.done", **where, part=part)
        self.message["content"], self.message["status"] = [part], status
        await send(
            "response.output_item.done",
            response_id=self.response.id,
            output_index=where["output_index"],
            item=self.message,
        )

    async def finish(
        self, done: TurnDone | None, modalities: list[str], failure: str | None
    ) -> None:
        """Close the output, add it to the conversation, and say `response.done`."""
        session, reason = self.session, self.response.reason
        cancelled = reason is not None or (done is not None and done.finish_reason == "cancelled")
        cut = done is not None and done.finish_reason == "length"
        status = (
            "failed"
            if failure
            else "cancelled"
            if cancelled
            else "incomplete"
            if cut
            else "completed"
        )
        await self._close_message("incomplete" if status != "completed" else "completed")
        details = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": reason or "client_cancelled"}
        elif status == "incomplete":
            details = {"type": "incomplete", "reason": "max_output_tokens"}
        elif failure:
            details = {
                "type": "failed",
                "error": {"type": "server_error", "code": "engine_failed", "message": failure},
            }
        usage = None
        if done is not None:
            stats = done.stats
            usage = {
                "total_tokens": stats.prompt_tokens + stats.generated_tokens,
                "input_tokens": stats.prompt_tokens,
                "output_tokens": stats.generated_tokens,
                "input_token_details": {"cached_tokens": stats.cached_tokens},
                "output_token_details": {"text_tokens": stats.generated_tokens, "audio_tokens": 0},
            }
            self._remember(done)
        await session.send("response.done", response=self.shape(status, modalities, details, usage))

    def _remember(self, done: TurnDone) -> None:
        """The response's items join the conversation with the messages the engine made
        for them (reasoning included, which the next prompt may reuse from the cache)."""
        calls = iter([i for i in self.items if i["type"] == "function_call"])
        pending: list[ChatMessage] = []
        for msg in done.messages:
            pending.append(msg)
            if (msg.recipient or "").startswith("functions."):
                if (call := next(calls, None)) is not None:
                    self.session.entries.append(Entry(call, pending))
                pending = []
            elif msg.channel == "final" and self.message is not None:
                self.session.entries.append(Entry(self.message, pending, self.speech))
                pending = []
