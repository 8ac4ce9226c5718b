"""Typed input beside the microphone: a line typed while the assistant listens is a
question; a line starting with a backslash is a command (`\\mute`, `\\stop`, …)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TextIO

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.voice.control import Reply, Request, validate_request

COMMANDS = {
    "mute": "stop hearing the microphone",
    "unmute": "hear it again",
    "stop": "stop the answer being spoken",
    "listen": "listen for one question (push-to-talk; an empty line does the same)",
    "new": "start a new chat",
    "say TEXT": "speak TEXT",
    "quit": "save and leave (also Ctrl-C)",
    "help": "this list",
}
ALIASES = {"new": "new-chat", "reset": "new-chat", "exit": "quit", "q": "quit"}


def typed_request(line: str) -> Request | str:
    """The request for a typed line, or the name of a local action ('quit', 'help').

    An empty line is the push-to-talk key (Enter): listen for one spoken question."""
    if not line:
        return Request(cmd="listen")
    if not line.startswith("\\"):
        return Request(cmd="ask", text=line)
    name, _, text = line[1:].strip().partition(" ")
    name = ALIASES.get(name, name)
    if name in ("quit", "help"):
        return name
    fields = {"cmd": name, "text": text.strip() or None}
    try:
        return validate_request(fields)
    except ConfigError:
        return "help"


def help_text() -> str:
    lines = ["Type a question, or a command:"]
    lines += [f"  \\{usage:<10} {what}" for usage, what in COMMANDS.items()]
    return "\n".join(lines)


def read_typed_lines(
    stream: TextIO,
    submit: Callable[[Request, Reply], None],
    quit_: Callable[[], None],
    show: Callable[[str], None],
) -> threading.Thread:
    """Read `stream` on a thread of its own until it ends (which quits nothing: a service
    has no input at all)."""

    def run() -> None:
        for raw in stream:
            line = raw.strip()
            action = typed_request(line)
            if action == "quit":
                quit_()
                return
            if action == "help":
                show(help_text())
            elif isinstance(action, Request):
                reply = Reply()
                submit(action, reply)
                threading.Thread(
                    target=_show_error, args=(reply, show), daemon=True, name="typed-reply"
                ).start()

    thread = threading.Thread(target=run, name="typed-input", daemon=True)
    thread.start()
    return thread


def _show_error(reply: Reply, show: Callable[[str], None]) -> None:
    """Answers are shown by the assistant itself; only a refusal needs saying here."""
    while True:
        fields = reply.lines.get()
        if "ok" in fields:
            if not fields["ok"]:
                show(f"error: {fields['error']}")
            return
