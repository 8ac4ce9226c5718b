"""Failures the commands report as one line (no traceback), in two kinds: what the user
can fix in their input, and what failed while running that is not their input."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the python sandbox imports this module with the standard library only
    from pydantic import ValidationError


class HarmonyError(Exception):
    """Reported as one line; the CLIs exit non-zero."""


class ConfigError(HarmonyError):
    """Bad or missing user input: a config, a chat log, a model path, a vocabulary, a
    request field. `field` names the request or config field at fault, where one is (the
    HTTP server's `param`)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RuntimeFailure(HarmonyError):
    """Something the run depends on failed: a remote server, another rank."""


def first_error(err: ValidationError) -> tuple[str, str]:
    """A pydantic error's first problem: its dotted field (empty at the top level) and
    its message, as one line."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return where, str(first["msg"]).removeprefix("Value error, ").splitlines()[0]


def error_line(source: str, err: ValidationError) -> str:
    """`source: field 'a.b': what is wrong (and N more)`: a file's problem in one line."""
    where, msg = first_error(err)
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: field '{where or '(top level)'}': {msg}{more}"
