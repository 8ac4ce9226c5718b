"""What the HTTP server accepts, in a module of its own: the commands' argument parsers
show the defaults without loading the web framework."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerLimits:
    max_body_bytes: int = 1_000_000
    max_messages: int = 512
    max_tokens: int = 16_384
    # A long prompt costs prefill time before anything else can run (1 MB ≈ 76 s on a
    # laptop): above this a request is refused before it is prefilled.
    max_prompt_tokens: int = 32_768
    # Connections that have not sent their request headers within this time are closed,
    # and at most this many connections are open at once (idle keep-alives included).
    header_timeout_s: float = 10.0
    max_connections: int = 256
