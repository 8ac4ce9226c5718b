"""A command run in the test's own process, as a user runs it: its own argv, stdin,
stdout and stderr, and its exit status. No interpreter to start and nothing to import
again: argument and error tests take milliseconds, not the seconds of a new process."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_command(main: Callable[[], None], prog: str, *args: str, stdin: str = "") -> Ran:
    """`main()` with `sys.argv = [prog, *args]`; the environment is put back after, since
    every command sets MLX's defaults in it (`llm.mlx_env`)."""
    out, err = io.StringIO(), io.StringIO()
    environ, argv, stdin_was = dict(os.environ), sys.argv, sys.stdin
    sys.argv, sys.stdin = [prog, *args], io.StringIO(stdin)
    code: int = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        sys.argv, sys.stdin = argv, stdin_was
        os.environ.clear()
        os.environ.update(environ)
    return Ran(code, out.getvalue(), err.getvalue())
