"""The Realtime API's route on the HTTP server: `GET /v1/realtime` upgraded to a
WebSocket, one voice session at a time on the server's model worker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from mlx_harmony.llm.server import ModelSlot
from mlx_harmony.voice.realtime import protocol as p
from mlx_harmony.voice.realtime.session import RealtimeSession, VoiceKit

# WebSocket close codes: the session ended because another holds the speech models, or
# the client asked for a model this server does not serve.
TRY_AGAIN_LATER = 1013
POLICY = 1008


def add_realtime(app: FastAPI, kit: VoiceKit) -> None:
    slot: ModelSlot = app.state.models

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket, model: str | None = None) -> None:
        offered = websocket.headers.get("sec-websocket-protocol", "")
        protocols = [s.strip() for s in offered.split(",")]
        await websocket.accept(subprotocol="realtime" if "realtime" in protocols else None)
        lock = asyncio.Lock()

        async def send(event: dict[str, Any]) -> None:
            async with lock:  # the reader, hearing and response tasks all send
                await websocket.send_text(json.dumps(event))

        served = (slot.default.name, slot.default.model)
        if model is not None and model not in served:
            why = f"model '{model}' is not served here: its realtime model is '{served[0]}'"
            await send(p.error_event(why, "model_not_found", "model"))
            return await websocket.close(POLICY)
        if kit.busy.locked():
            why = ("another realtime session is using the speech models; this server holds "
                   "one at a time: try again when it ends")  # fmt: skip
            await send(p.error_event(why, "session_busy", kind="server_error"))
            return await websocket.close(TRY_AGAIN_LATER)
        async with kit.busy:
            session = RealtimeSession(kit, slot, send)
            try:
                await session.open()
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    raw = message.get("text") or message.get("bytes") or b""
                    await session.handle(raw)
            except WebSocketDisconnect:
                pass
            finally:
                await session.close()
