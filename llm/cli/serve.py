"""mlx-harmony-server: the engine behind OpenAI's chat-completions API."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_harmony.llm.cli.common import DEFAULT_MODEL, Setup, add_model_options, resolve, run_main
from mlx_harmony.llm.config import load_profiles, load_prompt_config
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.limits import ServerLimits

if TYPE_CHECKING:
    # Loaded when serving: `--help` does not wait for the web framework or MLX.
    import uvicorn
    from fastapi import FastAPI

API_KEY_ENV = "MLX_HARMONY_API_KEY"
PROFILES_ENV = "MLX_HARMONY_PROFILES_FILE"


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a number above zero (a limit of 0 or less is a mistake)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{value:g} is not above zero")
        return value

    return parse


positive_int, positive_float = positive(int), positive(float)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-harmony-server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=f"require this bearer key (or set {API_KEY_ENV})")
    d = ServerLimits()
    p.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes)
    p.add_argument("--max-messages", type=positive_int, default=d.max_messages)
    p.add_argument(
        "--max-tokens-limit",
        type=positive_int,
        default=d.max_tokens,
        help="largest max_tokens a request may ask for",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        default=d.max_prompt_tokens,
        help=f"longest prompt a request may send, in tokens (default {d.max_prompt_tokens})",
    )
    p.add_argument(
        "--header-timeout",
        type=positive_float,
        default=d.header_timeout_s,
        help="seconds a connection has to send its request headers",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=d.max_connections,
        help="open connections at most (idle ones included)",
    )
    p.add_argument(
        "--prompt-configs",
        type=Path,
        metavar="DIR",
        help="prompt configs (*.json) a request may name in its prompt_config field, besides "
        "--prompt-config and the profiles' own",
    )
    add_model_options(p)
    return p


def _main() -> int:
    args = build_parser().parse_args()
    setup = resolve(args, lambda w: print(f"warning: {w}", file=sys.stderr))
    return serve(args, setup)


def serve(
    args: argparse.Namespace, setup: Setup, extend: Callable[[FastAPI], None] | None = None
) -> int:
    """Serve the parsed options; `extend` adds routes (and loads what they need) once the
    chat model is up, before the first client is let in."""
    from mlx_harmony.llm.backends import load_engine
    from mlx_harmony.llm.http_guard import server_config
    from mlx_harmony.llm.server import create_app, offered_prompt_configs, served_from

    # The original tool's variable for a server's profiles, when the flag is absent.
    profiles_file = args.profiles or os.environ.get(PROFILES_ENV)
    profiles = load_profiles(Path(profiles_file)) if profiles_file else {}
    model = args.model or (None if profiles else DEFAULT_MODEL)
    served = served_from(model, profiles, setup.prompt, load_prompt_config, setup.remote)
    offered = [str(setup.prompt_path)] if setup.prompt_path else []
    offered += [p.prompt_config for p in profiles.values() if p.prompt_config]
    if args.prompt_configs is not None:
        if not args.prompt_configs.is_dir():
            raise ConfigError(f"--prompt-configs {args.prompt_configs}: not a folder")
        offered += [str(f) for f in sorted(args.prompt_configs.glob("*.json"))]
    prompt_configs = offered_prompt_configs(offered, load_prompt_config)
    limits = ServerLimits(
        args.max_body_bytes,
        args.max_messages,
        args.max_tokens_limit,
        args.max_prompt_tokens,
        args.header_timeout,
        args.max_connections,
    )
    # Bound before anything loads: a port in use is said at once, not after the model.
    listener = bind(args.host, args.port)
    print(f"Loading {served[0].model} …", file=sys.stderr)
    first = served[0]
    engine = load_engine(
        first.model, lazy=first.prompt.lazy, remote=first.remote, debug=setup.debug
    )
    # Before serving, so that the first client's request does not pay MLX's kernel
    # compiles (minutes on a fresh NVIDIA machine). Here on the main thread: the compiled
    # kernels serve every thread; the cache it leaves is emptied.
    started = time.perf_counter()
    if engine.warmup(first.prompt):
        print(f"Warmed up the model in {time.perf_counter() - started:.1f}s.", file=sys.stderr)
    key = args.api_key or os.environ.get(API_KEY_ENV)
    app = create_app(
        served,
        api_key=key,
        limits=limits,
        preloaded=engine,
        prompt_configs=prompt_configs,
        debug=setup.debug,
    )
    if extend is not None:
        extend(app)
    config = server_config(
        app, args.host, args.port, limits.header_timeout_s, limits.max_connections,
        log_level="info",
    )  # fmt: skip
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with
    # the handler it found: by then the work is done, so both end in a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: None)
    with contextlib.suppress(KeyboardInterrupt):
        _announcing_server(config).run(sockets=[listener])
    return 0


def _announcing_server(config: uvicorn.Config) -> uvicorn.Server:
    """A uvicorn server that says where it listens (uvicorn does only for a socket it made
    itself)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and sockets:
                host, port = sockets[0].getsockname()[:2]
                where = f"[{host}]" if ":" in host else host
                print(f"Serving on http://{where}:{port} (Ctrl-C stops)", file=sys.stderr,
                      flush=True)  # fmt: skip

    return Server(config)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or one line on why it cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"--host {host}: {e.strerror or e}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})"
        ) from None
    return sock


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()
