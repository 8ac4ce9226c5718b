"""mlx-harmony-convert-dialogue: a plain-text dialogue into a prompt config's
`example_dialogues`, as the original tool's command did.

    User: Hello, who are you?
    Assistant: I'm Dave, at your service.
    User: What can you do?
    Assistant: Answer questions,
    and keep them short.

    User: (a blank line starts the next dialogue)
    Assistant: …

A line that starts with a speaker's name and a colon begins a turn (`User:`/`Assistant:`,
case-insensitive, or the names given with `--user-name`/`--assistant-name`); other lines
continue the turn above. With `--prompt-config FILE` the dialogues are added to that
file's `example_dialogues` (rewritten atomically; every other field kept as it was);
without it, the JSON list is printed.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from mlx_harmony.llm.cli.common import run_main
from mlx_harmony.llm.config import ExampleMessage, read_json
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.files import atomic_write_json


def parse_dialogues(
    text: str, user_names: list[str], assistant_names: list[str], source: str = "<dialogue>"
) -> list[list[ExampleMessage]]:
    """The dialogues in `text` (blank lines between dialogues); a line that names no
    speaker before the first turn is an error naming the line."""
    roles = {n.strip().lower(): "user" for n in user_names}
    roles |= {n.strip().lower(): "assistant" for n in assistant_names}
    label = re.compile(r"^\s*(" + "|".join(re.escape(n) for n in roles) + r")\s*:\s?(.*)$", re.I)
    dialogues: list[list[ExampleMessage]] = []
    turns: list[dict[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if turns:
                dialogues.append(_dialogue(turns))
                turns = []
            continue
        match = label.match(line)
        if match:
            turns.append({"role": roles[match.group(1).lower()], "content": match.group(2)})
        elif turns:
            turns[-1]["content"] += "\n" + line
        else:
            names = ", ".join(f"'{n}:'" for n in [*user_names, *assistant_names])
            raise ConfigError(f"{source}:{number}: a dialogue starts with a speaker ({names})")
    if turns:
        dialogues.append(_dialogue(turns))
    return dialogues


def _dialogue(turns: list[dict[str, str]]) -> list[ExampleMessage]:
    return [ExampleMessage(role=t["role"], content=t["content"].strip()) for t in turns]  # type: ignore[arg-type]


def _main() -> int:
    p = argparse.ArgumentParser(
        prog="mlx-harmony-convert-dialogue",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dialogue", type=Path, help="plain-text dialogue file")
    p.add_argument("--prompt-config", type=Path, help="add the dialogues to this prompt config")
    p.add_argument("--user-name", action="append", default=[], help="another name for the user")
    p.add_argument(
        "--assistant-name", action="append", default=[], help="another name for the assistant"
    )
    args = p.parse_args()
    try:
        text = args.dialogue.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{args.dialogue}: cannot read it ({e})") from None
    dialogues = parse_dialogues(
        text, ["user", *args.user_name], ["assistant", *args.assistant_name], str(args.dialogue)
    )
    if not dialogues:
        raise ConfigError(f"{args.dialogue}: no dialogue in it")
    as_json = [[m.model_dump() for m in d] for d in dialogues]
    if args.prompt_config is None:
        print(json.dumps(as_json, indent=2, ensure_ascii=False))
        return 0
    config: dict[str, Any] = read_json(args.prompt_config) if args.prompt_config.exists() else {}
    if not isinstance(config, dict):
        raise ConfigError(f"{args.prompt_config}: expected a JSON object")
    existing = config.get("example_dialogues") or []
    if not isinstance(existing, list):
        raise ConfigError(f"{args.prompt_config}: field 'example_dialogues': expected a list")
    config["example_dialogues"] = [*existing, *as_json]
    atomic_write_json(args.prompt_config, config)
    turns = sum(len(d) for d in dialogues)
    print(f"{args.prompt_config}: added {len(dialogues)} dialogues ({turns} turns)")
    return 0


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()
