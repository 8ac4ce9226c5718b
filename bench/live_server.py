"""The HTTP server on a loopback port, run in a thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from mlx_harmony.llm.http_guard import server_config
from mlx_harmony.llm.server import ServerLimits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, port: int, limits: ServerLimits | None = None) -> None:
        self.port = port
        limits = limits or ServerLimits()
        self.server = uvicorn.Server(
            server_config(
                app,
                "127.0.0.1",
                port,
                limits.header_timeout_s,
                limits.max_connections,
                log_level="warning",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
