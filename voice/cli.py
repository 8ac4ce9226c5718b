"""mlx-harmony-voice: the hands-free voice assistant (text chat with --text or no microphone).

Also `mlx-harmony-voice ctl …` (control a running assistant) and `mlx-harmony-voice
service …` (run it in the background from login on).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType, NoneType, UnionType
from typing import TYPE_CHECKING, Annotated, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo
from rich.console import Console
from rich.text import Text

from mlx_harmony.llm.chatlog import hold_chat_log
from mlx_harmony.llm.cli.common import Setup, add_model_options, resolve, run_main, show_opened
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.voice import ctl, service
from mlx_harmony.voice.config import (
    SECTIONS,
    VoiceConfig,
    apply_override,
    check_local_paths,
    load_voice_config,
    spoken_prompt,
)
from mlx_harmony.voice.control import ControlServer, Loading, default_socket_path
from mlx_harmony.voice.logfile import log_to_file

# The models, the audio and the daemon are imported where they are used: `--help`, `ctl`
# and `service` do not wait seconds for MLX, mlx-lm and transformers to load.
if TYPE_CHECKING:
    from mlx_harmony.llm.backends import ChatEngine
    from mlx_harmony.llm.config import PromptConfig
    from mlx_harmony.llm.session import Session
    from mlx_harmony.voice.daemon import TurnTimings
    from mlx_harmony.voice.stt import Transcriber
    from mlx_harmony.voice.synthesis import TextToSpeech

FLAG_SECTIONS = [s for s in SECTIONS if s != "llm"]  # the llm section uses the chat's flags


class TerminalReporter:
    """A compact status line per state change, the conversation, and per-turn timings."""

    def __init__(self, console: Console, show_reasoning: bool, status: bool) -> None:
        self.console, self.show_reasoning, self.show_status = console, show_reasoning, status
        self._answering = False
        self._thinking = False
        self._deferred: str | None = None
        self._partial = False  # a line of words heard so far is on screen

    def status(self, state: str) -> None:
        if self._answering:
            self._deferred = state  # shown once the answer's line is complete
            return
        self._end_line()
        if self.show_status:
            self.console.print(Text(f"● {state}", style="dim"))

    def partial(self, text: str) -> None:
        """The words heard so far, rewritten in place (a terminal only)."""
        if not (self.show_status and self.console.is_terminal):
            return
        width = max(10, self.console.width - 4)
        shown = text if len(text) <= width else "…" + text[-(width - 1) :]
        self.console.file.write("\r\x1b[2K" + (f"… {shown}" if shown else ""))
        self.console.file.flush()
        self._partial = bool(shown)

    def heard(self, text: str) -> None:
        self._end_line()
        self.console.print(Text(f"You: {text}", style="bold"))

    def reasoning(self, text: str) -> None:
        if self.show_reasoning:
            if not self._thinking:
                self.console.print(Text("(thinking) ", style="dim italic"), end="")
                self._thinking = True
            self.console.print(Text(text, style="dim italic"), end="")

    def answer(self, text: str) -> None:
        if self._thinking:
            self.console.print()
            self._thinking = False
        self._answering = True
        self.console.print(text, end="", markup=False, highlight=False)

    def answer_done(self) -> None:
        deferred = self._deferred
        self._end_line()
        if deferred is not None:
            self.status(deferred)

    def notice(self, text: str) -> None:
        self._end_line()
        self.console.print(Text(text, style="yellow"))

    def turn_done(self, timings: TurnTimings) -> None:
        self._end_line()
        parts = [] if timings.typed else [f"transcript {timings.transcript_ms:.0f}"]
        for name, value in (
            ("first token", timings.first_token_ms),
            ("first final", timings.first_final_ms),
            ("first audio", timings.first_audio_ms),
        ):
            if value is not None:
                parts.append(f"{name} {value:.0f}")
        since = "the question" if timings.typed else "speech end"
        self.console.print(Text(f"  ms after {since}: " + ", ".join(parts), style="dim"))

    def _end_line(self) -> None:
        if self._partial:
            self.partial("")
        if self._answering or self._thinking:
            self.console.print()
        self._answering = self._thinking = False
        self._deferred = None


def add_config_options(p: argparse.ArgumentParser) -> None:
    """The voice config and its overrides, as every voice command takes them."""
    p.add_argument("--config", type=Path, help="voice config JSON (see audio_configs/)")
    p.add_argument(
        "--set",
        metavar="SECTION.FIELD=VALUE",
        action="append",
        default=[],
        help="override any config field, e.g. --set endpointing.silence_ms=500",
    )


def configured(args: argparse.Namespace, console: Console) -> tuple[VoiceConfig, Setup]:
    """The voice config (ignored fields said as warnings) and the chat's model setup."""
    config, ignored = voice_config(args)
    for name in ignored:
        console.print(f"[yellow]warning:[/] {args.config}: field '{name}' is ignored")
    return config, llm_setup(args, config, console)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-harmony-voice", description=__doc__)
    add_config_options(p)
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument(
        "--list-voices", action="store_true", help="list the voices of tts.voice_repo and exit"
    )
    p.add_argument("--text", action="store_true", help="text chat on the same engine and config")
    p.add_argument("--chat", type=Path, help="chat log to resume or create")
    p.add_argument(
        "--control-socket",
        type=Path,
        help=f"where `ctl` reaches it (default {default_socket_path()})",
    )
    p.add_argument("--no-control", action="store_true", help="no control socket")
    p.add_argument("--log-file", type=Path, help="everything it prints goes here, rotated")
    add_model_options(p)
    for section in FLAG_SECTIONS:
        group = p.add_argument_group(f"{section} (config section '{section}')")
        for name, field in SECTIONS[section].model_fields.items():
            flag = f"--{section}-{name}".replace("_", "-")
            dest = f"cfg__{section}__{name}"
            kinds = get_args(field.annotation) or (field.annotation,)
            about = flag_help(field)
            if bool in kinds:
                group.add_argument(
                    flag, dest=dest, action=argparse.BooleanOptionalAction, help=about
                )
            else:
                group.add_argument(flag, dest=dest, metavar=metavar(field), help=about)
    return p


def metavar(field: FieldInfo) -> str:
    """The value a config flag takes, from the field's type: its choices, or its kind."""
    top = field.annotation
    union = get_origin(top) in (Union, UnionType)
    kinds = [k for k in (get_args(top) if union else (top,)) if k is not NoneType]
    kinds = [get_args(k)[0] if get_origin(k) is Annotated else k for k in kinds]
    choices = [str(c) for k in kinds if get_origin(k) is Literal for c in get_args(k)]
    names = {int: "INT", float: "NUMBER", str: "TEXT"}
    words = [
        names.get(k, "LIST" if get_origin(k) is list else "VALUE")
        for k in kinds
        if get_origin(k) is not Literal
    ]
    if choices and not words:
        return "{" + ",".join(choices) + "}"
    return "|".join(dict.fromkeys([*choices, *words]))


def flag_help(field: FieldInfo) -> str:
    """The field's description and its default, as the config file would hold it."""
    default = json.dumps(field.get_default(call_default_factory=True))
    return f"{field.description or ''} (default: {default})".strip().replace("%", "%%")


def voice_config(args: argparse.Namespace) -> tuple[VoiceConfig, list[str]]:
    config, ignored = load_voice_config(args.config) if args.config else (VoiceConfig(), [])
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            _, section, name = key.split("__")
            config = apply_override(config, f"{section}.{name}", value)
    for item in args.set:
        dotted, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        config = apply_override(config, dotted.strip(), value.strip())
    return config, ignored


def llm_setup(args: argparse.Namespace, config: VoiceConfig, console: Console) -> Setup:
    """The chat's model/profile/prompt resolution, with the voice config's llm section as
    defaults for the flags."""
    llm = config.llm
    args.model = args.model or llm.model
    args.profile = args.profile or llm.profile
    args.profiles = args.profiles or (Path(llm.profiles) if llm.profiles else None)
    args.prompt_config = args.prompt_config or (
        Path(llm.prompt_config) if llm.prompt_config else None
    )
    return resolve(args, lambda w: console.print(f"[yellow]warning:[/] {w}"))


def open_session(
    engine: ChatEngine, prompt: PromptConfig, setup: Setup, log_path: Path, console: Console
) -> Session:
    """The chat log at `log_path` resumed (what reading it found, said), or a new one."""
    from mlx_harmony.llm.session import Session

    prompt_path = str(setup.prompt_path) if setup.prompt_path else None
    session = Session(engine, prompt, log_path, setup.model, prompt_path)
    opened = session.resume_or_start()
    if opened is not None:
        show_opened(opened, console)
    return session


def load_voice_models(
    config: VoiceConfig, console: Console
) -> tuple[Transcriber | None, TextToSpeech | None]:
    from mlx_harmony.voice.stt import Transcriber
    from mlx_harmony.voice.synthesis import load_tts

    stt = tts = None
    if config.audio.use_stt:
        with console.status(f"Loading speech to text {config.stt.model} …"):
            stt = Transcriber.load(
                config.stt.model,
                quantize=config.stt.quantize,
                temperature=config.stt.temperature,
                max_seconds=config.endpointing.max_utterance_s + 1,
            )
            stt.warmup()
    t = config.tts
    if not config.audio.use_tts:
        return stt, None
    with console.status(f"Loading text to speech {t.model} …"):
        tts = load_tts(t)
        tts.warmup()
    with console.status("Timing text to speech on this machine …"):
        speed = tts.calibrate(t.codebooks == "auto", t.min_codebooks, t.realtime_margin)
    # Printed, so also in the --log-file log.
    console.print(f"Text to speech: {speed.describe()}")
    return stt, tts


def _main() -> int:
    args = build_parser().parse_args()
    if args.log_file:
        log_to_file(args.log_file.expanduser())
    console = Console(highlight=False)
    if args.list_devices:
        from mlx_harmony.voice.audio_io import list_devices

        print(list_devices())
        return 0
    config, ignored = voice_config(args)
    for name in ignored:
        console.print(f"[yellow]warning:[/] {args.config}: field '{name}' is ignored")
    if args.list_voices:
        from mlx_harmony.voice.synthesis import describe_voices

        print(describe_voices(config.tts))
        return 0
    if not args.text:
        check_local_paths(config, str(args.config) if args.config else "voice settings")
    from mlx_harmony.llm.backends import load_engine
    from mlx_harmony.llm.cli.chat import chat_log_path
    from mlx_harmony.llm.distributed import is_follower

    setup = llm_setup(args, config, console)
    log_path = args.chat or (Path(config.llm.chat_log) if config.llm.chat_log else None)
    log_path = chat_log_path(log_path, setup.prompt.chats_dir)
    if not is_follower():  # before the models load: another process may be writing it
        hold_chat_log(log_path)
    voice = not args.text and (config.audio.use_stt or config.audio.use_tts)

    # Up before the models load: a second instance is refused at once, and `ctl status`
    # says "loading" meanwhile.
    control = None
    if voice and not args.no_control:
        about = {
            "pid": os.getpid(),
            "started": time.time(),
            "model": setup.model,
            "config": str(args.config.resolve()) if args.config else None,
        }
        control = ControlServer(args.control_socket or default_socket_path(), Loading(), about)
        control.open()
    try:
        started = time.perf_counter()
        with console.status(f"Loading {setup.model} …"):
            engine = load_engine(
                setup.model, lazy=setup.prompt.lazy, remote=setup.remote, debug=setup.debug
            )
        console.print(f"[dim]Loaded {setup.model} in {time.perf_counter() - started:.1f}s.[/]")
        if not voice:
            return text_chat(engine, setup, log_path, console, config)
        return voice_assistant(args, config, engine, setup, log_path, console, control)
    finally:
        if control is not None:
            control.close()


def voice_assistant(
    args: argparse.Namespace,
    config: VoiceConfig,
    engine: ChatEngine,
    setup: Setup,
    log_path: Path,
    console: Console,
    control: ControlServer | None,
) -> int:
    from mlx_harmony.voice.audio_io import MODEL_RATE, AudioError
    from mlx_harmony.voice.daemon import VoiceAssistant
    from mlx_harmony.voice.turn_scorer import load_turn_scorer
    from mlx_harmony.voice.typed_input import read_typed_lines
    from mlx_harmony.voice.vad import make_detector

    stt, tts = load_voice_models(config, console)
    prompt = spoken_prompt(setup.prompt, config.llm)
    started = time.perf_counter()
    with console.status("Warming up the model …"):
        warmed = engine.warmup(prompt)
    if warmed:
        console.print(f"[dim]Warmed up the model in {time.perf_counter() - started:.1f}s.[/]")
    detector = make_detector(config.endpointing, sample_rate=MODEL_RATE)
    scorer = None
    if stt is not None:
        scorer = load_turn_scorer(
            config.endpointing, MODEL_RATE, lambda line: console.print(f"[yellow]{line}[/]")
        )
    status = config.display.status
    reporter = TerminalReporter(
        console, config.display.show_reasoning, console.is_terminal if status is None else status
    )
    assistant = VoiceAssistant(
        config, engine, prompt, stt, tts, detector,
        open_session(engine, prompt, setup, log_path, console), reporter, turn_scorer=scorer,
    )  # fmt: skip
    try:
        assistant.open()
    except AudioError as e:
        assistant.close()
        console.print(f"[yellow]No usable audio device: {e}[/]")
        console.print("[yellow]Falling back to the text chat.[/]")
        if control is not None:
            control.close()  # the text chat takes no orders from outside
        return text_chat(engine, setup, log_path, console, config)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if control is not None:
        control.handler = assistant
    if sys.stdin is not None and not sys.stdin.closed:
        read_typed_lines(sys.stdin, assistant.submit, stop.set, console.print)
    how = "Listening. Speak or type" if stt is not None else "Ready. Type"
    console.print(f"[dim]{how} a question (\\help: commands); Ctrl-C quits.[/]")
    assistant.serve(stop)
    console.print(f"[dim]Chat saved to {log_path}[/]")
    return 0


def text_chat(
    engine: ChatEngine, setup: Setup, log_path: Path, console: Console, config: VoiceConfig
) -> int:
    from mlx_harmony.llm.cli.chat import ChatSession, repl

    session = ChatSession(
        engine, setup, log_path, console, show_reasoning=config.display.show_reasoning
    )
    console.print("[dim]Text chat. Type \\help for commands, Ctrl-D quits.[/]")
    repl(session, console)
    return 0


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["ctl"]:
        run_main(lambda: ctl.main(argv[1:]))
    elif argv[:1] == ["service"]:
        run_main(lambda: service.main(argv[1:]))
    elif argv[:1] == ["wyoming"]:
        from mlx_harmony.voice import wyoming_server  # the wyoming package, only when asked for

        run_main(lambda: wyoming_server.main(argv[1:]))
    elif argv[:1] == ["serve"]:
        from mlx_harmony.voice import serve  # the HTTP server's imports, only when serving

        run_main(lambda: serve.main(argv[1:]))
    else:
        run_main(_main)


if __name__ == "__main__":
    main()
