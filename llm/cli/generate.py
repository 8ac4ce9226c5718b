"""mlx-harmony-generate: one prompt in, the answer on stdout, reasoning on stderr or hidden."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import datetime

from mlx_harmony.llm.backends import load_engine
from mlx_harmony.llm.cli.common import add_model_options, resolve, run_main
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.messages import (
    ChatMessage,
    Event,
    TextDelta,
    ToolCall,
    ToolResult,
    TurnDone,
    empty_turn_notice,
)
from mlx_harmony.llm.tool_loop import respond
from mlx_harmony.llm.tools.toolbox import Toolbox, conversation_workspace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-harmony-generate", description=__doc__)
    p.add_argument("prompt", nargs="?", help="the user message; '-' or absent reads stdin")
    p.add_argument("-p", "--prompt", dest="prompt_option", metavar="TEXT", help="the same")
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
    given = args.prompt_option or args.prompt
    text = given if given not in (None, "-") else sys.stdin.read()
    if not text.strip():
        raise ConfigError("empty prompt: give it as an argument or on stdin")
    setup = resolve(args, lambda w: print(f"warning: {w}", file=sys.stderr))
    engine = load_engine(
        setup.model, lazy=setup.prompt.lazy, remote=setup.remote, debug=setup.debug
    )
    tools = setup.prompt.tools
    stamp = f"generate-{datetime.now():%Y%m%d-%H%M%S}"
    toolbox = Toolbox(tools, conversation_workspace(tools, stamp)) if tools.enabled else None
    try:
        history = [ChatMessage("user", text.strip())]
        _print_turn(respond(engine, history, setup.prompt, toolbox), args)
    finally:
        if toolbox is not None:
            toolbox.close()
    return 0


def _print_turn(events: Iterator[Event], args: argparse.Namespace) -> None:
    """The answer on stdout; reasoning and tool calls on stderr if asked."""
    last_channel = None
    reasoning_open = False  # reasoning written on stderr, its line not yet ended
    for event in events:
        if isinstance(event, ToolCall | ToolResult) and args.reasoning == "stderr":
            who = event.message.recipient if isinstance(event, ToolCall) else event.message.name
            arrow = "→" if isinstance(event, ToolCall) else "←"
            sys.stderr.write(f"\n{arrow} {who}\n{event.message.content.rstrip()}\n")
        elif isinstance(event, TextDelta):
            if event.kind == "answer":
                if reasoning_open:  # on a terminal both streams share the screen
                    sys.stderr.write("\n")
                    reasoning_open = False
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif args.reasoning == "stderr":
                sys.stderr.write(event.text)
                sys.stderr.flush()
                reasoning_open = not event.text.endswith("\n")
            last_channel = event.channel
        elif isinstance(event, TurnDone):
            if last_channel is not None:
                sys.stdout.write("\n")
            if (notice := empty_turn_notice(event)) is not None:
                print(notice, file=sys.stderr)
            if reasoning_open:
                sys.stderr.write("\n")
                reasoning_open = False
            if args.stats:
                s = event.stats
                print(
                    f"prompt {s.prompt_tokens} tok ({s.cached_tokens} cached) at "
                    f"{s.prefill_tps:.1f} tok/s, ttft {s.time_to_first_token:.3f}s, "
                    f"{s.generated_tokens} tok at {s.decode_tps:.1f} tok/s, "
                    f"finish {event.finish_reason}",
                    file=sys.stderr,
                )


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()
