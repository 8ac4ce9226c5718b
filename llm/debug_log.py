"""The debug log (`--debug`, `--debug-file`, `--debug-tokens`), as the original tool kept it:
every prompt exactly as the model saw it and every raw response, special tokens included,
one entry per model call (a turn with tool calls has several), optionally with token ids.
Prompts hold what the conversation holds; API keys never enter them."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from mlx_harmony.llm.errors import ConfigError

TokenIds = Literal["in", "out", "both"]


def default_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "mlx-harmony" / "debug.log"


class DebugLog:
    def __init__(self, path: Path, token_ids: TokenIds | None = None) -> None:
        self.path, self.token_ids = path, token_ids
        try:  # checked now, before a model loads, not at the first answer
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as e:
            raise ConfigError(f"debug log {path}: cannot write it ({e.strerror or e})") from None

    def write(
        self,
        prompt: Sequence[int],
        response: Sequence[int],
        decode: Callable[[list[int]], str],
        model: str,
    ) -> None:
        parts = [
            f"=== {datetime.now():%Y-%m-%d %H:%M:%S} {model}: prompt {len(prompt)} tokens, "
            f"response {len(response)} ===",
            "--- prompt ---",
            decode(list(prompt)),
            "--- response ---",
            decode(list(response)),
        ]
        if self.token_ids in ("in", "both"):
            parts += ["--- prompt ids ---", " ".join(map(str, prompt))]
        if self.token_ids in ("out", "both"):
            parts += ["--- response ids ---", " ".join(map(str, response))]
        # A log, appended, never rewritten; private like the chat logs: it holds whole
        # prompts (an older one made 0644 is narrowed).
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
            fh.write("\n".join(parts) + "\n\n")
