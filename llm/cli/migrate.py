"""mlx-harmony-migrate-chat: rewrite a chat log in the current schema, keeping every message."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlx_harmony.llm.chatlog import (
    SCHEMA_VERSION,
    hold_chat_log,
    keep_backup,
    load_chat_log,
    save_chat_log,
)
from mlx_harmony.llm.cli.common import run_main
from mlx_harmony.llm.errors import ConfigError


def _main() -> int:
    p = argparse.ArgumentParser(prog="mlx-harmony-migrate-chat", description=__doc__)
    p.add_argument("log", type=Path, help="chat log to migrate (v1 or v2)")
    p.add_argument(
        "-o", "--output", type=Path, help="write here instead of in place (in place keeps a .bak)"
    )
    p.add_argument(
        "--in-place",
        action="store_true",
        help="rewrite the log itself, keeping the original as .v1.bak (the default)",
    )
    args = p.parse_args()
    if args.in_place and args.output:
        raise ConfigError("--in-place and --output: choose one")
    target = args.output or args.log
    hold_chat_log(target)  # a chat writing it meanwhile would undo the migration
    log, version = load_chat_log(args.log)
    for note in log.repairs:
        print(f"repaired: {note}")
    if target == args.log:
        if version == SCHEMA_VERSION and not log.repairs:
            print(f"{args.log}: already schema v{SCHEMA_VERSION}, nothing to do")
            return 0
        backup = keep_backup(args.log, version, repaired=bool(log.repairs))
        if backup:
            print(f"kept the original as {backup}")
    save_chat_log(target, log)
    count = sum(len(c.messages) for c in log.chats.values())
    print(f"{target}: schema v{version} → v{SCHEMA_VERSION}, {count} messages")
    return 0


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()
