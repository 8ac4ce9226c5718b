"""The HTTP server's guard against clients that hold connections without asking anything.

uvicorn closes idle keep-alive connections after a response, but a connection that never
completes its first request's headers stays open for ever, and nothing caps how many are
open: 1,500 silent connections held 1,509 descriptors of the server. Its h11 protocol is
therefore extended with a header deadline and a connection cap (uvicorn has neither), and
a body deadline: forty connections that sent their headers and then no body held every
slot, and `/health` stopped answering. Past the cap a few more connections are let in
for `/health` alone, so a full server still says it is alive.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

# How long a stopping server lets requests finish before it cancels them.
GRACEFUL_SHUTDOWN_S = 3
# Connections past the cap that may still ask GET /health (and nothing else).
HEALTH_RESERVE = 8
HEALTH_PATH = "/health"
BUSY = json.dumps(
    {"error": {"message": "the server is at its connection limit; try again later",
               "type": "server_busy", "param": None, "code": None}}
).encode()  # fmt: skip


def health_only(app: Any) -> Any:
    """The app as a connection in the reserve sees it: /health, else 503 and close."""

    async def reserve(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == HEALTH_PATH:
            await app(scope, receive, send)
            return
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": BUSY})

    return reserve


def guarded_h11(
    header_timeout_s: float, max_connections: int, body_timeout_s: float | None = None
) -> type[H11Protocol]:
    body_timeout = header_timeout_s if body_timeout_s is None else body_timeout_s

    class GuardedH11(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _timed: object = None  # the request whose body the timer waits for

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections + HEALTH_RESERVE:
                transport.close()  # refused: too many open already
                return
            if len(self.connections) > max_connections:
                self.app = health_only(self.app)
            self._timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self.cycle is not self._timed:
                # A request's headers are complete: now its body has a deadline.
                self._timed = self.cycle
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = self.loop.call_later(body_timeout, self._body_too_slow)

        def handle_websocket_upgrade(self, event: Any) -> None:
            # The connection is a WebSocket's from here on (its own protocol, with its
            # pings): the header deadline, still running, would cut it.
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._timer = None
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def _body_too_slow(self) -> None:
            self._timer = None
            if self.cycle is self._timed and self.cycle is not None and self.cycle.more_body:
                self.transport.close()  # the app's receive() then reports a disconnect

    return GuardedH11


def server_config(
    app: Any, host: str, port: int, header_timeout_s: float, max_connections: int, **kw: Any
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_h11(header_timeout_s, max_connections),  # type: ignore[arg-type]
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        **kw,
    )
