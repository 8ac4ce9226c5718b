"""OpenAI-compatible HTTP server on the engine (FastAPI).

Routes: POST /v1/chat/completions (JSON or server-sent events), GET /v1/models, GET /health.
Generation runs on the one model-owning worker thread (llm.worker); the event loop only
waits for its events, so requests queue without blocking each other's I/O, and a client
that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_harmony.llm.backends import ChatEngine, load_engine
from mlx_harmony.llm.config import PromptConfig, RemoteConfig
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.debug_log import DebugLog
from mlx_harmony.llm.errors import ConfigError, RuntimeFailure
from mlx_harmony.llm.limits import ServerLimits
from mlx_harmony.llm.messages import Event, MessageDone, TextDelta, TurnDone
from mlx_harmony.llm.openai_api import (
    ChatCompletionRequest,
    ErrorResponse,
    StopMatcher,
    chunk,
    finish_reason,
    new_id,
    tool_call_of,
    usage,
)
from mlx_harmony.llm.tool_loop import respond
from mlx_harmony.llm.tools.config import ToolsConfig
from mlx_harmony.llm.tools.toolbox import Toolbox
from mlx_harmony.llm.tools.tree import remove_tree
from mlx_harmony.llm.worker import Job, ModelWorker


@dataclass
class ServedModel:
    """A name clients may ask for, and how to serve it."""

    name: str
    model: str
    prompt: PromptConfig
    remote: RemoteConfig | None = None  # relay to this server instead of loading the model


class ModelSlot:
    """The one model worker and the model loaded on it: one model in memory at a time,
    switched on the worker thread when a request names another. Routes added beside the
    HTTP API reach it as `app.state.models`; the app's lifespan starts and stops the
    worker."""

    def __init__(
        self,
        default: ServedModel,
        load: Callable[[ServedModel], ChatEngine],
        api_key: str | None,
        limits: ServerLimits,
        preloaded: ChatEngine | None = None,
    ) -> None:
        self.default, self.api_key, self.limits = default, api_key, limits
        self._load = load
        self._engine = preloaded
        self.loaded: str | None = default.model if preloaded is not None else None
        self._worker: ModelWorker | None = None

    def start(self) -> None:
        self._worker = ModelWorker()

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    @property
    def worker(self) -> ModelWorker:
        if self._worker is None:
            raise RuntimeError("the model worker runs while the app is served (its lifespan)")
        return self._worker

    @property
    def pending(self) -> int:
        return self._worker.pending if self._worker is not None else 0

    def engine_for(self, entry: ServedModel) -> ChatEngine:
        """Runs on the worker thread: load (or switch to) the model a request named."""
        if self.loaded != entry.model or self._engine is None:
            # Drop the old model first, so two are never in memory at once.
            self._engine, self.loaded = None, None
            engine = self._load(entry)
            # As at start-up: the first request to a model switched to does not pay its
            # kernel compiles token by token.
            engine.warmup(entry.prompt)
            self._engine, self.loaded = engine, entry.model
        return self._engine

    def engine(self) -> ChatEngine:
        """The default model's engine (on the worker thread)."""
        return self.engine_for(self.default)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status,
            message,
            param,
            kind,
            code,
        )

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status)


# Paths anyone may read: the health check, and the browser page, which asks for the key.
OPEN_PATHS = ("/health", "/", "/favicon.ico")
OPEN_PREFIXES = ("/web/",)
# Browsers cannot set headers on a WebSocket: they offer the key as a subprotocol, as
# OpenAI's own browser clients do ("openai-insecure-api-key.<key>").
KEY_SUBPROTOCOL = "openai-insecure-api-key."


class ApiKey:
    """The bearer key on every route but the open ones, WebSockets included. Plain ASGI:
    a `BaseHTTPMiddleware` in the chain would hide a client's disconnect from the request
    (its receive wrapper cannot answer without waiting), and a queued request could no
    longer be cancelled."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app, self.key = app, key
        self.expected = f"Bearer {key}".encode() if key else None

    def _allowed(self, scope: Scope) -> bool:
        if self.expected is None or scope["type"] not in ("http", "websocket"):
            return True
        path = scope["path"]
        if scope["type"] == "http" and (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
            return True
        headers = dict(scope["headers"])
        if hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return True
        offered = headers.get(b"sec-websocket-protocol", b"").decode("latin-1").split(",")
        keys = [p.strip().removeprefix(KEY_SUBPROTOCOL) for p in offered]
        wanted = (self.key or "").encode()
        return scope["type"] == "websocket" and any(
            hmac.compare_digest(k.encode("latin-1"), wanted) for k in keys if k
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._allowed(scope):
            if scope["type"] == "websocket":  # refused before the upgrade: an HTTP 403
                return await send({"type": "websocket.close", "code": 1008})
            refused = ApiError(
                401, "invalid or missing API key", kind="authentication_error",
                code="invalid_api_key",
            )  # fmt: skip
            return await refused.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses bodies over the limit with OpenAI's error shape: by their declared length
    before reading, else (chunked bodies) as soon as more arrives than the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = ApiError(413, f"request body over {self.limit} bytes", code="body_too_large")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_big.response()(scope, receive, send)
        # Read the whole body here (it is small: at most the limit), so that an oversized
        # chunked one is a 413 rather than a parse error deep inside the framework.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await too_big.response()(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later: disconnect notices

        await self.app(scope, replay, send)


def create_app(
    served: list[ServedModel],
    load: Callable[[ServedModel], ChatEngine] | None = None,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    preloaded: ChatEngine | None = None,
    prompt_configs: dict[str, PromptConfig] | None = None,
    debug: DebugLog | None = None,
) -> FastAPI:
    """The app; `preloaded` is the engine of the first served model, if already loaded;
    `prompt_configs` are those a request may name in its `prompt_config` field; `debug`
    logs every prompt and raw response of each model it loads (`--debug`)."""
    limits = limits or ServerLimits()
    prompt_configs = prompt_configs or {}
    by_name = {s.name: s for s in served}
    default = served[0]
    load = load or (
        lambda s: load_engine(s.model, lazy=s.prompt.lazy, remote=s.remote, debug=debug)
    )
    slot = ModelSlot(default, load, api_key, limits, preloaded)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        slot.start()
        try:
            yield
        finally:
            slot.stop()

    app = FastAPI(title="mlx-harmony", version="0.1.0", lifespan=lifespan)
    app.state.models = slot
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(ApiKey, key=api_key)  # outermost: nothing is read before the key

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":  # its loc is the character, not a field
            where = first["loc"][-1] if len(first["loc"]) > 1 else None
            why = (first.get("ctx") or {}).get("error", "JSON decode error")
            at = f" (at character {where})" if isinstance(where, int) else ""
            return ApiError(400, f"the request body is not valid JSON: {why}{at}").response()
        loc = [str(p) for p in first["loc"] if p != "body"]
        param = ".".join(loc) or None
        why = str(first["msg"]).removeprefix("Value error, ")
        msg = f"{param}: {why}" if param else why
        return ApiError(400, msg, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), kind="invalid_request_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "loaded_model": slot.loaded, "queued": slot.pending}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {
                "id": s.name,
                "object": "model",
                "created": 0,
                "owned_by": "mlx-harmony",
                "root": s.model,
                "loaded": s.model == slot.loaded,
            }
            for s in served
        ]
        return {"object": "list", "data": data}

    errors = {
        status: {"model": ErrorResponse, "description": what}
        for status, what in [
            (400, "invalid request (the field is named in `param`)"),
            (401, "missing or wrong API key"),
            (404, "unknown model"),
            (413, "body too large"),
        ]
    }

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={
            200: {
                "description": "a chat.completion object, or chat.completion.chunk events "
                "(text/event-stream) when `stream` is true"
            },
            **errors,
        },
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        entry = _pick(body.model)
        if body.profile is not None:
            if body.profile not in by_name:
                known = ", ".join(by_name)
                raise ApiError(404, f"profile '{body.profile}' is not served (known: {known})",
                               "profile", code="model_not_found")  # fmt: skip
            if body.model is not None and _pick(body.model) is not by_name[body.profile]:
                raise ApiError(400, "model and profile name different models", "profile")
            entry = by_name[body.profile]
        if len(body.messages) > limits.max_messages:
            raise ApiError(400, f"messages: at most {limits.max_messages}", "messages")
        if body.output_limit and body.output_limit > limits.max_tokens:
            raise ApiError(400, f"max_tokens: at most {limits.max_tokens}", "max_tokens")
        prompt = entry.prompt
        if body.prompt_config is not None:
            if body.prompt_config not in prompt_configs:
                known = ", ".join(sorted(prompt_configs)) or "none"
                raise ApiError(400, f"prompt_config '{body.prompt_config}' is not offered by "
                               f"this server (known: {known})", "prompt_config")  # fmt: skip
            prompt = prompt_configs[body.prompt_config]
        if body.reasoning_effort:
            prompt = prompt.model_copy(update={"reasoning_effort": body.reasoning_effort})
        try:
            sampling = body.sampling(prompt.sampling)
            sampling = type(sampling).model_validate(sampling.model_dump())
        except ValueError as e:
            raise ApiError(400, str(e).splitlines()[0]) from None
        history, tools = body.conversation(), body.function_tools()
        try:
            forced = body.forced_call()
        except ValueError as e:
            raise ApiError(400, str(e), "tool_choice") from None

        if prompt.tools.apply_patch and any(t.name == "apply_patch" for t in tools):
            raise ApiError(400, "tools: apply_patch is a server-side tool here", "tools")
        server_side = ServerTools(prompt.tools)

        def run(should_stop: Callable[[], bool]) -> Iterator[Event]:
            engine = slot.engine_for(entry)
            size = engine.prompt_size(Conversation(history, prompt, tools=tools))
            if size is not None and size > limits.max_prompt_tokens:
                raise ConfigError(
                    f"messages: the prompt is {size} tokens, over this server's limit of "
                    f"{limits.max_prompt_tokens} (--max-prompt-tokens)"
                )
            try:
                yield from respond(
                    engine,
                    history,
                    prompt,
                    server_side.open(),
                    sampling=sampling,
                    should_stop=should_stop,
                    tools=tools,
                    start=forced,
                )
            finally:
                server_side.close()

        job = Job(run)
        cid = new_id("chatcmpl")
        # From now on a client that leaves cancels the job, also while it waits in the
        # queue (it is then skipped) or before its first event.
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            events = await _started(slot.worker.submit(job))
        except BaseException:
            watcher.cancel()
            raise
        if body.stream:
            stream = _sse(events, job, cid, entry.name, body, server_side.handles)
            return StreamingResponse(_cancelling(stream, watcher), media_type="text/event-stream")
        try:
            return JSONResponse(
                await _complete(events, job, cid, entry.name, body, server_side.handles)
            )
        finally:
            watcher.cancel()

    def _pick(name: str | None) -> ServedModel:
        if name is None or name == default.name:
            return default
        if name in by_name:
            return by_name[name]
        for s in served:
            if s.model == name:
                return s
        raise ApiError(404, f"model '{name}' does not exist", "model", code="model_not_found")

    return app


async def _cancelling(stream: AsyncIterator[str], watcher: asyncio.Task) -> AsyncIterator[str]:
    try:
        async for part in stream:
            yield part
    finally:
        watcher.cancel()


async def _started(events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Wait for the first event, so that a request the engine refuses (a token id outside
    the vocabulary, a conversation over the context limit) is a 400, not a broken 200."""
    try:
        first = await anext(events)
    except StopAsyncIteration:  # cancelled before it ran: its client has gone
        raise ApiError(499, "the client closed the request", code="client_closed") from None
    except RuntimeFailure as e:  # the backend behind this server (a remote one) failed
        # First: an unreachable remote is the server's configuration, not the request's.
        raise ApiError(502, str(e), kind="upstream_error", code="upstream_failed") from None
    except ConfigError as e:  # the conversation, unless the error names a request field
        param = e.field if e.field in ChatCompletionRequest.model_fields else "messages"
        raise ApiError(400, str(e), param) from None

    async def chained() -> AsyncIterator[Any]:
        yield first
        async for event in events:
            yield event

    return chained()


async def _watch_disconnect(request: Request, job: Job) -> None:
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancelled.set()
            return
        await asyncio.sleep(0.1)


class ServerTools:
    """Built-in tools the server runs itself for one request, in a workspace of its own
    (the configured folder, else a temporary one removed after the request)."""

    def __init__(self, config: ToolsConfig) -> None:
        self.config = config
        self._toolbox: Toolbox | None = None
        self._tmp: str | None = None

    def open(self) -> Toolbox | None:
        if not self.config.enabled:
            return None
        if self.config.workspace:
            workspace = Path(self.config.workspace).expanduser()
        else:
            self._tmp = tempfile.mkdtemp(prefix="mlx-harmony-request-")
            workspace = Path(self._tmp)
        self._toolbox = Toolbox(self.config, workspace)
        return self._toolbox

    def handles(self, recipient: str | None) -> bool:
        return self._toolbox is not None and self._toolbox.handles(recipient)

    def close(self) -> None:
        if self._toolbox is not None:
            self._toolbox.close()
        if self._tmp is not None:
            remove_tree(Path(self._tmp))  # however deep the code made it


@dataclass(frozen=True)
class _Answer:
    text: str  # cut at the first stop sequence


@dataclass(frozen=True)
class _Reasoning:
    text: str


@dataclass(frozen=True)
class _ReasoningMessage:
    """A whole message on the reasoning channel (a call the server's own tools run is one
    too: its code is part of how the answer was reached)."""

    text: str


@dataclass(frozen=True)
class _Call:
    index: int
    call: dict[str, Any]  # a tool call the client runs, in the API's shape


@dataclass(frozen=True)
class _Finish:
    done: TurnDone
    reason: str  # the API's finish_reason


_Piece = _Answer | _Reasoning | _ReasoningMessage | _Call | _Finish


async def _interpret(
    events: AsyncIterator[Any],
    job: Job,
    body: ChatCompletionRequest,
    server_side: Callable[[str | None], bool],
) -> AsyncIterator[_Piece]:
    """What a turn's events mean to an OpenAI client, worked out once for the JSON and the
    streamed rendering: the answer cut at the first stop sequence (the job cancelled there),
    the reasoning, the calls the client runs (not those the server's own tools answer), the
    end."""
    stop = StopMatcher(body.stop)  # type: ignore[arg-type]
    calls = 0
    async for event in events:
        match event:
            case TextDelta(kind="answer"):
                text = stop.feed(event.text)
                if stop.hit:
                    job.cancelled.set()
                if text:
                    yield _Answer(text)
            case TextDelta(kind="reasoning"):
                yield _Reasoning(event.text)
            case MessageDone(message=msg) if msg.role == "assistant":
                if msg.channel == "analysis":
                    yield _ReasoningMessage(msg.content)
                elif not server_side(msg.recipient) and (call := tool_call_of(msg)):
                    yield _Call(calls, call)
                    calls += 1
            case TurnDone():
                if rest := stop.flush():
                    yield _Answer(rest)
                yield _Finish(event, finish_reason(event.finish_reason, calls > 0))


async def _complete(
    events: AsyncIterator[Any],
    job: Job,
    cid: str,
    model: str,
    body: ChatCompletionRequest,
    server_side: Callable[[str | None], bool],
) -> dict[str, Any]:
    answer: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    finish: _Finish | None = None
    async for piece in _interpret(events, job, body, server_side):
        match piece:
            case _Answer(text):
                answer.append(text)
            case _ReasoningMessage(text):
                reasoning.append(text)
            case _Call(_, call):
                calls.append(call)
            case _Finish():
                finish = piece
    assert finish is not None
    message: dict[str, Any] = {"role": "assistant", "content": "".join(answer) or None}
    if reasoning:
        message["reasoning_content"] = "\n\n".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish.reason}],
        "usage": _usage(finish.done),
    }


def _usage(done: TurnDone) -> dict[str, Any]:
    s = done.stats
    return usage(s.prompt_tokens, s.generated_tokens, s.reasoning_tokens, s.cached_tokens)


async def _sse(
    events: AsyncIterator[Any],
    job: Job,
    cid: str,
    model: str,
    body: ChatCompletionRequest,
    server_side: Callable[[str | None], bool],
) -> AsyncIterator[str]:
    try:
        yield chunk(cid, model, {"role": "assistant", "content": ""})
        async for piece in _interpret(events, job, body, server_side):
            match piece:
                case _Answer(text):
                    yield chunk(cid, model, {"content": text})
                case _Reasoning(text):
                    yield chunk(cid, model, {"reasoning_content": text})
                case _Call(index, call):
                    yield chunk(cid, model, {"tool_calls": [{"index": index, **call}]})
                case _Finish(done, reason):
                    yield chunk(cid, model, {}, reason)
                    if body.stream_options and body.stream_options.include_usage:
                        usage_chunk = {
                            "id": cid,
                            "object": "chat.completion.chunk",
                            "created": int(time.time()),
                            "model": model,
                            "choices": [],
                            "usage": _usage(done),
                        }
                        yield f"data: {json.dumps(usage_chunk)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as exc:  # headers are sent: report the failure inside the stream
        err = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(err)}\n\n"
    finally:
        job.cancelled.set()


def offered_prompt_configs(
    paths: list[str], load_prompt: Callable[[str], PromptConfig]
) -> dict[str, PromptConfig]:
    """The prompt configs requests may name: each file by its path as configured, its
    file name and its name without `.json`."""
    offered: dict[str, PromptConfig] = {}
    for path in dict.fromkeys(paths):
        config = load_prompt(path)
        for key in (path, Path(path).name, Path(path).stem):
            offered.setdefault(key, config)
    return offered


def served_from(
    model: str | None,
    profiles: dict[str, Any],
    prompt: PromptConfig,
    load_prompt: Callable[[str], PromptConfig],
    remote: RemoteConfig | None = None,
) -> list[ServedModel]:
    """The models a server offers: each profile, or the one --model."""
    out = []
    if model:
        out.append(ServedModel(model, model, prompt, remote))
    for name, p in profiles.items():
        entry_prompt = load_prompt(p.prompt_config) if p.prompt_config else PromptConfig()
        if p.tools is not None:
            entry_prompt = entry_prompt.model_copy(update={"tools": p.tools})
        out.append(ServedModel(name, p.model, entry_prompt, p.remote))
    if not out:
        raise ConfigError("nothing to serve: give --model or --profiles")
    return out
