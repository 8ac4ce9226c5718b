"""mlx-harmony-chat: interactive text chat on the engine, with a crash-safe chat log."""

from __future__ import annotations

import argparse
import contextlib
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from mlx_harmony.llm.chatlog import Chat, hold_chat_log, load_chat_log, release_chat_log
from mlx_harmony.llm.cli.common import (
    Setup,
    add_model_options,
    apply_overrides,
    resolve,
    run_main,
    show_opened,
)
from mlx_harmony.llm.cli.multiline import read_message
from mlx_harmony.llm.config import SamplingParams
from mlx_harmony.llm.errors import ConfigError, HarmonyError, first_error
from mlx_harmony.llm.messages import (
    ChatMessage,
    TextDelta,
    ToolCall,
    ToolResult,
    TurnDone,
    empty_turn_notice,
)
from mlx_harmony.llm.session import Session
from mlx_harmony.llm.tool_loop import respond

if TYPE_CHECKING:
    # Loaded when used: `--help` does not wait for them (httpx, MLX, rich's markdown).
    from rich.live import Live
    from rich.markdown import Markdown

    from mlx_harmony.llm.backends import ChatEngine

HELP = {
    "help": "this list",
    "quit": "save and leave (also \\exit, Ctrl-D)",
    "save [PATH]": "save the chat log (to PATH from now on, if given)",
    "load PATH": "open a chat log and continue its active chat",
    "reset": "start a new chat in the same log (also \\new)",
    "chats [N]": "list the chats in this log, or continue chat N (a number or an id)",
    "retry": "generate the last answer again",
    "undo": "remove the last exchange",
    "history": "print the conversation",
    "set NAME=VALUE": "change a sampling setting or reasoning_effort",
    "show": "model, settings and log file",
    "reasoning [on|off]": "show or hide the model's reasoning",
    "markdown [on|off]": "render answers as markdown or plain text",
}
TOOL_PREVIEW_LINES = 6
LAST_EXCHANGE_CHARS = 200  # of each message shown when a chat is resumed
ALIASES = {"exit": "quit", "new": "reset", "q": "quit", "h": "help", "?": "help"}


def chats_folder(chats_dir: str | None) -> Path:
    if chats_dir:
        return Path(chats_dir).expanduser()
    return Path.home() / ".local" / "share" / "mlx-harmony" / "chats"


def default_log_path(chats_dir: str | None) -> Path:
    return chats_folder(chats_dir) / f"chat-{datetime.now():%Y%m%d-%H%M%S}.json"


def chat_log_path(given: Path | None, chats_dir: str | None) -> Path:
    """`--chat`: a path, or (as in the original tool) a bare name of a log in the chats
    folder, `.json` optional; no `--chat`: a new log there."""
    if given is None:
        return default_log_path(chats_dir)
    if given.exists() or len(given.parts) > 1:
        return given
    folder = chats_folder(chats_dir)
    for candidate in (folder / given.name, folder / f"{given.name}.json"):
        if candidate.exists():
            return candidate
    return folder / (given.name if given.suffix == ".json" else f"{given.name}.json")


class Interrupt:
    """Ctrl-C while generating ends that generation; a second Ctrl-C quits as usual."""

    def __init__(self) -> None:
        self.hit = False

    def __enter__(self) -> Callable[[], bool]:
        self.hit = False
        self._old = signal.signal(signal.SIGINT, self._handle)
        return lambda: self.hit

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.hit = True
        signal.signal(signal.SIGINT, self._old)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._old)


class ChatSession:
    def __init__(
        self,
        engine: ChatEngine,
        setup: Setup,
        log_path: Path,
        console: Console,
        show_reasoning: bool = True,
        markdown: bool = True,
        flags: Callable[[SamplingParams], SamplingParams] | None = None,
    ) -> None:
        self.engine, self.setup, self.console = engine, setup, console
        # The command line's sampling flags, applied over a resumed log's settings.
        self.flags = flags or (lambda sampling: sampling)
        self.show_reasoning, self.markdown = show_reasoning, markdown
        prompt_path = str(setup.prompt_path) if setup.prompt_path else None
        self.session = Session(engine, setup.prompt, log_path, setup.model, prompt_path)
        if log_path.exists():
            self._open(log_path)
        else:
            self._new_chat()

    @property
    def chat(self) -> Chat:
        return self.session.chat

    @property
    def log_path(self) -> Path:
        return self.session.log_path

    # --------------------------------------------------------------- log handling
    def _open(self, path: Path) -> None:
        show_opened(self.session.open(path), self.console)
        meta = self.chat.metadata
        self._restore_settings(meta.last_hyperparameters, path)
        for what, before, now in (
            ("model", meta.last_model_path, self.setup.model),
            ("prompt config", meta.last_prompt_config_path, self.setup.prompt_path),
        ):
            if before and str(before) != str(now or ""):
                self.console.print(f"[dim]This chat was last held with {what} {before}.[/]")
        meta.last_model_path = self.setup.model
        meta.last_prompt_config_path = str(self.setup.prompt_path or "") or None
        n = len(self.chat.messages)
        self.console.print(f"[dim]Resumed {path} ({n} messages, model {self.setup.model}).[/]")
        self._show_last_exchanges()

    def _restore_settings(self, settings: dict[str, Any], path: Path) -> None:
        """The log's last sampling settings, under the command line's flags (which win)."""
        known = {k: v for k, v in settings.items() if k in SamplingParams.model_fields}
        if not known:
            return
        current = self.setup.prompt.sampling.model_dump()
        try:
            sampling = self.flags(SamplingParams.model_validate({**current, **known}))
        except (ValidationError, ConfigError) as e:
            why = first_error(e)[1] if isinstance(e, ValidationError) else str(e)
            self.console.print(f"[yellow]warning:[/] {path}: last settings not used: {why}")
            return
        prompt = self.setup.prompt.model_copy(update={"sampling": sampling})
        self.setup = replace(self.setup, prompt=prompt)

    def _show_last_exchanges(self, count: int = 2) -> None:
        """Where the conversation stands: its last questions and answers, shortened."""
        # An answer: the final channel, or no channel at all (v1 logs, other models).
        shown = [
            m
            for m in self.chat.messages
            if m.role == "user"
            or (m.role == "assistant" and m.channel in (None, "final") and not m.recipient)
        ]
        starts = [i for i, m in enumerate(shown) if m.role == "user"]
        if not starts:
            return
        for m in shown[starts[-count] if len(starts) >= count else starts[0] :]:
            text = " ".join(m.content.split())
            text = text if len(text) <= LAST_EXCHANGE_CHARS else text[:LAST_EXCHANGE_CHARS] + " …"
            who = (
                "You said"
                if m.role == "user"
                else (self.setup.prompt.assistant_name or "Assistant")
            )
            self.console.print(Text(f"  {who}: {text}", style="dim"))

    def _new_chat(self) -> None:
        greeting = self.session.new_chat()
        if greeting is not None:
            self._print_answer(greeting)

    def close(self) -> None:
        self.session.close()

    def save(self) -> bool:
        """Write the log; if that fails (its folder gone, the disk full), say so and keep
        the conversation in memory: `\\save PATH` can still put it somewhere."""
        why = self.session.save()
        if why is not None:
            self.console.print(
                f"[yellow]Could not save {self.log_path} ({why}); the conversation "
                "is kept in memory: \\save PATH saves it elsewhere.[/]",
                highlight=False,
            )
        return why is None

    # --------------------------------------------------------------- commands
    def command(self, line: str) -> bool:
        """Run an out-of-band command; False means leave."""
        name, _, arg = line[1:].strip().partition(" ")
        name = ALIASES.get(name, name)
        arg = arg.strip()
        if name == "quit":
            return False
        handler = getattr(self, f"_cmd_{name}", None)
        if handler is None:
            self.console.print(f"Unknown command \\{name}. Commands:")
            self._cmd_help("")
            return True
        try:
            handler(arg)
        except HarmonyError as e:
            self.console.print(f"[red]error:[/] {e}")
        return True

    def _cmd_help(self, _: str) -> None:
        for usage, what in HELP.items():
            self.console.print(f"  \\{usage:<20} {what}", highlight=False, markup=False)

    def _cmd_save(self, arg: str) -> None:
        if arg:
            self._switch_log(Path(arg).expanduser())
        if self.save():
            self.console.print(f"[dim]Saved {self.log_path}[/]")

    def _cmd_load(self, arg: str) -> None:
        if not arg:
            raise ConfigError("\\load needs a path")
        self.save()
        old = self.log_path
        self._switch_log(Path(arg).expanduser())
        try:
            self._open(self.log_path)
        except ConfigError:  # a log that does not load: the current one stays
            self._switch_log(old)
            raise

    def _switch_log(self, path: Path) -> None:
        """Write to `path` from now on: held for this process, the old log let go."""
        hold_chat_log(path)
        if path.absolute() != self.log_path.absolute():
            release_chat_log(self.log_path)
        self.session.log_path = path

    def _cmd_reset(self, _: str) -> None:
        self._new_chat()
        self.save()
        self.console.print("[dim]New chat.[/]")

    def _cmd_chats(self, arg: str) -> None:
        log = self.session.log
        order = [c for c in log.chat_order if c in log.chats]
        order += [c for c in log.chats if c not in order]
        if not arg:
            for i, chat_id in enumerate(order, 1):
                chat = log.chats[chat_id]
                first = next((m.content for m in chat.messages if m.role == "user"), "")
                mark = "*" if chat_id == log.active_chat_id else " "
                line = f"{mark} {i:>2} {chat_id}  {len(chat.messages)} messages  {first[:50]}"
                self.console.print(line, markup=False, highlight=False)
            return
        if arg.isdigit() and 1 <= int(arg) <= len(order):
            chosen = order[int(arg) - 1]
        elif arg in log.chats:
            chosen = arg
        else:
            raise ConfigError(f"no chat {arg!r} in this log (\\chats lists them)")
        self.session.continue_chat(chosen)
        self.save()
        n = len(self.chat.messages)
        self.console.print(f"[dim]Continuing {chosen} ({n} messages).[/]")

    def _last_user_message(self, action: str) -> int:
        users = [i for i, m in enumerate(self.chat.messages) if m.role == "user"]
        if not users:
            raise ConfigError(f"nothing to {action}")
        return users[-1]

    def _cmd_undo(self, _: str) -> None:
        self.chat.truncate(self._last_user_message("undo"))
        self.save()
        self.console.print("[dim]Removed the last exchange.[/]")

    def _cmd_retry(self, _: str) -> None:
        self.chat.truncate(self._last_user_message("retry") + 1)
        self.generate()

    def _cmd_history(self, _: str) -> None:
        for m in self.chat.history():
            if m.recipient and m.role == "assistant":
                self._print_tool(ToolCall(m))
            elif m.role == "tool":
                self._print_tool(ToolResult(m))
            elif m.channel == "analysis":
                if self.show_reasoning:
                    self.console.print(Text(f"  ({m.content})", style="dim italic"))
            elif m.role == "user":
                self.console.print(Text(f"You: {m.content}", style="bold"))
            else:
                self._print_answer(m.content)

    def _cmd_set(self, arg: str) -> None:
        name, sep, value = arg.partition("=")
        name, value = name.strip().replace("-", "_"), value.strip()
        if not sep or not name:
            raise ConfigError("usage: \\set name=value")
        prompt = self.setup.prompt
        try:
            if name == "reasoning_effort":
                updated = prompt.model_validate({**prompt.model_dump(), name: value})
                self.setup.prompt = updated
            elif name in SamplingParams.model_fields:
                raw = None if value.lower() in ("none", "null") else value
                current = prompt.sampling.model_dump()
                sampling = SamplingParams.model_validate({**current, name: raw})
                self.setup.prompt = prompt.model_copy(update={"sampling": sampling})
            else:
                known = ", ".join(["reasoning_effort", *SamplingParams.model_fields])
                raise ConfigError(f"unknown setting '{name}' (known: {known})")
        except ValidationError as e:
            raise ConfigError(f"{name}: {first_error(e)[1]}") from None
        self.console.print(f"[dim]{name} = {value}[/]")

    def _cmd_show(self, _: str) -> None:
        p = self.setup.prompt
        kind = "Harmony" if self.engine.harmony else "chat template"
        from mlx_harmony.llm.remote import RemoteEngine

        if isinstance(self.engine, RemoteEngine):
            kind = f"remote {self.engine.config.base_url}"
        self.console.print(f"model: {self.setup.model} ({kind})")
        self.console.print(f"prompt config: {self.setup.prompt_path or '(defaults)'}")
        self.console.print(f"chat log: {self.log_path}")
        self.console.print(f"reasoning_effort: {p.reasoning_effort}")
        for k, v in p.sampling.model_dump().items():
            self.console.print(f"  {k}: {v}", highlight=False)

    def _cmd_reasoning(self, arg: str) -> None:
        self.show_reasoning = _toggle(arg, self.show_reasoning)
        self.console.print(f"[dim]reasoning {'shown' if self.show_reasoning else 'hidden'}[/]")

    def _cmd_markdown(self, arg: str) -> None:
        self.markdown = _toggle(arg, self.markdown)
        self.console.print(f"[dim]markdown {'on' if self.markdown else 'off'}[/]")

    # --------------------------------------------------------------- turns
    def say(self, text: str) -> None:
        self.chat.append(ChatMessage("user", text))
        self.generate()

    def generate(self) -> None:
        from rich.live import Live
        from rich.markdown import Markdown

        prompt = self.setup.prompt
        thinking = ""
        answer = ""
        live: Live | None = None
        think: Live | None = None  # the thinking, rendered as markdown as it grows
        done: TurnDone | None = None
        with Interrupt() as stopped:
            try:
                events = respond(
                    self.engine,
                    self.chat.history(),
                    prompt,
                    self.session.toolbox,
                    should_stop=stopped,
                )
                for event in events:
                    if isinstance(event, ToolCall | ToolResult | TextDelta) and (
                        think is not None and not _is_thinking(event)
                    ):
                        think.stop()
                        think = None
                    if isinstance(event, ToolCall | ToolResult):
                        if live is not None:  # a tool between two final messages
                            live.stop()
                            live, answer = None, ""
                        self._print_tool(event)
                    elif isinstance(event, TextDelta) and event.kind == "tool_arguments":
                        continue  # shown whole by its ToolCall
                    elif isinstance(event, TextDelta) and event.kind == "answer":
                        if thinking and not answer and not self.markdown:
                            self.console.print()
                        before, answer = answer, answer + event.text
                        if live is None and self.markdown:
                            live = Live(console=self.console, auto_refresh=False)
                            live.start()
                        if live is not None:
                            live.update(Markdown(self._answer_view(answer)), refresh=True)
                        else:
                            self._stream_plain(before, answer)
                    elif isinstance(event, TextDelta) and self.show_reasoning:
                        before, thinking = thinking, thinking + event.text
                        if self.markdown:
                            if think is None:
                                think = Live(console=self.console, auto_refresh=False)
                                think.start()
                            think.update(self._thinking_view(thinking), refresh=True)
                        else:
                            self._thinking_plain(before, thinking)
                    elif isinstance(event, TurnDone):
                        done = event
            except HarmonyError as e:  # the prompt cannot be rendered, a remote server failed
                self.console.print(f"\n[red]error:[/] {e}")
            finally:
                for shown in (think, live):
                    if shown is not None:
                        shown.stop()
        if not self.markdown:
            self.console.print()
        if done is None:
            return
        hyper = prompt.sampling.model_dump(exclude_defaults=False)
        self.session.record(done.messages, hyper)
        cut = prompt.truncate_response
        if cut is not None and not self.markdown and len(answer) > cut:
            more = f"[{len(answer) - cut} more characters in the log]"
            self.console.print(Text(more, style="dim"))
        if (notice := empty_turn_notice(done)) is not None:
            self.console.print(Text(notice, style="yellow"))
        elif done.finish_reason == "cancelled":
            self.console.print("[yellow](stopped)[/]")
        elif done.finish_reason == "length":
            self.console.print("[yellow](max_tokens reached)[/]")
        self.save()

    def _thinking_view(self, thinking: str) -> Markdown:
        from rich.markdown import Markdown

        """The thinking as markdown (dim), cut at `truncate_thinking` characters."""
        limit = self.setup.prompt.truncate_thinking
        shown = thinking if limit is None or len(thinking) <= limit else thinking[:limit] + " …"
        return Markdown(f"*(thinking)* {shown}", style="dim italic")

    def _thinking_plain(self, before: str, thinking: str) -> None:
        """Plain text with --no-markdown: no styling codes, each new piece as it comes."""
        limit = self.setup.prompt.truncate_thinking
        end = len(thinking) if limit is None else limit
        out = "(thinking) " if not before else ""
        out += thinking[len(before) : end] if len(before) < end else ""
        self.console.print(out, end="", markup=False, highlight=False)

    def _print_tool(self, event: ToolCall | ToolResult) -> None:
        """One compact dim block per call and per result."""
        msg = event.message
        if isinstance(event, ToolCall):
            head, body = f"→ {msg.recipient}", msg.content
        else:
            head, body = f"← {msg.name}", msg.content
        lines = body.strip().splitlines() or [""]
        shown = lines[:TOOL_PREVIEW_LINES]
        more = len(lines) - len(shown)
        text = "\n  ".join(shown) + (f"\n  … {more} more lines" if more else "")
        self.console.print(Text(f"\n{head}\n  {text}", style="dim cyan"))

    def _answer_view(self, answer: str) -> str:
        """An answer as shown: after the assistant's name (as the original tool showed it)
        and cut at `truncate_response` characters (the log keeps all of it)."""
        prompt = self.setup.prompt
        limit = prompt.truncate_response
        if limit is not None and len(answer) > limit:
            answer = f"{answer[:limit]} … [{len(answer) - limit} more characters in the log]"
        return f"{prompt.assistant_name}: {answer}" if prompt.assistant_name else answer

    def _stream_plain(self, before: str, answer: str) -> None:
        """Plain text: the name first, then each new piece up to `truncate_response`."""
        prompt = self.setup.prompt
        limit = len(answer) if prompt.truncate_response is None else prompt.truncate_response
        out = f"{prompt.assistant_name}: " if prompt.assistant_name and not before else ""
        out += answer[len(before) : limit] if len(before) < limit else ""
        if len(before) <= limit < len(answer):
            out += " …"
        self.console.print(out, end="", markup=False, highlight=False)

    def _print_answer(self, text: str) -> None:
        view = self._answer_view(text)
        if self.markdown:
            from rich.markdown import Markdown

            self.console.print(Markdown(view))
        else:
            self.console.print(view, markup=False, highlight=False)


def _is_thinking(event: object) -> bool:
    return isinstance(event, TextDelta) and event.kind in ("reasoning", "preamble")


def _toggle(arg: str, current: bool) -> bool:
    if arg in ("on", "true", "1"):
        return True
    if arg in ("off", "false", "0"):
        return False
    if arg:
        raise ConfigError(f"expected on or off, not '{arg}'")
    return not current


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-harmony-chat", description=__doc__)
    p.add_argument(
        "--chat", type=Path, help="chat log to resume or create: a path, or a name in chats_dir"
    )
    p.add_argument("--no-markdown", action="store_true", help="print answers as plain text")
    p.add_argument("--hide-reasoning", action="store_true", help="do not show the reasoning")
    add_model_options(p)
    return p


def resume_choices(args: argparse.Namespace, warn: Callable[[str], None]) -> None:
    """A resumed log's model and prompt config, where the command line names neither
    (nor a profile): filled into `args` (its settings come back in `ChatSession._open`)."""
    if args.chat is None:
        return
    path = chat_log_path(args.chat, None)
    if not path.exists():
        return
    log, _ = load_chat_log(path)
    meta = log.active().metadata
    if not args.profile:
        if args.model is None and meta.last_model_path:
            args.model = meta.last_model_path
        if args.prompt_config is None and meta.last_prompt_config_path:
            if Path(meta.last_prompt_config_path).exists():
                args.prompt_config = Path(meta.last_prompt_config_path)
            else:
                warn(
                    f"{path}: its prompt config {meta.last_prompt_config_path} is gone; "
                    "going on without it"
                )


def _main() -> int:
    args = build_parser().parse_args()
    console = Console(highlight=False)

    def warn(text: str) -> None:
        console.print(f"[yellow]warning:[/] {text}")

    from mlx_harmony.llm.backends import load_engine
    from mlx_harmony.llm.distributed import is_follower

    resume_choices(args, warn)
    setup = resolve(args, warn)
    log_path = chat_log_path(args.chat, setup.prompt.chats_dir)
    if not is_follower():  # before the model loads: another process may be writing it
        hold_chat_log(log_path)
    started = time.perf_counter()
    with console.status(f"Loading {setup.model} …"):
        engine = load_engine(
            setup.model, lazy=setup.prompt.lazy, remote=setup.remote, debug=setup.debug
        )
    console.print(
        f"[dim]Loaded {setup.model} in {time.perf_counter() - started:.1f}s. "
        "Type \\help for commands, Ctrl-C stops an answer, Ctrl-D quits.[/]"
    )
    session = ChatSession(
        engine,
        setup,
        log_path,
        console,
        show_reasoning=not args.hide_reasoning,
        markdown=not args.no_markdown,
        flags=lambda sampling: apply_overrides(sampling, args),
    )
    repl(session, console)
    return 0


# Lines that follow each other this closely were pasted together (see llm.cli.multiline).
PASTE_GAP_S = 0.01
# Typed alone, these leave, as in the original tool.
QUIT_WORDS = ("q", "quit", "exit")


def _paste_waiting() -> bool:
    """More of a paste already waiting on a terminal (a script's lines stay separate)."""
    if not sys.stdin.isatty():
        return False
    ready, _, _ = select.select([sys.stdin], [], [], PASTE_GAP_S)
    return bool(ready)


def as_command(message: str) -> str | None:
    """The command a message is (`\\help`, `/help` as the original wrote it, a bare `q`),
    or None for a message to the model."""
    text = message.strip()
    if "\n" in text:
        return None
    if text.lower() in QUIT_WORDS:
        return "\\quit"
    if text.startswith("\\"):
        return text
    name = text[1:].split(" ", 1)[0]
    if text.startswith("/") and (name in ALIASES or any(u.split()[0] == name for u in HELP)):
        return "\\" + text[1:]
    return None


def repl(session: ChatSession, console: Console) -> None:
    """Read messages until \\quit or Ctrl-D; save the log and stop the tools on the way
    out. A message may span lines (a paste, a trailing backslash, a \"\"\" block)."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            message = read_message(input, _paste_waiting)
        except EOFError:
            console.print()
            break
        except KeyboardInterrupt:
            console.print("\n[dim](\\quit or Ctrl-D to leave)[/]")
            continue
        if not message.strip():
            continue
        if (command := as_command(message)) is not None:
            if not session.command(command):
                break
            continue
        session.say(message.strip())
    saved = session.save()
    session.close()
    if saved:
        console.print(f"[dim]Chat saved to {session.log_path}[/]")


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()
