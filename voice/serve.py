"""mlx-harmony-voice serve: the HTTP server (chat completions, models) with the voice
added: the OpenAI Realtime API at /v1/realtime and the browser page at /, on the voice
config's speech models and turn rules."""

from __future__ import annotations

import argparse

from fastapi import FastAPI
from rich.console import Console

from mlx_harmony.llm.cli.serve import build_parser as server_parser
from mlx_harmony.llm.cli.serve import serve
from mlx_harmony.voice.cli import add_config_options, configured, load_voice_models
from mlx_harmony.voice.realtime.app import add_realtime
from mlx_harmony.voice.realtime.protocol import RATE
from mlx_harmony.voice.realtime.session import VoiceKit
from mlx_harmony.voice.turn_scorer import load_turn_scorer
from mlx_harmony.voice.web import add_page


def build_parser() -> argparse.ArgumentParser:
    p = server_parser()
    p.prog, p.description = "mlx-harmony-voice serve", __doc__
    add_config_options(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, highlight=False)
    config, setup = configured(args, console)

    def extend(app: FastAPI) -> None:
        stt, tts = load_voice_models(config, console)
        notice = lambda text: console.print(f"[yellow]warning:[/] {text}")  # noqa: E731
        scorer = load_turn_scorer(config.endpointing, RATE, notice)
        add_realtime(app, VoiceKit(config, stt, tts, scorer))
        add_page(app)

    return serve(args, setup, extend)
