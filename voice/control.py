"""The control socket: other programs tell the running assistant what to do.

A Unix domain socket in the user's runtime folder (mode 0600, in a folder only the user
may enter), JSON lines both ways. Each request is one object, `{"cmd": "status"}`,
`{"cmd": "ask", "text": "…"}`; each answer ends with one line holding `"ok"`, after
`"event"` lines for an answer that streams. Connections from another user are refused
by the peer's credentials, not only by the file mode; a client refuses a socket that is
not private, so nobody can plant one that collects questions.

The server only moves requests and replies: the daemon (`voice.daemon`) runs them on the
thread that owns the models.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from mlx_harmony.llm.errors import ConfigError, first_error

Command = Literal["status", "mute", "unmute", "stop", "listen", "new-chat", "say", "ask"]
# A request line longer than this is refused (a typed question fits many times over).
MAX_LINE = 64 * 1024
# Requests that carry a text, and those that must not.
WITH_TEXT = ("say", "ask")


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cmd: Command
    text: str | None = None
    id: str | int | None = None

    @model_validator(mode="after")
    def _text_where_needed(self) -> Request:
        if self.cmd in WITH_TEXT and not (self.text or "").strip():
            raise ValueError(f"'{self.cmd}' needs a non-empty 'text'")
        if self.cmd not in WITH_TEXT and self.text is not None:
            raise ValueError(f"'{self.cmd}' takes no 'text'")
        return self


def parse_request(line: bytes | str) -> Request:
    """One request line; a ConfigError names what is wrong with it."""
    try:
        raw = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
        raise ConfigError(f"not a JSON line ({e})") from None
    except RecursionError:  # 60,000 `[`: json recurses once per level
        raise ConfigError("not a request: nested too deeply") from None
    return validate_request(raw)


def validate_request(raw: object) -> Request:
    if not isinstance(raw, dict):
        raise ConfigError('a request is a JSON object such as {"cmd": "status"}')
    try:
        return Request.model_validate(raw)
    except ValidationError as e:
        where, msg = first_error(e)
        raise ConfigError(f"field '{where}': {msg}" if where else msg) from None


class Reply:
    """Where the daemon sends a request's answer: `event` lines, then one `done`.

    Thread-safe and never blocking: lines are queued for the connection's own thread, so a
    client that stops reading cannot stall the thread that owns the models.
    """

    def __init__(self, request_id: str | int | None = None) -> None:
        self.id = request_id
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.finished = threading.Event()

    def event(self, **fields: Any) -> None:
        if not self.finished.is_set():
            self.lines.put(self._tag(fields))

    def done(self, **fields: Any) -> None:
        if not self.finished.is_set():
            self.finished.set()
            self.lines.put(self._tag({"ok": True, **fields}))

    def error(self, message: str) -> None:
        if not self.finished.is_set():
            self.finished.set()
            self.lines.put(self._tag({"ok": False, "error": message}))

    def _tag(self, fields: dict[str, Any]) -> dict[str, Any]:
        return fields if self.id is None else {"id": self.id, **fields}


class Controlled(Protocol):
    """What the server drives: the running assistant (or a stand-in while it loads)."""

    def status(self) -> dict[str, Any]: ...
    def submit(self, request: Request, reply: Reply) -> None: ...


class Loading:
    """Answers while the models load: status says so, other commands wait for nothing."""

    def status(self) -> dict[str, Any]:
        return {"state": "loading"}

    def submit(self, request: Request, reply: Reply) -> None:
        reply.error("the assistant is still loading its models")


# ---------------------------------------------------------------------- where it lives


def default_socket_path() -> Path:
    """`$XDG_RUNTIME_DIR/mlx-harmony/voice.sock`; else the per-user temporary folder on
    macOS, else `/tmp/mlx-harmony-<uid>/voice.sock`."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "mlx-harmony" / "voice.sock"
    if sys.platform == "darwin":  # $TMPDIR is private to the user there
        return Path(tempfile.gettempdir()) / "mlx-harmony" / "voice.sock"
    return Path("/tmp") / f"mlx-harmony-{os.getuid()}" / "voice.sock"


def _check_private(path: Path, kind: str, want: Callable[[int], bool]) -> None:
    st = path.lstat()
    if not want(st.st_mode):
        raise ConfigError(f"{path}: not a {kind}; refusing to use it")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path}: owned by uid {st.st_uid}, not you; refusing to use it")
    if st.st_mode & 0o077:
        mode = oct(stat.S_IMODE(st.st_mode))
        raise ConfigError(f"{path}: other users may use it (mode {mode}); refusing to use it")


def _private_folder(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(folder, "folder", stat.S_ISDIR)


def peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's user id, from the kernel (None where it cannot be read)."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux: struct ucred {pid, uid, gid}
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    if sys.platform == "darwin":  # LOCAL_PEERCRED: struct xucred {version, uid, ...}
        sol_local, local_peercred = 0, 1
        creds = conn.getsockopt(sol_local, local_peercred, 76)
        return struct.unpack_from("=II", creds)[1]
    return None


# ---------------------------------------------------------------------- server


class ControlServer:
    """Listens on the socket in threads of its own; `handler` may be swapped while it runs
    (a `Loading` stand-in first, the assistant once its models are loaded). `about` is
    added to every status answer (pid, start time, model, config)."""

    def __init__(
        self, path: Path, handler: Controlled, about: dict[str, Any] | None = None
    ) -> None:
        self.path, self.handler, self.about = path, handler, about or {}
        self._sock: socket.socket | None = None
        self._closed = threading.Event()

    def open(self) -> None:
        _private_folder(self.path.parent)
        if self.path.exists() or self.path.is_symlink():
            _check_private(self.path, "socket", stat.S_ISSOCK)
            if _answers(self.path):
                raise ConfigError(
                    f"another mlx-harmony-voice is running (control socket {self.path})"
                )
            self.path.unlink()  # left by an assistant that did not stop cleanly
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # no moment in which the socket is open to others
        try:
            sock.bind(str(self.path))
        except OSError as e:
            sock.close()
            raise ConfigError(f"{self.path}: cannot create the control socket: {e}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._inode = self.path.stat().st_ino
        sock.listen(16)
        self._sock = sock
        threading.Thread(target=self._accept, name="control-accept", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        # Remove the socket only if it is still ours (not one a later instance made).
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()

    def _accept(self) -> None:
        while not self._closed.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="control-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if peer_uid(conn) != os.getuid():
                _send(conn, {"ok": False, "error": "refused: another user's connection"})
                return
            reader = conn.makefile("rb")
            while not self._closed.is_set():
                line = reader.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE and not line.endswith(b"\n"):
                    _send(conn, {"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    return
                if not line.strip():
                    continue
                if not self._answer(conn, line):
                    return

    def _answer(self, conn: socket.socket, line: bytes) -> bool:
        """Run one request and relay its reply; False once the client has gone."""
        try:
            request = parse_request(line)
        except ConfigError as e:
            return _send(conn, {"ok": False, "error": str(e)})
        reply = Reply(request.id)
        if request.cmd == "status":
            reply.done(**{**self.about, **self.handler.status()})
        else:
            self.handler.submit(request, reply)
        while True:
            try:
                fields = reply.lines.get(timeout=0.5)
            except queue.Empty:
                if self._closed.is_set():
                    return _send(conn, {"ok": False, "error": "the assistant stopped"})
                continue
            if not _send(conn, fields):
                return False
            if "ok" in fields:
                return True


def _send(conn: socket.socket, fields: dict[str, Any]) -> bool:
    try:
        conn.sendall(json.dumps(fields, ensure_ascii=False).encode() + b"\n")
        return True
    except OSError:
        return False


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


# ---------------------------------------------------------------------- client


class NotRunning(ConfigError):
    """Nothing listens on the control socket."""


def send_request(
    path: Path,
    request: dict[str, Any],
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Send one request to a running assistant; return its final line (with "ok")."""
    try:
        _check_private(path, "socket", stat.S_ISSOCK)
    except FileNotFoundError:
        raise NotRunning(f"no assistant is running (no control socket at {path})") from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as e:
            raise NotRunning(f"no assistant answers on {path} ({e.strerror or e})") from None
        sock.sendall(json.dumps(request, ensure_ascii=False).encode() + b"\n")
        for raw in sock.makefile("rb"):
            fields = json.loads(raw)
            if "ok" in fields:
                return fields
            if on_event is not None:
                on_event(fields)
    raise ConfigError(f"{path}: the assistant closed the connection without an answer")
