"""The Realtime API's event shapes (its generally available version), as far as this
server speaks them: client events are validated with pydantic, server events are dicts
built here so that every one carries the fields the official SDK reads.

Session fields this server does not act on (noise reduction, tracing, prompt templates,
truncation) are accepted and ignored, as clients written for OpenAI send them; a field of
the wrong type, or a value this server cannot serve, is an `error` event naming it.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

RATE = 24_000  # PCM16 mono, in and out, as the API's "audio/pcm" format
FORMAT = {"type": "audio/pcm", "rate": RATE}


class EventError(Exception):
    """A client event refused: said to the client as an `error` event."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value",
                 event_id: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.code, self.event_id = message, param, code, event_id


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AudioFormat(_Lenient):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000] = RATE


class TurnDetection(_Lenient):
    """`server_vad`: the silence rule; `semantic_vad`: the turn model and hold words
    (`voice.realtime.listening`)."""

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(None, ge=0, le=2000)
    silence_duration_ms: int | None = Field(None, ge=50, le=10_000)
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"
    create_response: bool = True
    interrupt_response: bool = True


class Transcription(_Lenient):
    model: str | None = None
    language: str | None = None


class InputAudio(_Lenient):
    format: AudioFormat | None = None
    transcription: Transcription | None = None
    turn_detection: TurnDetection | None = None


class OutputAudio(_Lenient):
    format: AudioFormat | None = None
    voice: str | None = None
    speed: float | None = Field(None, gt=0)


class Audio(_Lenient):
    input: InputAudio | None = None
    output: OutputAudio | None = None


class FunctionDef(_Lenient):
    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str = ""
    parameters: dict[str, Any] | None = None


Modalities = list[Literal["text", "audio"]]


class SessionFields(_Lenient):
    type: Literal["realtime"] = "realtime"
    model: str | None = None
    instructions: str | None = None
    output_modalities: Modalities | None = Field(None, min_length=1, max_length=1)
    audio: Audio | None = None
    tools: list[FunctionDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | None = None
    max_output_tokens: int | Literal["inf"] | None = None


class ResponseFields(_Lenient):
    instructions: str | None = None
    output_modalities: Modalities | None = Field(None, min_length=1, max_length=1)
    max_output_tokens: int | Literal["inf"] | None = None
    conversation: Literal["auto", "none"] = "auto"


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text", "text", "output_text"]
    text: str


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system"]
    content: list[InputText] = Field(min_length=1)


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str


Item = Annotated[MessageItem | FunctionCallOutputItem, Field(discriminator="type")]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_id: str | None = None


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionFields


class AppendAudio(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str


class CommitAudio(_Event):
    type: Literal["input_audio_buffer.commit"]


class ClearAudio(_Event):
    type: Literal["input_audio_buffer.clear"]


class CreateItem(_Event):
    type: Literal["conversation.item.create"]
    previous_item_id: str | None = None
    item: Item


class TruncateItem(_Event):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = Field(0, ge=0)
    audio_end_ms: int = Field(ge=0)


class DeleteItem(_Event):
    type: Literal["conversation.item.delete"]
    item_id: str


class CreateResponse(_Event):
    type: Literal["response.create"]
    response: ResponseFields | None = None


class CancelResponse(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = None


ClientEvent = Annotated[
    SessionUpdate | AppendAudio | CommitAudio | ClearAudio | CreateItem | TruncateItem
    | DeleteItem | CreateResponse | CancelResponse,
    Field(discriminator="type"),
]  # fmt: skip
_CLIENT_EVENT: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
KNOWN_TYPES = (
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
    "input_audio_buffer.clear", "conversation.item.create", "conversation.item.truncate",
    "conversation.item.delete", "response.create", "response.cancel",
)  # fmt: skip


def parse_event(raw: str | bytes) -> ClientEvent:
    """One client event from its JSON text, or an EventError naming what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise EventError(f"the event is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise EventError("an event is a JSON object", code="invalid_event")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    if kind not in KNOWN_TYPES:
        raise EventError(
            f"unknown event type {kind!r} (this server speaks: {', '.join(KNOWN_TYPES)})",
            "type", "invalid_event", event_id,
        )  # fmt: skip
    try:
        return _CLIENT_EVENT.validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        # The discriminator's own name is the first part of loc for tagged unions.
        loc = [str(p) for p in first["loc"] if p not in (kind, "message", "function_call_output")]
        param = ".".join(loc) or None
        why = str(first["msg"]).removeprefix("Value error, ")
        raise EventError(f"{kind}: {param}: {why}" if param else f"{kind}: {why}", param,
                         event_id=event_id) from None  # fmt: skip


def decode_pcm16(audio: str) -> np.ndarray:
    """Base64 PCM16 (little-endian) as float32 samples in [-1, 1)."""
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise EventError("audio: not valid base64", "audio") from None
    if len(raw) % 2:
        raise EventError("audio: PCM16 has two bytes a sample; got an odd count", "audio")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def encode_pcm16(pcm: np.ndarray) -> str:
    clipped = np.clip(pcm, -1.0, 32767 / 32768)
    return base64.b64encode((clipped * 32768).astype("<i2").tobytes()).decode("ascii")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "event_id": new_id("event"), **fields}


def error_event(
    message: str,
    code: str | None = None,
    param: str | None = None,
    event_id: str | None = None,
    kind: str = "invalid_request_error",
) -> dict[str, Any]:
    about = {"type": kind, "code": code, "message": message, "param": param}
    return event("error", error={**about, "event_id": event_id})
