"""mlx-harmony-generate: one prompt in, the answer on stdout, reasoning on stderr or hidden."""

from __future__ import annotations

import argparse
import sys

from llm.cli.common import add_model_options, resolve, run_main
from llm.engine import Engine
from llm.errors import ConfigError
from llm.messages import ChatMessage, TextDelta, TurnDone


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-harmony-generate", description=__doc__)
    p.add_argument("prompt", nargs="?", help="the user message; '-' or absent reads stdin")
    p.add_argument(
        "--reasoning",
        choices=["stderr", "hide"],
        default="hide",
        help="where the analysis channel goes (default: hide)",
    )
    p.add_argument("--stats", action="store_true", help="print timings to stderr at the end")
    add_model_options(p)
    return p


def _main() -> int:
    args = build_parser().parse_args()
    text = args.prompt if args.prompt not in (None, "-") else sys.stdin.read()
    if not text.strip():
        raise ConfigError("empty prompt: give it as an argument or on stdin")
    setup = resolve(args, lambda w: print(f"warning: {w}", file=sys.stderr))
    engine = Engine.load(setup.model, lazy=setup.prompt.lazy)
    last_channel = None
    for event in engine.stream([ChatMessage("user", text.strip())], setup.prompt):
        if isinstance(event, TextDelta):
            if event.channel == "final" and not event.recipient:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif args.reasoning == "stderr":
                sys.stderr.write(event.text)
            last_channel = event.channel
        elif isinstance(event, TurnDone):
            if last_channel is not None:
                sys.stdout.write("\n")
            if args.reasoning == "stderr" and any(m.channel != "final" for m in event.messages):
                sys.stderr.write("\n")
            if args.stats:
                s = event.stats
                print(
                    f"prompt {s.prompt_tokens} tok ({s.cached_tokens} cached) at "
                    f"{s.prefill_tps:.1f} tok/s, ttft {s.time_to_first_token:.3f}s, "
                    f"{s.generated_tokens} tok at {s.decode_tps:.1f} tok/s, "
                    f"finish {event.finish_reason}",
                    file=sys.stderr,
                )
    return 0


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()
