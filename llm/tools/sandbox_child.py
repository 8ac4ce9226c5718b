"""The python tool's inside: a supervisor, and a worker that runs the model's code.

Started by `llm.tools.python_sandbox` inside its confinement (bubblewrap on Linux,
sandbox-exec on macOS) as `python -I -B sandbox_child.py`, with its settings in the
environment. Only the standard library is used.

The supervisor holds the protocol: JSON lines on stdin (`{"id": n, "code": …}`) and on
stdout (`{"id": n, "output": …}`). The model's code runs in a worker process forked from
it, which closes every protocol descriptor before anything else, so the code can neither
read the next request nor forge a reply: it reaches the supervisor only through a socket
of its own, on which each call brings the code and a pipe made for that call's answer
alone. The supervisor takes as the answer one size-capped, length-prefixed frame followed
by the pipe's end; anything else (a frame the code wrote itself) is refused. Between calls
the worker is stopped (SIGSTOP), so threads it started cannot run on; without
`persistent` it is killed after each call instead.

Before running any code the worker limits itself (memory, CPU time, file size, open
files, processes, core dumps) and, on Linux, installs a seccomp filter through
libseccomp: no new programs (execve), no new processes (fork, or clone without
CLONE_THREAD), no sockets but AF_UNIX, no namespaces, mounts, device nodes, ptrace, other
processes' memory or descriptors, no signals, limits, priorities or CPU pinning for other
processes (nor kernel-sent signals aimed at them), no setuid or setgid modes, no memory
outside the address-space limit (memfd, System V and POSIX IPC) and no nameless files.
These limits and the namespaces around it are the boundary; nothing in this Python
process is.
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
import socket
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
CMP_NE, CMP_EQ, CMP_MASKED_EQ = 1, 4, 7
CLONE_THREAD = 0x00010000
AF_UNIX = 1
DENIED_SYSCALLS = (
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv",
    "process_vm_writev", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "tkill",
    "setns", "unshare", "mount", "umount2", "pivot_root", "chroot", "mknod", "mknodat",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "open_by_handle_at", "name_to_handle_at", "fanotify_init", "acct",
    "move_mount", "open_tree", "fsopen", "fsmount", "kexec_load", "init_module",
    # Memory no limit counts: memfd files and System V / POSIX IPC objects outlive every
    # mapping of them, so RLIMIT_AS never sees them.
    "memfd_create", "memfd_secret", "shmget", "shmat", "msgget", "semget", "mq_open",
    # File capabilities and other extended attributes (a privilege a file could carry).
    "setxattr", "lsetxattr", "fsetxattr", "setxattrat",
    # Another process's view: compare its descriptors, or advise on its memory.
    "kcmp", "process_madvise", "process_mrelease",
)  # fmt: skip
# System calls whose first argument names a process: allowed for 0 (the caller) only, so
# the supervisor can be neither limited, slowed nor pinned (a filter cannot compare one
# argument with two values, and the worker's own pid is not needed: 0 means it).
SELF_ONLY_SYSCALLS = (
    "prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr",
    "migrate_pages", "move_pages", "get_robust_list",
)  # fmt: skip
# Where a file's mode is an argument: never setuid or setgid (the workspace is the host's
# folder, and such a file there runs as the assistant's user for anyone who reaches it).
MODE_ARGUMENT = {
    "chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2, "creat": 1, "open": 2,
    "openat": 3, "mkdir": 1, "mkdirat": 2,
}  # fmt: skip
SET_ID_BITS = (0o4000, 0o2000)  # S_ISUID, S_ISGID
# A file with no name from the start, which no scan of the workspace finds (Python's
# tempfile falls back to a named file that it unlinks; the host counts those).
O_TMPFILE_BIT = getattr(os, "O_TMPFILE", 0o20200000) & ~getattr(os, "O_DIRECTORY", 0o200000)
FLAGS_ARGUMENT = {"open": 1, "openat": 2}
# fcntl/ioctl commands that make the kernel signal a chosen process (SIGIO, SIGURG).
F_SETOWN, F_SETSIG, F_SETOWN_EX = 8, 10, 15
FIOSETOWN, SIOCSPGRP, TIOCSPGRP = 0x8901, 0x8902, 0x5410
PRIO_PROCESS, IOPRIO_WHO_PROCESS = 0, 1


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
        """Deny `name` where all `conditions` hold (several rules for one call: any)."""
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
    # whose flags a filter cannot see, to clone when clone3 is unknown. openat2's mode
    # and flags are in a structure a filter cannot read either; nothing needs it.
    rule("clone", eperm, (0, CMP_MASKED_EQ, CLONE_THREAD, 0))
    rule("clone3", errno_action(errno.ENOSYS))
    rule("openat2", errno_action(errno.ENOSYS))
    rule("socket", eperm, (0, CMP_NE, AF_UNIX, 0))
    pid = os.getpid()
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        rule(name, eperm, (0, CMP_NE, pid, 0))  # signals to itself only
    for name in SELF_ONLY_SYSCALLS:
        rule(name, eperm, (0, CMP_NE, 0, 0))
    rule("setpriority", eperm, (0, CMP_NE, PRIO_PROCESS, 0))
    rule("setpriority", eperm, (1, CMP_NE, 0, 0))
    rule("ioprio_set", eperm, (0, CMP_NE, IOPRIO_WHO_PROCESS, 0))
    rule("ioprio_set", eperm, (1, CMP_NE, 0, 0))
    for command in (F_SETOWN, F_SETSIG, F_SETOWN_EX):
        rule("fcntl", eperm, (1, CMP_EQ, command, 0))
    for command in (FIOSETOWN, SIOCSPGRP, TIOCSPGRP):
        rule("ioctl", eperm, (1, CMP_MASKED_EQ, 0xFFFFFFFF, command))
    for name, arg in MODE_ARGUMENT.items():
        for bit in SET_ID_BITS:
            rule(name, eperm, (arg, CMP_MASKED_EQ, bit, bit))
    for name, arg in FLAGS_ARGUMENT.items():
        rule(
            name, errno_action(errno.EOPNOTSUPP), (arg, CMP_MASKED_EQ, O_TMPFILE_BIT, O_TMPFILE_BIT)
        )
    rc = lib.seccomp_load(ctx)
    if rc < 0:
        raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    return True


def worker(requests: socket.socket, settings: dict) -> None:
    """The forked worker: its request socket only, limits, filter, then code until EOF."""
    keep = requests.fileno()
    os.closerange(3, keep)  # every other descriptor goes, the protocol's too
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    os.closerange(keep + 1, hard if 0 < hard < 1 << 20 else 1 << 16)
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
    while request := _receive(requests):
        code, answer_fd = request
        answer = truncate(run(code, scope), limit).encode("utf-8", "replace")
        with contextlib.suppress(OSError), os.fdopen(answer_fd, "wb") as out:
            out.write(HEADER.pack(len(answer)) + answer)
    os._exit(0)


def _receive(requests: socket.socket) -> tuple[str, int] | None:
    """The next cell and the descriptor its answer goes to; None at the end."""
    try:
        header, fds, _, _ = socket.recv_fds(requests, HEADER.size, 1)
    except OSError:
        return None
    if len(header) < HEADER.size or len(fds) != 1:
        return None
    data = _recv_exactly(requests, HEADER.unpack(header)[0])
    if data is None:
        os.close(fds[0])
        return None
    return data.decode("utf-8", "replace"), fds[0]


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------- the supervisor


class Worker:
    """The supervisor's handle on one worker.

    Each call's answer travels through a pipe made for that call alone: its write end goes
    to the worker with the code (SCM_RIGHTS), and the answer is what arrives before the
    pipe's end. A frame the code writes itself, early or from a thread left running, makes
    two frames (or no end) in that pipe and is refused as broken, so an answer can never
    be taken for another call's.
    """

    def __init__(self, settings: dict) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (runs in the child)
            try:
                mine.close()
                worker(theirs, settings)
            finally:
                os._exit(70)
        theirs.close()
        mine.shutdown(socket.SHUT_RD)  # nothing the worker writes here is ever read
        self.pid, self.requests = pid, mine
        self.cap = settings["max_output_chars"] * 4 + 256  # UTF-8 and the notice
        self.silent = False  # the last call's pipe ended with nothing in it

    def ask(self, code: str) -> str | None:
        """Send one cell; the worker's answer, or None if it died or broke the framing."""
        data = code.encode("utf-8", "replace")
        answer_r, answer_w = os.pipe()
        try:
            try:
                socket.send_fds(self.requests, [HEADER.pack(len(data))], [answer_w])
                self.requests.sendall(data)
            finally:
                os.close(answer_w)
            frame = _read_to_end(answer_r, HEADER.size + self.cap)
        except OSError:
            return None
        finally:
            os.close(answer_r)
        # Nothing at all before the pipe's end: the worker is gone (a limit killed it);
        # its exit is then waited for, so the report says which limit. (Code that closes
        # its own answer pipe and lives on is waited for until the call's timeout.)
        self.silent = frame == b""
        if frame is None or len(frame) < HEADER.size:
            return None
        if HEADER.unpack(frame[: HEADER.size])[0] != len(frame) - HEADER.size:
            return None
        return frame[HEADER.size :].decode("utf-8", "replace")

    def pause(self) -> None:
        """Stop every thread of it until the next call (and wait until it is stopped)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGSTOP)
            os.waitpid(self.pid, os.WUNTRACED)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)

    def end(self) -> None:
        """Kill it (if it still runs), reap it, close its socket."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # already reaped by died()
            os.waitpid(self.pid, 0)
        self.requests.close()

    def died(self) -> int | None:
        """Its exit status as `subprocess` reports one (-N for signal N) if it has ended
        on its own (e.g. a limit killed it); None while it runs. After a silent end it
        is waited for: the pipe closes as it exits, a moment before it can be reaped."""
        pid, status = os.waitpid(self.pid, 0 if self.silent else os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if pid else None


def _read_to_end(fd: int, cap: int) -> bytes | None:
    """Everything until the pipe's end; None past `cap` bytes."""
    chunks, size = [], 0
    while chunk := os.read(fd, 1 << 16):
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
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
    if (uid := settings.get("become")) is not None:
        # Started as root in the namespace with only the capabilities to do this; becoming
        # another uid clears them all, and nothing here can regain them (no_new_privs).
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    os.chdir(settings["workspace"])
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
