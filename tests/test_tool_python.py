"""The python tool's sandbox: it runs the model's code, and contains what it must not do."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from llm.tools.python_sandbox import NO_OUTPUT, PythonSandbox, SandboxLimits


@pytest.fixture
def sandbox(tmp_path: Path):
    box = PythonSandbox(tmp_path / "ws", SandboxLimits(timeout_s=10, cpu_s=10, memory_mb=1024))
    yield box
    box.close()


def test_output_errors_and_notebook_state(sandbox: PythonSandbox) -> None:
    assert sandbox.run("x = 6 * 7\nx") == "42\n"  # a final expression is shown
    assert sandbox.run("print(x + 1)") == "43\n"  # state persists between calls
    assert sandbox.run("x = 1") == NO_OUTPUT
    err = sandbox.run("1 / 0")
    assert err.startswith("Traceback") and "ZeroDivisionError: division by zero" in err
    assert "sandbox_child" not in err  # the model sees its own code's frames only
    assert "SyntaxError" in sandbox.run("def (")


def test_stateless_mode_forgets(tmp_path: Path) -> None:
    box = PythonSandbox(tmp_path, SandboxLimits(persistent=False))
    try:
        box.run("x = 1")
        assert "NameError" in box.run("x")
    finally:
        box.close()


def test_workspace_files_and_numpy_work(sandbox: PythonSandbox) -> None:
    sandbox.run("open('data.txt', 'w').write('hello')")
    assert (sandbox.workspace / "data.txt").read_text() == "hello"
    assert sandbox.run("import numpy as np\nprint(np.arange(4).sum())") == "6\n"


@pytest.mark.parametrize(
    ("code", "refusal"),
    [
        ("open('/etc/hostname').read()", "/etc/hostname: outside the workspace"),
        ("open('../outside.txt', 'w').write('x')", "outside the workspace"),
        ("import os; os.listdir('/')", "/: outside the workspace"),
        ("import os; os.chdir('/tmp')", "/tmp: outside the workspace"),
        ("import os; os.symlink('/etc/passwd', 'p')", "outside the workspace"),
        ("import os; os.remove('/tmp/x')", "outside the workspace"),
        ("import os; os.fork()", "os.fork is not allowed"),
        ("import subprocess; subprocess.run(['true'])", "subprocess.Popen is not allowed"),
        ("import os; os.system('true')", "os.system is not allowed"),
        ("import ctypes; ctypes.CDLL(None)", "ctypes.dlopen is not allowed"),
        ("import ctypes; ctypes.pythonapi.system", "ctypes.dlsym is not allowed"),
        ("import resource; resource.setrlimit(resource.RLIMIT_CPU, (-1, -1))", "not allowed"),
    ],
)
def test_escapes_are_refused_and_reported(sandbox: PythonSandbox, code: str, refusal: str) -> None:
    out = sandbox.run(code)
    assert "PermissionError" in out and refusal in out
    assert sandbox.run("print('still here')") == "still here\n"


def test_no_network_even_to_a_local_server(sandbox: PythonSandbox) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    server.settimeout(3)

    def accept() -> None:
        with contextlib.suppress(OSError):  # timed out: nobody connected
            accepted.append(server.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    out = sandbox.run(
        f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    )
    t.join(4)
    server.close()
    assert "connected" not in out and "not allowed" in out
    assert not accepted


def test_environment_holds_no_secrets(sandbox: PythonSandbox, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    sandbox.close()  # the next call starts a process under this environment
    assert "sk-secret" not in sandbox.run("import os; print(dict(os.environ))")


def test_timeout_kills_and_restarts(tmp_path: Path) -> None:
    box = PythonSandbox(tmp_path, SandboxLimits(timeout_s=1.5, cpu_s=30))
    try:
        box.run("kept = 1")
        out = box.run("while True: pass")
        assert out.startswith("Timed out after 1.5 s") and "Variables" in out
        assert "NameError" in box.run("kept")  # a fresh process
    finally:
        box.close()


def test_memory_limit(sandbox: PythonSandbox) -> None:
    out = sandbox.run("block = bytearray(4 * 1024**3)")
    assert "MemoryError" in out
    assert sandbox.run("print(1)") == "1\n"


def test_cpu_limit_kills_a_busy_process(tmp_path: Path) -> None:
    box = PythonSandbox(tmp_path, SandboxLimits(timeout_s=20, cpu_s=1))
    try:
        out = box.run("while True: pass")
        assert "killed by SIGXCPU" in out or "killed by SIGKILL" in out
    finally:
        box.close()


def test_fork_bomb_is_contained(sandbox: PythonSandbox) -> None:
    out = sandbox.run("import os\nwhile True:\n    os.fork()")
    assert "os.fork is not allowed" in out
    out = sandbox.run("import multiprocessing as mp\np = mp.Process(target=print)\np.start()")
    assert "not allowed" in out


def test_long_output_is_truncated(tmp_path: Path) -> None:
    box = PythonSandbox(tmp_path, SandboxLimits(max_output_chars=100))
    try:
        out = box.run("print('y' * 1000)")
        assert out.startswith("y" * 100) and "[output truncated: 901 more characters]" in out
    finally:
        box.close()


def test_a_flood_of_output_is_cut_in_the_sandbox(tmp_path: Path) -> None:
    """200 MB printed: only the limit crosses to the assistant's process."""
    box = PythonSandbox(tmp_path, SandboxLimits(max_output_chars=1000, memory_mb=2048))
    try:
        raw_reply = []
        real = box._read_reply

        def spy(deadline: float) -> bytes | None:
            raw_reply.append(real(deadline))
            return raw_reply[-1]

        box._read_reply = spy  # type: ignore[method-assign]
        out = box.run("for _ in range(200):\n    print('z' * 1_000_000)")
        assert out.startswith("z" * 1000) and "[output truncated: " in out
        assert raw_reply[0] is not None and len(raw_reply[0]) < 2000
    finally:
        box.close()


def test_writes_to_fd1_cannot_break_the_protocol(sandbox: PythonSandbox) -> None:
    sandbox.run("import os; os.write(1, b'garbage\\n'); os.write(2, b'more\\n')")
    assert sandbox.run("print('ok')") == "ok\n"
