"""mlx-harmony-voice ctl: tell the running assistant what to do, through its control socket.

    mlx-harmony-voice ctl status
    mlx-harmony-voice ctl mute | unmute | stop | listen | new-chat
    mlx-harmony-voice ctl say "The tea is ready."
    mlx-harmony-voice ctl ask "What is the capital of France?"

`--json` prints the socket's own JSON lines, for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, get_args

from mlx_harmony.voice.control import Command, default_socket_path, send_request, validate_request


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx-harmony-voice ctl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--socket", type=Path, help=f"control socket (default {default_socket_path()})")
    p.add_argument("--json", action="store_true", help="print the JSON lines as they come")
    p.add_argument("cmd", choices=get_args(Command))
    p.add_argument("text", nargs="*", help="what to say or ask")
    return p


def describe_status(fields: dict[str, Any]) -> str:
    state = fields.get("state", "?")
    lines = [f"state: {state}" + (" (muted)" if fields.get("muted") else "")]
    if "started" in fields:
        since = datetime.fromtimestamp(fields["started"]).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"since: {since} (pid {fields.get('pid', '?')})")
    for key, label in (
        ("model", "model"), ("config", "config"), ("chat_log", "chat log"),
        ("tts", "text to speech"),
    ):  # fmt: skip
        if fields.get(key):
            lines.append(f"{label}: {fields[key]}")
    if "turns" in fields:
        lines.append(f"turns answered: {fields['turns']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    text = " ".join(args.text) or None
    request = validate_request({"cmd": args.cmd, "text": text}).model_dump(exclude_none=True)
    path = args.socket or default_socket_path()
    streamed: list[str] = []

    def on_event(fields: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(fields, ensure_ascii=False), flush=True)
        elif fields.get("event") == "answer":
            streamed.append(fields["text"])
            print(fields["text"], end="", flush=True)

    final = send_request(path, request, on_event)
    if args.json:
        print(json.dumps(final, ensure_ascii=False))
        return 0 if final["ok"] else 1
    if streamed:
        print()
    if not final["ok"]:
        print(f"error: {final['error']}", file=sys.stderr)
        return 1
    if args.cmd == "status":
        print(describe_status(final))
    elif args.cmd == "ask" and not streamed:
        print(final.get("answer", ""))
    elif args.cmd == "stop":
        print("stopped" if final.get("stopped") else "nothing to stop")
    elif args.cmd in ("mute", "unmute"):
        print("muted" if final.get("muted") else "listening")
    elif args.cmd == "listen":
        print(final.get("state", ""))
    elif args.cmd == "new-chat":
        print(f"new chat {final.get('chat_id')}")
    return 0
