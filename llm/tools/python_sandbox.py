"""The `python` tool: the model's code, confined by the operating system.

Code the model writes (and web pages it reads can steer) is hostile, so the boundary is
the OS, never checks inside a Python process:

- Linux: bubblewrap (`bwrap`) starts `sandbox_child.py` in new user, PID, network, IPC,
  UTS and mount namespaces, as uid 65534 with no capabilities, in a root file system that
  holds only the system libraries and the Python installation (read-only), the workspace
  at /workspace (read-write) and a minimal /dev: no /proc, no /etc, no home, no host
  sockets, no network. Inside, the code runs in a worker under resource limits and a
  seccomp filter (see `sandbox_child`); a timeout kills the whole PID namespace.
- macOS: `sandbox-exec` with a generated profile: no network, no writes outside the
  workspace, no reads of the user's files outside it, no programs but Python itself.
- Elsewhere, or without bubblewrap, the tool refuses to run, naming what to install,
  unless the config says `"confinement": "none"` (then only the resource limits hold).

The workspace's disk use is watched while code runs: past `disk_mb` (and growing) the
code is stopped. With `persistent`, variables survive between calls like notebook cells;
otherwise every call starts afresh. The environment is empty but for a few locale
variables: the user's API keys and tokens never reach the code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.tools.tree import TreeChanged, chown_tree, walk

CHILD = Path(__file__).with_name("sandbox_child.py")
SETTINGS_ENV = "MLX_HARMONY_SANDBOX"  # as in sandbox_child
NO_OUTPUT = "[no output: use print() to see values]"
INSIDE_WORKSPACE = "/workspace"
INSIDE_CHILD = "/sandbox/sandbox_child.py"
NOBODY = 65534
MAX_FILES = 256  # open descriptors of the code
MAX_TASKS = 64  # processes and threads in the sandbox's user namespace
DISK_POLL_S = 0.02
# A scan waits this many times its own duration before the next one: a workspace of many
# files costs the host at most a fifth of a core while code runs.
DISK_POLL_SPACING = 4
INODE_BYTES = 4096
DISK_SCAN_TRIES = 3
INSTALL_HINT = {
    "linux": "install bubblewrap (sudo apt install bubblewrap, or your distribution's "
    "package) and allow unprivileged user namespaces",
    "darwin": "sandbox-exec is missing from this macOS",
}


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 30.0
    cpu_s: int = 30
    memory_mb: int = 2048
    max_output_chars: int = 8000
    persistent: bool = True
    disk_mb: int = 1024
    confinement: Literal["auto", "none"] = "auto"


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
        "workspace; nothing outside it can be written, and little outside it can be read. "
        "There is no internet access and no subprocesses."
    )


# ---------------------------------------------------------------------- confinements


def python_roots() -> list[str]:
    """Folders the interpreter and its packages live in, as named and as resolved."""
    roots: set[str] = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable)):
        roots |= {os.path.abspath(p), os.path.realpath(p)}
    # Keep the outermost folders only (a venv inside the base prefix needs no mount).
    out: list[str] = []
    for root in sorted(roots, key=len):
        if not any(root == o or root.startswith(o.rstrip("/") + "/") for o in out):
            out.append(root)
    return out


def bwrap_command(workspace: Path, userns: int | None = None) -> list[str]:
    """bubblewrap's command line; with `userns` (root's namespace, see
    `root_user_namespace`) the child keeps the two capabilities it needs to become nobody
    and does so before anything else."""
    if userns is None:
        cmd = [
            "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", str(NOBODY), "--gid", str(NOBODY), "--clearenv",
        ]  # fmt: skip
    else:
        cmd = [
            "bwrap", "--userns", str(userns), "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
            "--clearenv",
        ]  # fmt: skip
    mounts: list[list[str]] = []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /lib -> usr/lib
            mounts.append(["--symlink", os.readlink(top), top])
        elif os.path.isdir(top):
            mounts.append(["--ro-bind", top, top])
    system = [d for d in ("/usr/lib", "/usr/lib64", "/usr/share/zoneinfo") if os.path.isdir(d)]
    for root in [*system, *python_roots()]:
        mounts.append(["--ro-bind", os.path.realpath(root), root])
    mounts += [
        ["--ro-bind", str(CHILD), INSIDE_CHILD],
        ["--bind", str(workspace.resolve()), INSIDE_WORKSPACE],
    ]
    # The folders above the mount points, made 0755 first: bubblewrap would make them
    # 0700, which only root may enter (the code runs as nobody when the host is root).
    parents = sorted({str(p) for m in mounts for p in Path(m[-1]).parents if str(p) != "/"})
    for parent in parents:
        cmd += ["--perms", "0755", "--dir", parent]
    for mount in mounts:
        cmd += mount
    cmd += [
        "--dev", "/dev",
        "--remount-ro", "/dev",  # /dev/shm would be unlimited memory
        "--remount-ro", "/",
    ]  # fmt: skip
    if userns is None:  # else only nobody may enter it: the child changes there itself
        cmd += ["--chdir", INSIDE_WORKSPACE]
    return [*cmd, "--", sys.executable, "-I", "-B", INSIDE_CHILD]


# Run as `python -I -S -c`: a process that enters a new user namespace and waits.
USERNS_HELPER = (
    "import ctypes, sys\n"
    "if ctypes.CDLL(None, use_errno=True).unshare(0x10000000): sys.exit(1)\n"
    "print(flush=True)\n"
    "sys.stdin.read()"
)


def root_user_namespace() -> int:
    """For an assistant run as root: a descriptor of a new user namespace in which uid 0
    is the host's root (so that bubblewrap, entering it, can still bind the Python
    installation that only root may read) and 65534 is the host's nobody.

    Under bubblewrap's own namespace the code's uid 65534 would be the host's root: the
    kernel exempts root from RLIMIT_NPROC (thousands of threads), and whatever the code
    creates would be root's. Here the code runs as the host's nobody instead.
    """
    helper = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", USERNS_HELPER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert helper.stdin is not None and helper.stdout is not None
    try:
        if helper.stdout.readline() != b"\n":
            raise OSError("could not create a user namespace for the python tool")
        maps = {"uid_map": f"0 0 1\n{NOBODY} {NOBODY} 1\n", "gid_map": f"{NOBODY} {NOBODY} 1\n"}
        for name, mapping in maps.items():
            Path(f"/proc/{helper.pid}/{name}").write_text(mapping)
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.stdin.close()
        helper.stdout.close()
        helper.wait()


def _sbpl(path: str) -> str:
    return json.dumps(path)  # SBPL strings are double-quoted with backslash escapes


def sandbox_exec_profile(workspace: Path) -> str:
    """macOS's sandbox profile for the python tool (the SBPL of `sandbox-exec -p`)."""
    ws = _sbpl(str(workspace.resolve()))
    python = _sbpl(os.path.realpath(sys.executable))
    readable = " ".join(
        f"(subpath {_sbpl(r)})" for r in [str(workspace.resolve()), *python_roots()]
    )
    return "\n".join(
        [
            "(version 1)",
            "(allow default)",
            "(deny network*)",
            f"(deny process-exec (require-not (literal {python})))",
            "(deny file-write* (require-not (require-any",
            f'    (subpath {ws}) (literal "/dev/null") (literal "/dev/tty"))))',
            "(deny file-read* (require-all",
            '    (require-any (subpath "/Users") (subpath "/Volumes") (subpath "/private")',
            '                 (subpath "/opt") (subpath "/usr/local") (subpath "/Library"))',
            f"    (require-not (require-any {readable}",
            '                 (subpath "/private/var/db/dyld") (literal "/private/etc/localtime")',
            '                 (subpath "/usr/local/lib") (subpath "/Library/Frameworks")))))',
        ]
    )


@functools.cache
def _bwrap_works() -> bool:
    if not shutil.which("bwrap"):
        return False
    probe = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--", "/bin/true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def confinement_command(workspace: Path, kind: str) -> tuple[list[str], str]:
    """The command that starts the child confined, and the workspace path inside."""
    if kind == "none":
        return [sys.executable, "-I", "-B", str(CHILD)], str(workspace.resolve())
    if sys.platform.startswith("linux") and _bwrap_works():
        return bwrap_command(workspace), INSIDE_WORKSPACE
    if sys.platform == "darwin" and shutil.which("sandbox-exec"):
        profile = sandbox_exec_profile(workspace)
        cmd = ["sandbox-exec", "-p", profile, sys.executable, "-I", "-B", str(CHILD)]
        return cmd, str(workspace.resolve())
    hint = INSTALL_HINT.get(sys.platform.rstrip("0123456789"), "no confinement is known here")
    raise ConfigError(
        f"the python tool runs the model's code confined by the OS: {hint}; or set "
        'tools.python.confinement to "none" to run it unconfined'
    )


def disk_use(folder: Path) -> int:
    """Bytes the folder's files take on disk (blocks, so sparse files count as stored),
    each file or folder counted as at least INODE_BYTES: empty folders cost the file
    system inodes, and every scan time (91,200 of them once passed a 1 MB limit). Walked
    by descriptor, so nothing hides below PATH_MAX's depth; a tree that keeps changing
    shape under the scan counts as full (code that wants room can stop moving folders)."""
    for _ in range(DISK_SCAN_TRIES):
        total = 0

        def count(fd: int, name: str, _: bool) -> None:
            nonlocal total
            with contextlib.suppress(OSError):
                blocks = os.stat(name, dir_fd=fd, follow_symlinks=False).st_blocks * 512
                total += max(blocks, INODE_BYTES)

        try:
            walk(folder, count)
        except TreeChanged:
            continue
        except OSError:  # the workspace itself is gone: nothing in it
            return total
        return total
    return sys.maxsize


def held_files(root_pid: int) -> int:
    """Bytes of the files that processes under `root_pid` hold open with no name left (a
    file opened, then unlinked): no scan of the workspace sees them, yet they fill its
    disk until closed. Read from the host's /proc (the assistant owns the sandbox's user
    namespace, so it may); 0 where there is none (macOS)."""
    held: dict[tuple[int, int], int] = {}
    for pid in _process_tree(root_pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:
                held[st.st_dev, st.st_ino] = st.st_blocks * 512
    return sum(held.values())


def _process_tree(root_pid: int) -> list[int]:
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        with contextlib.suppress(OSError, ValueError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    todo += [int(child) for child in fh.read().split()]
    return found


# ---------------------------------------------------------------------- the tool


class PythonSandbox:
    def __init__(self, workspace: Path, limits: SandboxLimits | None = None) -> None:
        self.workspace = Path(workspace)
        self.limits = limits or SandboxLimits()
        # Refuse now (a config problem for the user), not at the model's first call.
        confinement_command(self.workspace, self.limits.confinement)
        self._proc: subprocess.Popen[bytes] | None = None
        self._next_id = 0
        self._disk_stop = False

    def run(self, code: str) -> str:
        """Run `code`; return what the model reads (output, traceback or what went wrong)."""
        if self._proc is None or self._proc.poll() is not None:
            try:
                self._start()
            except OSError as e:  # no user namespace for root's sandbox, a workspace it
                # cannot own or enter: the model reads why, the assistant goes on
                self.close()
                return f"The python sandbox could not start: {e.strerror or e}."
        assert self._proc is not None and self._proc.stdin is not None
        self._next_id += 1
        request = json.dumps({"id": self._next_id, "code": code}) + "\n"
        finish_watch = self._watch_disk()
        try:
            self._proc.stdin.write(request.encode())
            self._proc.stdin.flush()
            reply = self._read_reply(self._next_id, time.monotonic() + self.limits.timeout_s)
        except (BrokenPipeError, OSError):
            reply = None
        finally:
            finish_watch()
        if self._disk_stop:  # also when the code was done before a scan could see it
            return self._failed(None)
        if reply is not None and reply.get("broken"):
            self.close()
            return (
                "The code wrote into the sandbox's own answer channel; its process was "
                "stopped and its variables are lost."
            )
        if reply is None or "output" not in reply:
            return self._failed(None if reply is None else reply.get("status"))
        if not self.limits.persistent:
            self.close()
        text = str(reply["output"])
        return text if text.strip() else NO_OUTPUT

    def kill(self) -> None:
        """Kill the sandbox; safe from another thread: the call in progress sees the end
        of its reply pipe and reports it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    def _start(self) -> None:
        self.close()
        self.workspace.mkdir(parents=True, exist_ok=True)
        cmd, inside = confinement_command(self.workspace, self.limits.confinement)
        confined = self.limits.confinement != "none"
        settings = {
            "workspace": inside,
            "memory_mb": self.limits.memory_mb,
            "cpu_s": self.limits.cpu_s,
            "disk_mb": self.limits.disk_mb,
            "max_files": MAX_FILES,
            "max_output_chars": self.limits.max_output_chars,
            "persistent": self.limits.persistent,
            # Counted per user namespace: only inside bubblewrap's is it the sandbox's own.
            "nproc": MAX_TASKS if confined and sys.platform.startswith("linux") else None,
        }
        env = {
            "LANG": "C.UTF-8",
            "HOME": inside,
            "TMPDIR": inside,
            "PYTHONIOENCODING": "utf-8",
            SETTINGS_ENV: json.dumps(settings),
        }
        userns = None
        as_root: dict = {}
        if cmd[0] == "bwrap" and os.geteuid() == 0:
            # The code runs as nobody (see root_user_namespace), and the workspace is
            # given to nobody so that it may write there; root still reads everything.
            userns = root_user_namespace()
            cmd = bwrap_command(self.workspace, userns)
            chown_tree(self.workspace, NOBODY, NOBODY)
            settings["become"] = NOBODY
            env[SETTINGS_ENV] = json.dumps(settings)
            as_root = {"group": NOBODY, "extra_groups": [], "pass_fds": (userns,)}
        if cmd[0] == "bwrap":  # it clears the environment: set it after --clearenv
            end = cmd.index("--")
            cmd[end:end] = [a for k, v in env.items() for a in ("--setenv", k, v)]
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=self.workspace,
                start_new_session=True,  # its own process group: the timeout kills it all
                **as_root,
            )
        finally:
            if userns is not None:
                os.close(userns)

    def _read_reply(self, request_id: int, deadline: float) -> dict | None:
        """The reply line to `request_id`, read with a size cap; None on timeout, a dead
        sandbox, or a reply that is too long, not JSON or for another request."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        cap = self.limits.max_output_chars * 8 + 4096  # JSON-escaped UTF-8 and the frame
        buf = bytearray()
        with selectors.DefaultSelector() as sel:  # poll/epoll: no 1,024-descriptor limit
            sel.register(fd, selectors.EVENT_READ)
            while not buf.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:  # the sandbox is gone: collect its exit status for the report
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self._proc.wait(timeout=5)
                    return None
                buf += chunk
                if len(buf) > cap:
                    return None
        try:
            reply = json.loads(buf)
        except ValueError:
            return None
        return reply if isinstance(reply, dict) and reply.get("id") == request_id else None

    def _watch_disk(self) -> Callable[[], None]:
        """While code runs: stop it if the workspace and the nameless files its processes
        hold grow past `disk_mb`. Returns what ends the watch, after one last look (fast
        code can be done before the first scan)."""
        done = threading.Event()
        limit = self.limits.disk_mb << 20
        proc = self._proc
        assert proc is not None

        def use() -> int:
            return disk_use(self.workspace) + held_files(proc.pid)

        start = use()
        self._disk_stop = False

        def watch() -> None:
            wait = DISK_POLL_S
            while True:
                ending = done.wait(wait)
                began = time.monotonic()
                now = use()
                if now > limit and now > start:
                    self._disk_stop = True
                    self.kill()
                    return
                if ending:
                    return
                wait = max(DISK_POLL_S, DISK_POLL_SPACING * (time.monotonic() - began))

        watcher = threading.Thread(target=watch, name="python-disk", daemon=True)
        watcher.start()

        def finish() -> None:
            done.set()
            watcher.join()

        return finish

    def _failed(self, status: int | None) -> str:
        proc = self._proc
        lost = " Variables from earlier calls are lost." if self.limits.persistent else ""
        alive = proc is not None and proc.poll() is None
        if status is None and proc is not None and not alive:
            status = proc.returncode  # the whole sandbox ended (killed: a stop, a timeout)
        self.close()
        if self._disk_stop:
            return (
                f"Stopped: the workspace grew past its {self.limits.disk_mb} MB limit. "
                f"Delete files to make room.{lost}"
            )
        if status is None and alive:
            return f"Timed out after {self.limits.timeout_s:g} s; the process was stopped.{lost}"
        if status is not None and status < 0:
            name = signal.Signals(-status).name
            why = {
                "SIGKILL": " (memory or CPU-time limit?)",
                "SIGXCPU": " (CPU-time limit)",
                "SIGXFSZ": " (file-size limit)",
                "SIGSYS": " (a forbidden system call)",
            }.get(name, "")
            return f"The python process was killed by {name}{why}.{lost}"
        if status is not None:
            return f"The python process exited with status {status}.{lost}"
        return f"The python process stopped answering and was ended.{lost}"
