"""The python tool's child process: runs the model's code under audit hooks.

Started by `llm.tools.python_sandbox` as `python -I sandbox_child.py WORKSPACE REPLY_FD`
with its limits in an environment variable. Only the standard library is imported here.
Requests arrive as JSON lines on stdin ({"code": …}); each answer is one JSON line on
REPLY_FD ({"output": stdout then stderr, cut at the output limit here, so that a flood
of output never crosses the pipe}), so what the code writes to fd 1 or 2 cannot corrupt
it.

Audit hooks (PEP 578) refuse, for the code and everything it imports: files outside the
workspace (reading is also allowed under the Python installation), sockets, new
processes, ctypes and raising resource limits. They cannot be removed once installed.
They are not a boundary against hostile native code: the parent adds OS limits (memory,
CPU time, a network namespace where the OS offers one, a wall-clock kill).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import resource
import sys
import traceback

WORKSPACE = os.path.realpath(sys.argv[1])
READ_ROOTS = tuple(
    {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    | {"/usr/share/zoneinfo", "/etc/localtime", "/dev/null", "/dev/urandom"}
)
DENIED_PREFIXES = ("socket.", "subprocess.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn")
DENIED = {
    "os.fork",
    "os.forkpty",
    "os.system",
    "os.kill",
    "os.killpg",
    "pty.spawn",
    "resource.setrlimit",
    "resource.prlimit",
    "sys.addaudithook",
    "webbrowser.open",
    "urllib.Request",
    "ftplib.connect",
    "smtplib.connect",
    "os.chroot",
    "os.setuid",
    "os.setgid",
}
WRITE_EVENTS = {
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.truncate",
    "os.utime",
    "os.symlink",
    "os.link",
    "shutil.rmtree",
    "shutil.copyfile",
    "shutil.move",
}
LIST_EVENTS = {"os.listdir", "os.scandir", "glob.glob"}


def _inside(path: object, roots: tuple[str, ...]) -> bool:
    if isinstance(path, int):  # an already open descriptor
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str | os.PathLike):
        return False
    real = os.path.realpath(path)  # relative to the cwd, which stays in the workspace
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


CTYPES_INIT = os.path.join(os.path.dirname(os.__file__), "ctypes", "__init__.py")


def _importing_ctypes() -> bool:
    """True while the ctypes package itself runs at import: it opens the running process
    (`pythonapi = PyDLL(None)`), and numpy imports ctypes. Every later ctypes use (looking
    up or calling a C function, loading a library) is refused."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_code.co_filename == CTYPES_INIT:
            return True
        frame = frame.f_back
    return False


def _hook(event: str, args: tuple) -> None:
    if event == "ctypes.dlopen" and args[0] is None and _importing_ctypes():
        return
    if event in DENIED or event.startswith(DENIED_PREFIXES):
        raise PermissionError(f"{event} is not allowed in this sandbox")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        roots = (WORKSPACE,) if writing else (WORKSPACE, *READ_ROOTS)
        if path is not None and not _inside(path, roots):
            raise PermissionError(f"{path}: outside the workspace")
    elif event == "os.chdir":
        if not _inside(args[0], (WORKSPACE,)):
            raise PermissionError(f"{args[0]}: outside the workspace")
    elif event in WRITE_EVENTS:
        for p in args[:2]:
            if isinstance(p, str | bytes | os.PathLike) and not _inside(p, (WORKSPACE,)):
                raise PermissionError(f"{p}: outside the workspace")
    elif event in LIST_EVENTS:
        p = args[0] if args else "."
        if not _inside("." if p is None else p, (WORKSPACE, *READ_ROOTS)):
            raise PermissionError(f"{p}: outside the workspace")


def run(code: str, scope: dict) -> tuple[str, str]:
    """Execute `code` in `scope`; like a notebook cell, echo a final expression's value."""
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
    return out.getvalue(), err.getvalue()


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[output truncated: {len(text) - limit} more characters]"


def _set_limits(limits: dict) -> None:
    wanted = {
        resource.RLIMIT_CPU: limits.get("cpu_s"),
        resource.RLIMIT_AS: limits.get("memory_mb") and limits["memory_mb"] << 20,
        resource.RLIMIT_FSIZE: limits.get("memory_mb") and limits["memory_mb"] << 20,
        resource.RLIMIT_NPROC: 0,  # no new processes (root is exempt: the hooks still refuse)
        resource.RLIMIT_CORE: 0,
    }
    for what, value in wanted.items():
        if value is None:
            continue
        _, hard = resource.getrlimit(what)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # macOS refuses some limits (RLIMIT_AS among them); the others still hold.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(what, (value, value))


def main() -> None:
    os.chdir(WORKSPACE)
    reply = os.fdopen(int(sys.argv[2]), "w", encoding="utf-8")
    limits = json.loads(os.environ.pop("MLX_HARMONY_SANDBOX_LIMITS", "{}"))
    max_chars = int(limits.get("max_output_chars", 8000))
    _set_limits(limits)
    requests = sys.stdin
    sys.stdin = io.StringIO()  # the code must not read the protocol
    sys.path[:0] = [WORKSPACE]
    sys.addaudithook(_hook)
    scope: dict = {"__name__": "__main__"}
    for line in requests:
        code = json.loads(line)["code"]
        stdout, stderr = run(code, scope)
        reply.write(json.dumps({"output": _truncate(stdout + stderr, max_chars)}) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
