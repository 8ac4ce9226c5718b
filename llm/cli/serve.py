"""mlx-harmony-server: the engine behind OpenAI's chat-completions API."""

from __future__ import annotations

import argparse
import os
import sys

from llm.backends import load_engine
from llm.cli.common import DEFAULT_MODEL, add_model_options, resolve, run_main
from llm.config import load_profiles, load_prompt_config
from llm.server import ServerLimits, create_app, served_from

API_KEY_ENV = "MLX_HARMONY_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-harmony-server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=f"require this bearer key (or set {API_KEY_ENV})")
    p.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes)
    p.add_argument("--max-messages", type=int, default=ServerLimits.max_messages)
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=ServerLimits.max_tokens,
        help="largest max_tokens a request may ask for",
    )
    add_model_options(p)
    return p


def _main() -> int:
    import uvicorn

    args = build_parser().parse_args()
    setup = resolve(args, lambda w: print(f"warning: {w}", file=sys.stderr))
    profiles = load_profiles(args.profiles) if args.profiles else {}
    model = args.model or (None if profiles else DEFAULT_MODEL)
    served = served_from(model, profiles, setup.prompt, load_prompt_config, setup.remote)
    limits = ServerLimits(args.max_body_bytes, args.max_messages, args.max_tokens_limit)
    print(f"Loading {served[0].model} …", file=sys.stderr)
    first = served[0]
    engine = load_engine(first.model, lazy=first.prompt.lazy, remote=first.remote)
    key = args.api_key or os.environ.get(API_KEY_ENV)
    app = create_app(served, api_key=key, limits=limits, preloaded=engine)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()
