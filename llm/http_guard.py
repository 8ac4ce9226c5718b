"""The HTTP server's guard against clients that hold connections without asking anything.

uvicorn closes idle keep-alive connections after a response, but a connection that never
completes its first request's headers stays open for ever, and nothing caps how many are
open: 1,500 silent connections held 1,509 descriptors of the server. Its h11 protocol is
therefore extended with a header deadline and a connection cap (uvicorn has neither).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

# How long a stopping server lets requests finish before it cancels them.
GRACEFUL_SHUTDOWN_S = 3


def guarded_h11(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    class GuardedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()  # refused: too many open already
                return
            self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self._header_timer is not None:
                self._header_timer.cancel()  # the request's headers are complete
                self._header_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

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
