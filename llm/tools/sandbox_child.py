"""The python tool's inside: a supervisor, and a worker that runs the model's code.

Started by `llm.tools.python_sandbox` inside its confinement (bubblewrap on Linux,
sandbox-exec on macOS) as `python -I -B sandbox_child.py`, with its settings in the
environment. Only the standard library is used.

The supervisor holds the protocol: JSON lines on stdin (`{"id": n, "code": …}`) and on
stdout (`{"id": n, "output": …}`). The model's code runs in a worker process forked from
it, which closes every protocol descriptor before anything else, so the code can neither
read the next request nor forge a reply: it reaches the supervisor only through two pipes
of its own, and the supervisor reads one size-capped, length-prefixed answer per request
from them. Between calls the worker is stopped (SIGSTOP), so threads it started cannot
run on; without `persistent` it is killed after each call instead.

Before running any code the worker limits itself (memory, CPU time, file size, open
files, processes, core dumps) and, on Linux, installs a seccomp filter through
libseccomp: no new programs (execve), no new processes (fork, or clone without
CLONE_THREAD), no sockets but AF_UNIX, no namespaces, mounts, device nodes, ptrace, other
processes' memory or descriptors, and no signals to other processes. These limits and the
namespaces around it are the boundary; nothing in this Python process is.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import errno
import io
import json
import os
import resource
import signal
import struct
import sys
import traceback

SETTINGS_ENV = "MLX_HARMONY_SANDBOX"
HEADER = struct.Struct("!I")  # the length of one answer from the worker


# ---------------------------------------------------------------------- the worker


def run(code: str, scope: dict) -> str:
    """Execute `code` in `scope`; like a notebook cell, echo a final expression's value.
    Returns stdout, then stderr and any traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            tree = ast.parse(code, "<python>")
            last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            if last is not None:
                tree.body.pop()
            exec(compile(tree, "<python>", "exec"), scope)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<python>", "eval"), scope)
                if value is not None:
                    print(repr(value))
        except BaseException as e:  # the model reads its own error, as in a notebook
            if isinstance(e, SystemExit | KeyboardInterrupt):
                print(f"{type(e).__name__}: {e}", file=err)
            else:
                tb = traceback.format_exception(e)
                # Drop the frames of this runner: the model's code starts at <python>.
                keep = [tb[0], *[f for f in tb[1:] if "sandbox_child.py" not in f]]
                err.write("".join(keep))
    return out.getvalue() + err.getvalue()


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[output truncated: {len(text) - limit} more characters]"


def set_limits(settings: dict) -> None:
    memory = settings["memory_mb"] << 20
    wanted = {
        resource.RLIMIT_CPU: settings["cpu_s"],
        resource.RLIMIT_AS: memory,
        resource.RLIMIT_FSIZE: settings["disk_mb"] << 20,
        resource.RLIMIT_NOFILE: settings["max_files"],
        resource.RLIMIT_CORE: 0,
    }
    if settings.get("nproc"):  # threads count here (root is exempt: seccomp stops forks)
        wanted[resource.RLIMIT_NPROC] = settings["nproc"]
    for what, value in wanted.items():
        _, hard = resource.getrlimit(what)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # macOS refuses some limits (RLIMIT_AS among them); the others still hold.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(what, (value, value))


# libseccomp's ABI (seccomp.h): actions, comparison operators, the argument structure.
ALLOW = 0x7FFF0000
CMP_NE, CMP_MASKED_EQ = 1, 7
CLONE_THREAD = 0x00010000
AF_UNIX = 1
DENIED_SYSCALLS = (
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv",
    "process_vm_writev", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "tkill",
    "setns", "unshare", "mount", "umount2", "pivot_root", "chroot", "mknod", "mknodat",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "open_by_handle_at", "name_to_handle_at", "fanotify_init", "acct",
    "move_mount", "open_tree", "fsopen", "fsmount", "kexec_load", "init_module",
)  # fmt: skip


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def install_seccomp() -> bool:
    """The worker's system-call filter; False where libseccomp is missing (not Linux)."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return False
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp),
    ]  # fmt: skip
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")

    def rule(name: str, action: int, *conditions: tuple[int, int, int, int]) -> None:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # not a system call on this architecture
        args = (ArgCmp * max(1, len(conditions)))(*[ArgCmp(*c) for c in conditions])
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(conditions), args)
        if rc < 0:
            raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")

    eperm = errno_action(errno.EPERM)
    for name in DENIED_SYSCALLS:
        rule(name, eperm)
    # clone makes threads (allowed) and processes (not); glibc falls back from clone3,
    # whose flags a filter cannot see, to clone when clone3 is unknown.
    rule("clone", eperm, (0, CMP_MASKED_EQ, CLONE_THREAD, 0))
    rule("clone3", errno_action(errno.ENOSYS))
    rule("socket", eperm, (0, CMP_NE, AF_UNIX, 0))
    pid = os.getpid()
    rule("kill", eperm, (0, CMP_NE, pid, 0))  # signals to itself only
    rule("tgkill", eperm, (0, CMP_NE, pid, 0))
    rc = lib.seccomp_load(ctx)
    if rc < 0:
        raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    return True


def worker(code_in: int, answers: int, settings: dict) -> None:
    """The forked worker: its own pipes only, limits, filter, then code until EOF."""
    start = 3  # every descriptor but its two pipes goes, the protocol's too
    for keep in sorted((code_in, answers)):
        os.closerange(start, keep)
        start = keep + 1
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    os.closerange(start, hard if 0 < hard < 1 << 20 else 1 << 16)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    sys.stdin = io.StringIO()
    set_limits(settings)
    if sys.platform.startswith("linux") and not install_seccomp():
        os._exit(70)  # confinement was promised: no filter, no code
    scope: dict = {"__name__": "__main__"}
    limit = settings["max_output_chars"]
    with os.fdopen(code_in, "rb") as requests, os.fdopen(answers, "wb") as out:
        while header := requests.read(HEADER.size):
            code = requests.read(HEADER.unpack(header)[0]).decode("utf-8", "replace")
            answer = truncate(run(code, scope), limit).encode("utf-8", "replace")
            out.write(HEADER.pack(len(answer)) + answer)
            out.flush()
    os._exit(0)


# ---------------------------------------------------------------------- the supervisor


class Worker:
    def __init__(self, settings: dict) -> None:
        code_r, code_w = os.pipe()
        answer_r, answer_w = os.pipe()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (runs in the child)
            try:
                os.close(code_w)
                os.close(answer_r)
                worker(code_r, answer_w, settings)
            finally:
                os._exit(70)
        os.close(code_r)
        os.close(answer_w)
        self.pid, self.code, self.answers = pid, code_w, answer_r
        self.cap = settings["max_output_chars"] * 4 + 256  # UTF-8 and the notice

    def ask(self, code: str) -> str | None:
        """Send one cell; the worker's answer, or None if it died or broke the framing."""
        data = code.encode("utf-8", "replace")
        try:
            os.write(self.code, HEADER.pack(len(data)))
            _write_all(self.code, data)
            header = _read_exactly(self.answers, HEADER.size)
            if header is None or HEADER.unpack(header)[0] > self.cap:
                return None
            answer = _read_exactly(self.answers, HEADER.unpack(header)[0])
        except OSError:
            return None
        return None if answer is None else answer.decode("utf-8", "replace")

    def pause(self) -> None:
        """Stop every thread of it until the next call (and wait until it is stopped)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGSTOP)
            os.waitpid(self.pid, os.WUNTRACED)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)

    def end(self) -> None:
        """Kill it (if it still runs), reap it, close its pipes."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # already reaped by died()
            os.waitpid(self.pid, 0)
        for fd in (self.code, self.answers):
            with contextlib.suppress(OSError):
                os.close(fd)

    def died(self) -> int | None:
        """Its exit status as `subprocess` reports one (-N for signal N) if it has ended
        on its own (e.g. a limit killed it); None while it runs."""
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if pid else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _set_not_dumpable() -> None:
    """Other processes of this user (the worker) may not ptrace this one or read its
    memory and descriptors."""
    pr_set_dumpable = 4
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_dumpable, 0, 0, 0, 0)


def supervise() -> None:
    settings = json.loads(os.environ.pop(SETTINGS_ENV))
    os.chdir(settings["workspace"])
    _set_not_dumpable()
    requests, replies = sys.stdin.buffer, sys.stdout
    current: Worker | None = None
    for line in requests:
        request = json.loads(line)
        if current is None:
            current = Worker(settings)
        else:
            current.resume()
        answer = current.ask(request["code"])
        reply: dict = {"id": request["id"]}
        if answer is None:  # it died (a limit), or broke the framing and is stopped now
            status = current.died()
            if status is None:
                reply["broken"] = True
            else:
                reply["status"] = status
            current.end()
            current = None
        else:
            reply["output"] = answer
            if settings["persistent"]:
                current.pause()
            else:
                current.end()
                current = None
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    supervise()
