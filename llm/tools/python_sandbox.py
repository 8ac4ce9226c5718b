"""The `python` tool: the model's code in a separate, limited process.

Each conversation gets one child process (`sandbox_child.py`) working in the
conversation's workspace folder. The child sets its own memory, CPU-time, file-size and
process limits before it installs audit hooks that keep files, sockets and new processes
away from the code; where the OS offers it, the child also starts with no network at all
(a Linux network namespace through `unshare`, macOS's `sandbox-exec`). A wall-clock
timeout kills the child's whole process group. With `persistent`, variables survive from
one call to the next like notebook cells; otherwise every call starts a fresh process.
The child's environment is empty but for a few locale variables: the user's API keys and
tokens never reach the code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
LIMITS_ENV = "MLX_HARMONY_SANDBOX_LIMITS"
NO_OUTPUT = "[no output: use print() to see values]"


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 30.0
    cpu_s: int = 30
    memory_mb: int = 2048
    max_output_chars: int = 8000
    persistent: bool = True


def description(limits: SandboxLimits) -> str:
    """The python tool's text in the system message: what this sandbox really does."""
    state = (
        "It runs like a notebook: variables persist between calls in this conversation, "
        "and the value of a final expression is shown."
        if limits.persistent
        else "Every call runs in a fresh process, and the value of a final expression is shown."
    )
    return (
        "Use this tool to execute Python code in your chain of thought. The code will not be "
        "shown to the user. This tool should be used for internal reasoning, but not for code "
        "that is intended to be visible to the user.\n\n"
        "When you send a message containing Python code to python, it will be executed in a "
        f"sandboxed process; python will respond with the output of the execution or time out "
        f"after {limits.timeout_s:g} seconds. {state} The current folder is the conversation's "
        "workspace; files outside it cannot be read or written. There is no internet access "
        "and no subprocesses."
    )


@functools.cache
def _network_off_prefix() -> tuple[str, ...]:
    """A command prefix that starts the child without network, if this OS has one."""
    candidates: list[tuple[str, ...]] = []
    if sys.platform.startswith("linux") and shutil.which("unshare"):
        candidates += [("unshare", "--net"), ("unshare", "--map-root-user", "--net")]
    if sys.platform == "darwin" and shutil.which("sandbox-exec"):
        candidates.append(("sandbox-exec", "-p", "(version 1)(allow default)(deny network*)"))
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


class PythonSandbox:
    def __init__(self, workspace: Path, limits: SandboxLimits | None = None) -> None:
        self.workspace = Path(workspace)
        self.limits = limits or SandboxLimits()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reply_fd: int | None = None

    def run(self, code: str) -> str:
        """Run `code`; return what the model reads (output, traceback or what went wrong)."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps({"code": code}) + "\n").encode())
            self._proc.stdin.flush()
            raw = self._read_reply(time.monotonic() + self.limits.timeout_s)
        except BrokenPipeError:
            raw = None
        if raw is None:
            return self._failed()
        text = json.loads(raw)["output"]
        if not self.limits.persistent:
            self.close()
        return text if text.strip() else NO_OUTPUT

    def kill(self) -> None:
        """Kill the running code's process group; safe from another thread: the call in
        progress sees the end of its reply pipe and reports it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if self._reply_fd is not None:
            os.close(self._reply_fd)
            self._reply_fd = None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()

    def _start(self) -> None:
        self.close()
        self.workspace.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        limits = {
            "memory_mb": self.limits.memory_mb,
            "cpu_s": self.limits.cpu_s,
            "max_output_chars": self.limits.max_output_chars,
        }
        env = {
            "LANG": "C.UTF-8",
            "HOME": str(self.workspace),
            "TMPDIR": str(self.workspace),
            "PYTHONIOENCODING": "utf-8",
            LIMITS_ENV: json.dumps(limits),
        }
        cmd = [
            *_network_off_prefix(),
            sys.executable,
            "-I",
            "-B",
            str(CHILD),
            str(self.workspace),
            str(write_fd),
        ]
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(write_fd,),
                env=env,
                cwd=self.workspace,
                start_new_session=True,  # its own process group: the timeout kills it all
            )
        finally:
            os.close(write_fd)
        self._reply_fd = read_fd

    def _read_reply(self, deadline: float) -> bytes | None:
        assert self._reply_fd is not None
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._reply_fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._reply_fd, 1 << 16)
            if not chunk:  # the child is gone: collect its exit status for the report
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=5)  # type: ignore[union-attr]
                return None
            buf += chunk
        return buf

    def _failed(self) -> str:
        assert self._proc is not None
        proc = self._proc
        status = proc.poll()
        lost = " Variables from earlier calls are lost." if self.limits.persistent else ""
        self.close()
        if status is None:
            return f"Timed out after {self.limits.timeout_s:g} s; the process was stopped.{lost}"
        if status < 0:
            name = signal.Signals(-status).name
            why = {
                "SIGKILL": " (memory or CPU-time limit?)",
                "SIGXCPU": " (CPU-time limit)",
                "SIGXFSZ": " (file-size limit)",
            }.get(name, "")
            return f"The python process was killed by {name}{why}.{lost}"
        return f"The python process exited with status {status}.{lost}"
