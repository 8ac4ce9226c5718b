"""The python tool's sandbox: it runs the model's code, and the OS contains what it must not
do. Each escape below was seen working against the earlier in-process checks; here every
one must fail, in a fresh sandbox with default limits."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.tools.python_sandbox import (
    NO_OUTPUT,
    PythonSandbox,
    SandboxLimits,
    python_roots,
    sandbox_exec_profile,
)
from mlx_harmony.llm.tools.tree import remove_tree

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the confinement under test is bubblewrap's"
)


@pytest.fixture
def sandbox(tmp_path: Path):
    box = PythonSandbox(tmp_path / "ws", SandboxLimits(timeout_s=20, cpu_s=10, memory_mb=1024))
    yield box
    box.close()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file of the user's beside the workspace, which the code must not reach."""
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's secret\n")
    return secret


@pytest.mark.heavy
def test_output_errors_and_notebook_state(sandbox: PythonSandbox) -> None:
    assert sandbox.run("x = 6 * 7\nx") == "42\n"  # a final expression is shown
    assert sandbox.run("print(x + 1)") == "43\n"  # state persists between calls
    assert sandbox.run("x = 1") == NO_OUTPUT
    err = sandbox.run("1 / 0")
    assert err.startswith("Traceback") and "ZeroDivisionError: division by zero" in err
    assert "sandbox_child" not in err  # the model sees its own code's frames only
    assert "SyntaxError" in sandbox.run("def (")


@pytest.mark.heavy
def test_stateless_mode_forgets(tmp_path: Path) -> None:
    box = PythonSandbox(tmp_path, SandboxLimits(persistent=False))
    try:
        box.run("x = 1")
        assert "NameError" in box.run("x")
    finally:
        box.close()


@pytest.mark.heavy
def test_ordinary_code_works(sandbox: PythonSandbox) -> None:
    """Files in the workspace, numpy, threads, temporary files."""
    sandbox.run("open('data.txt', 'w').write('hello')")
    assert (sandbox.workspace / "data.txt").read_text() == "hello"
    assert sandbox.run("print(open('data.txt').read())") == "hello\n"
    assert sandbox.run("import numpy as np\nprint(np.arange(4).sum())") == "6\n"
    threads = (
        "import threading\nout = []\n"
        "ts = [threading.Thread(target=out.append, args=(i,)) for i in range(16)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\nprint(sorted(out) == list(range(16)))"
    )
    assert sandbox.run(threads) == "True\n"
    assert sandbox.run("import tempfile\nwith tempfile.TemporaryFile() as f: f.write(b'x')") == (
        NO_OUTPUT
    )


@pytest.mark.heavy
def test_the_workspace_is_not_on_the_import_path(sandbox: PythonSandbox) -> None:
    """A module the code writes (or a file a page planted) is not imported by name."""
    sandbox.run("open('json.py', 'w').write(\"print('planted')\")")
    out = sandbox.run("import json, os, sys\nprint(os.getcwd() in sys.path, '' in sys.path)")
    assert out == "False False\n"


# The in-process audit hooks of earlier versions could be switched off from the code; the
# OS boundary has no such switch. Each escape is tried as the attacker would.
ESCAPES = {
    "read a system file": "print(open('/etc/passwd').read())",
    "read the user's file": "print(open({secret!r}).read())",
    "dir_fd outside": (
        "import os\nfd = os.open('/', os.O_RDONLY)\n"
        "print(os.read(os.open('etc/passwd', os.O_RDONLY, dir_fd=fd), 100))"
    ),
    "opener outside": (
        "import os\nprint(open('x', opener=lambda p, f: os.open({secret!r}, f)).read())"
    ),
    "truncate outside": "import os; os.open({secret!r}, os.O_RDONLY | os.O_TRUNC)",
    "write outside": "open('/tmp-outside.txt', 'w').write('x'); print('written')",
    "symlink out": "import os; os.symlink({secret!r}, 'link'); print(open('link').read())",
    "fork": "import os; os.fork(); print('forked')",
    "fork_exec": (
        "import _posixsubprocess, os\n"
        "_posixsubprocess.fork_exec([b'/bin/sh'], [b'/bin/sh'], True, (), None, None, -1, -1,"
        " -1, -1, -1, -1, -1, -1, False, True, None, None, None, -1, None, False)"
    ),
    "subprocess": "import subprocess; subprocess.run(['sh', '-c', 'true'])",
    "os.system": "import os; print(os.system('true'))",
    "ctypes system": "import ctypes; print(ctypes.CDLL(None).system(b'true'))",
    "posix_spawn": "import os; os.posix_spawn('/bin/sh', ['sh'], {{}})",
    "setns": "import os; os.setns(os.open('/proc/1/ns/net', os.O_RDONLY))",
    "mknod": "import os, stat; os.mknod('null2', stat.S_IFCHR | 0o666, os.makedev(1, 3))",
    "kill the parent": "import os; os.kill(os.getppid(), 9)",
    "pidfd the parent": (
        "import os, signal; signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)"
    ),
    "signal everyone": "import os; os.kill(-1, 9)",
    "inet socket": "import socket; socket.create_connection(('127.0.0.1', 22), timeout=2)",
    "ptrace": (
        "import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.ptrace(16, os.getppid(), 0, 0), ctypes.get_errno())"
    ),
    # A setuid file in the workspace is a setuid program on the host, run as the
    # assistant's user by anyone who reaches the folder.
    "setuid copy of python": (
        "import os, shutil, sys\nshutil.copyfile(sys.executable, 'py')\nos.chmod('py', 0o6755)\n"
        "print('written' if os.stat('py').st_mode & 0o6000 else 'plain')"
    ),
    "setuid by creation mode": "import os; os.open('s', os.O_CREAT | os.O_WRONLY, 0o4755)",
    "setgid folder": "import os; os.mkdir('g', 0o2775)",
    # The supervisor (the parent) must be out of reach: no signal queued to it, no
    # limit, priority or CPU pinning set on it, no kernel-sent SIGIO aimed at it.
    "queue SIGSTOP to the parent": (
        "import ctypes, os, platform, struct\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "nr = {{'x86_64': 129, 'aarch64': 138}}[platform.machine()]\n"
        "info = ctypes.create_string_buffer(struct.pack('iii', 19, 0, -1), 128)\n"
        "print(libc.syscall(nr, os.getppid(), 19, info), ctypes.get_errno())"
    ),
    "limit the parent's files": (
        "import os, resource; resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))"
    ),
    "renice the parent": "import os; os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)",
    "pin the parent": "import os; os.sched_setaffinity(os.getppid(), {{0}})",
    "SIGIO to the parent": (
        "import fcntl, os; r, w = os.pipe(); fcntl.fcntl(r, fcntl.F_SETOWN, os.getppid())"
    ),
    # Memory and disk that no limit or scan would count.
    "memfd": "import os; fd = os.memfd_create('m'); os.ftruncate(fd, 2**30)",
    "nameless file": "import os; os.open('.', os.O_TMPFILE | os.O_WRONLY, 0o600)",
    "System V memory": (
        "import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.shmget(0, 2**30, 0o1600), ctypes.get_errno())"
    ),
}
# What each escape would have shown had it worked.
ESCAPED = ("root:x:0:0", "the user's secret", "'home'", "'etc'", "written", "forked")
NOBODY = 65534


@pytest.mark.parametrize("name", ESCAPES)
@pytest.mark.heavy
def test_escapes_fail(sandbox: PythonSandbox, outside: Path, tmp_path: Path, name: str) -> None:
    out = sandbox.run(ESCAPES[name].format(secret=str(outside)))
    assert not any(mark in out for mark in ESCAPED), out
    assert "Error" in out or out.strip() in ("-1 1", "32512", "127"), out
    assert outside.read_text() == "the user's secret\n"
    assert not (tmp_path / "tmp-outside.txt").exists() and not Path("/tmp-outside.txt").exists()
    assert sandbox.run("print('still here')") == "still here\n"
    set_id = [p for p in sandbox.workspace.rglob("*") if p.lstat().st_mode & 0o6000]
    assert not set_id, set_id


@pytest.mark.heavy
def test_the_root_holds_only_the_sandbox(sandbox: PythonSandbox, tmp_path: Path) -> None:
    """Only the sandbox's own folders, and the parents of the Python installation's
    mount point (which may lie under /tmp or /home): nothing else of the host."""
    marker = tmp_path / "host-only.txt"
    marker.write_text("x")
    python_parents = {root.split("/")[1] for root in python_roots()}
    listing = set(eval(sandbox.run("import os; print(sorted(os.listdir('/')))")))
    host_only = {"etc", "home", "proc", "sys", "var", "run", "tmp", "root", "srv"}
    assert listing.isdisjoint(host_only - python_parents), listing
    assert {"workspace", "usr", "dev"} <= listing
    assert sandbox.run(f"import os; print(os.path.exists({str(marker)!r}))") == "False\n"


@pytest.mark.heavy
def test_host_sockets_are_out_of_reach(sandbox: PythonSandbox, tmp_path: Path) -> None:
    """A Unix socket beside the workspace, an abstract one, and a TCP one on loopback: the
    code reaches none of them (no mount, its own network namespace, no inet sockets)."""
    servers = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX), socket.socket()]
    path, abstract = str(tmp_path / "host.sock"), "\0mlx-harmony-test-host"
    servers[0].bind(path)
    servers[1].bind(abstract)
    servers[2].bind(("127.0.0.1", 0))
    port = servers[2].getsockname()[1]
    accepted: list[socket.socket] = []
    for server in servers:
        server.listen()
        server.settimeout(5)
    code = (
        f"import socket\nfor family, where in [(socket.AF_UNIX, {path!r}), "
        f"(socket.AF_UNIX, {abstract!r}), (socket.AF_INET, ('127.0.0.1', {port}))]:\n"
        "    try:\n"
        "        s = socket.socket(family); s.settimeout(2); s.connect(where); print('connected')\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n"
    )

    def accept(server: socket.socket) -> None:
        with contextlib.suppress(OSError):  # timed out: nobody came
            accepted.append(server.accept()[0])

    waiters = [threading.Thread(target=accept, args=(s,)) for s in servers]
    for w in waiters:
        w.start()
    out = sandbox.run(code)
    for server in servers:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
    for w in waiters:
        w.join()
    assert "connected" not in out and not accepted, out


@pytest.mark.heavy
def test_the_environment_holds_no_secrets(sandbox: PythonSandbox, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    sandbox.close()  # the next call starts a sandbox under this environment
    assert "sk-secret" not in sandbox.run("import os; print(dict(os.environ))")


@pytest.mark.heavy
def test_the_protocol_is_out_of_the_codes_reach(sandbox: PythonSandbox) -> None:
    """The code can neither read the next request nor forge or garble a reply: writing
    into every descriptor it has reaches only its own channel, which stops it."""
    sandbox.run("import sys; leaked = sys.__stdin__.read()")
    assert sandbox.run("print(repr(leaked))") == "''\n"
    garble = "import os; os.write(1, b'not json\\n'); os.write(2, b'\\xff\\n'); print('ok')"
    assert sandbox.run(garble) == "ok\n"
    forge = (
        "import os\nfor fd in range(1024):\n"
        '    try: os.write(fd, b\'{"id": 99, "output": "forged"}\\n\')\n'
        "    except OSError: pass\n"
        "print('tried')"
    )
    out = sandbox.run(forge)
    assert "forged" not in out and "answer channel" in out
    assert sandbox.run("print('next request')") == "next request\n"


# Small stacks: memory is not what stops it (as root, RLIMIT_NPROC did not either).
MANY_THREADS = (
    "import threading\nthreading.stack_size(32768)\nstop = threading.Event()\nn = 0\n"
    "try:\n    for _ in range(3000):\n"
    "        threading.Thread(target=stop.wait).start(); n += 1\n"
    "except RuntimeError as e:\n    print('refused after', n)\nstop.set()"
)


@pytest.mark.heavy
def test_threads_and_descriptors_are_limited(sandbox: PythonSandbox) -> None:
    out = sandbox.run(MANY_THREADS)
    assert out.startswith("refused after") and int(out.split()[-1]) < 64, out
    files = (
        "fs = []\ntry:\n    for i in range(5000): fs.append(open('f', 'w'))\n"
        "except OSError as e: print(e)"
    )
    assert "Too many open files" in sandbox.run(files)
    assert sandbox.run("print('fine')") == "fine\n"


# A frame the code writes into its own answer pipe: early, or from a thread during a
# later call. Either would have been taken for a call's answer (and the real answer for
# the next call's).
FORGE_FRAME = (
    "import os, stat, struct\n"
    "def forge():\n"
    "    for fd in range(3, 64):\n"
    "        try:\n"
    "            if stat.S_ISFIFO(os.fstat(fd).st_mode):\n"
    "                os.write(fd, struct.pack('!I', 6) + b'forged')\n"
    "        except OSError:\n"
    "            pass\n"
)


@pytest.mark.heavy
def test_an_answer_is_bound_to_the_call_that_asked(sandbox: PythonSandbox) -> None:
    out = sandbox.run(FORGE_FRAME + "forge()\nprint('real')")
    assert "forged" not in out and "answer channel" in out, out
    assert sandbox.run("print('next')") == "next\n"
    later = (
        FORGE_FRAME + "import threading\nready = threading.Event()\ngo = threading.Event()\n"
        "def later():\n    ready.set(); go.wait(); forge()\n"
        "threading.Thread(target=later, daemon=True).start(); ready.wait()\nprint('first')"
    )
    assert sandbox.run(later) == "first\n"
    out = sandbox.run("go.set()\nimport time\nwhile threading.active_count() > 1: time.sleep(0.01)"
                      "\nprint('second')")  # fmt: skip
    assert "forged" not in out and "answer channel" in out, out
    assert sandbox.run("print('third')") == "third\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="what root's assistant does differently")
@pytest.mark.heavy
def test_as_root_the_code_runs_as_nobody(sandbox: PythonSandbox) -> None:
    """Not the host's root: what it writes is nobody's, and it cannot become root."""
    out = sandbox.run("import os\nopen('made.txt', 'w').write('x')\ntry:\n    os.setuid(0)\n"
                      "except OSError as e:\n    print(e.strerror)")  # fmt: skip
    assert out == "Operation not permitted\n"
    made = sandbox.workspace / "made.txt"
    assert (made.stat().st_uid, made.stat().st_gid) == (NOBODY, NOBODY)


@pytest.mark.heavy
def test_the_worker_is_stopped_between_calls(sandbox: PythonSandbox) -> None:
    """A thread left spinning does not run on between calls: the worker is stopped
    (SIGSTOP) before each reply, so its state reads "T" until the next call."""
    sandbox.run("import threading\nthreading.Thread(target=lambda: [0 for _ in iter(int, 1)],"
                " daemon=True).start()\nimport os\npid = os.getpid()")  # fmt: skip
    assert sandbox._proc is not None
    states = _sandbox_process_states(sandbox._proc.pid)
    assert "T" in states.values(), states


def _sandbox_process_states(root: int) -> dict[int, str]:
    """State letters of the processes under `root` (bwrap), from the host's /proc."""
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            todo += [int(c) for c in children]
        stat = Path(f"/proc/{pid}/stat").read_text()
        found[pid] = stat.rsplit(")", 1)[1].split()[0]
    return found


@pytest.mark.heavy
def test_timeout_kills_and_restarts(tmp_path: Path) -> None:
    box = PythonSandbox(tmp_path, SandboxLimits(timeout_s=1.5, cpu_s=30))
    try:
        box.run("kept = 1")
        out = box.run("while True: pass")
        assert out.startswith("Timed out after 1.5 s") and "Variables" in out
        assert "NameError" in box.run("kept")  # a fresh sandbox
    finally:
        box.close()


@pytest.mark.heavy
def test_memory_limit(sandbox: PythonSandbox) -> None:
    out = sandbox.run("block = bytearray(4 * 1024**3)")
    assert "MemoryError" in out
    assert sandbox.run("print(1)") == "1\n"


@pytest.mark.heavy
def test_cpu_limit_kills_a_busy_process(tmp_path: Path) -> None:
    box = PythonSandbox(tmp_path, SandboxLimits(timeout_s=20, cpu_s=1))
    try:
        out = box.run("while True: pass")
        assert "killed by SIGXCPU" in out or "killed by SIGKILL" in out
    finally:
        box.close()


@pytest.mark.heavy
def test_the_workspace_cannot_fill_the_disk(tmp_path: Path) -> None:
    """Many files, each under the file-size limit, past `disk_mb` in all: stopped."""
    ws = tmp_path / "ws"
    box = PythonSandbox(ws, SandboxLimits(timeout_s=60, disk_mb=20))
    try:
        flood = "chunk = b'x' * 2**20\nfor i in range(2000):\n    open(f'f{i}', 'wb').write(chunk)"
        out = box.run(flood)
        assert "grew past its 20 MB limit" in out
        used = sum(f.stat().st_size for f in ws.iterdir())
        assert used < 1000 * 2**20  # stopped well before its 2 GB
        cleanup = "import os\nfor f in os.listdir(): os.remove(f)\nprint('cleaned')"
        assert box.run(cleanup) == "cleaned\n"  # over the limit, it may still delete
    finally:
        box.close()


@pytest.mark.parametrize(
    ("name", "code"),
    [
        (
            "files unlinked while held open",
            "import os\nheld = []\nfor i in range(40):\n    f = open(f'h{i}', 'wb')\n"
            "    os.unlink(f'h{i}'); f.write(b'x' * (7 << 20)); f.flush(); held.append(f)\n"
            "print('held', len(held))",
        ),
        (
            "a file below PATH_MAX's depth",
            "import os\nfor i in range(2100):\n    os.mkdir('dd'); os.chdir('dd')\n"
            "open('big', 'wb').write(b'x' * (30 << 20))\nprint('hidden')",
        ),
        # Empty files take no blocks (nor, on tmpfs, do empty folders), but inodes and scans.
        ("empty files", "for i in range(100_000): open(f'e{i}', 'w').close()\nprint('made')"),
    ],
)
@pytest.mark.heavy
def test_what_no_scan_saw_counts_against_the_disk_limit(
    tmp_path: Path, name: str, code: str
) -> None:
    """280 MB in files without a name, 30 MB deeper than a path can name, and 100,000
    empty files, past a 16 MB limit."""
    ws = tmp_path / "ws"
    box = PythonSandbox(ws, SandboxLimits(timeout_s=60, disk_mb=16))
    try:
        out = box.run(code)
        assert "grew past its 16 MB limit" in out, (name, out)
        assert sum(1 for _ in ws.iterdir()) < 100_000
        assert box.run("print('again')") == "again\n"
    finally:
        box.close()
        remove_tree(ws)  # pytest's own clean-up recurses and would fail on the deep one


@pytest.mark.heavy
def test_long_output_is_truncated(tmp_path: Path) -> None:
    box = PythonSandbox(tmp_path, SandboxLimits(max_output_chars=100))
    try:
        out = box.run("print('y' * 1000)")
        assert out.startswith("y" * 100) and "[output truncated: 901 more characters]" in out
    finally:
        box.close()


@pytest.mark.heavy
def test_a_flood_of_output_is_cut_in_the_sandbox(tmp_path: Path) -> None:
    """200 MB printed: only the limit crosses to the assistant's process."""
    box = PythonSandbox(tmp_path, SandboxLimits(max_output_chars=1000, memory_mb=2048))
    try:
        out = box.run("for _ in range(200):\n    print('z' * 1_000_000)")
        assert out.startswith("z" * 1000) and "[output truncated: " in out
        assert len(out) < 1100
    finally:
        box.close()


@pytest.mark.heavy
def test_without_confinement_the_tool_refuses_unless_told(tmp_path: Path, monkeypatch) -> None:
    from mlx_harmony.llm.tools import python_sandbox

    monkeypatch.setattr(python_sandbox, "_bwrap_works", lambda: False)
    with pytest.raises(ConfigError) as err:
        PythonSandbox(tmp_path)
    assert "install bubblewrap" in str(err.value) and '"none"' in str(err.value)
    box = PythonSandbox(tmp_path, SandboxLimits(confinement="none"))
    try:
        assert box.run("print(6 * 7)") == "42\n"
    finally:
        box.close()


def test_the_macos_profile_denies_network_exec_and_writes_outside(tmp_path: Path) -> None:
    profile = sandbox_exec_profile(tmp_path)
    assert profile.startswith("(version 1)")
    assert "(deny network*)" in profile
    assert f'(deny process-exec (require-not (literal "{os.path.realpath(sys.executable)}")))' in (
        profile
    )
    assert f'(subpath "{tmp_path.resolve()}")' in profile
    assert profile.count("(") == profile.count(")")


UNPRIVILEGED = """
import json, sys
from pathlib import Path
from mlx_harmony.llm.tools.python_sandbox import PythonSandbox, SandboxLimits
codes = json.load(sys.stdin)
box = PythonSandbox(Path(sys.argv[1]), SandboxLimits(timeout_s=20))
results = {}
for name, code in codes.items():
    results[name] = [box.run(code), box.run("print('still here')")]
box.close()
print(json.dumps(results))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
    reason="needs root to act as another user, and a system Python that user may run",
)
@pytest.mark.heavy
def test_an_unprivileged_assistant_is_confined_the_same_way(tmp_path: Path) -> None:
    """The assistant run by an ordinary user (uid 65534 here): the same escapes fail and
    ordinary code (files, threads) works. The project's own Python may live where only
    root enters, so the system's runs it, with a copy of the tool's modules (the sandbox
    needs only the standard library)."""
    import json
    import shutil
    import subprocess
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="mlx-harmony-unprivileged-"))
    try:
        repo = Path(__file__).parent.parent
        shutil.copytree(repo / "llm", home / "mlx_harmony" / "llm")
        shutil.copy(repo / "mlx_harmony" / "__init__.py", home / "mlx_harmony")
        (home / "ws").mkdir()
        secret = home / "secret.txt"
        secret.write_text("the user's secret\n")
        for path in [home, *home.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.chown(home / "ws", NOBODY, NOBODY)
        codes = {name: code.format(secret=str(secret)) for name, code in ESCAPES.items()}
        codes["thread cap"] = MANY_THREADS
        codes["files and threads"] = (
            "import threading\nopen('mine.txt', 'w').write('ok')\nout = []\n"
            "ts = [threading.Thread(target=out.append, args=(1,)) for _ in range(8)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "print(open('mine.txt').read(), sum(out))"
        )
        out = subprocess.run(
            ["/usr/bin/python3", "-c", UNPRIVILEGED, str(home / "ws")],
            input=json.dumps(codes), capture_output=True, text=True, timeout=300,
            user=NOBODY, group=NOBODY, extra_groups=[], cwd=home,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(home)},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        results = json.loads(out.stdout)
        assert results.pop("files and threads") == ["ok 8\n", "still here\n"]
        capped = results.pop("thread cap")[0]
        assert capped.startswith("refused after") and int(capped.split()[-1]) < 64, capped
        for name, (answer, after) in results.items():
            assert not any(mark in answer for mark in ESCAPED), (name, answer)
            assert after == "still here\n", (name, after)
        assert secret.read_text() == "the user's secret\n"
        assert not [p for p in (home / "ws").rglob("*") if p.lstat().st_mode & 0o6000]
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.heavy
def test_calls_work_while_the_assistant_holds_many_descriptors(sandbox: PythonSandbox) -> None:
    """A server with 1,100 open connections: select() breaks above 1,023 descriptors; the
    sandbox's reply is read with selectors (poll/epoll) and still arrives."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4096)
    if wanted < 1200:
        pytest.skip(f"this process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert sandbox.run("print('answered')") == "answered\n"
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.heavy
def test_a_sandbox_that_cannot_start_is_an_answer_not_a_crash(tmp_path: Path, monkeypatch) -> None:
    """E.g. root's user namespace refused (user.max_user_namespaces = 0)."""
    from mlx_harmony.llm.tools import python_sandbox

    def refused(*_: object, **__: object) -> None:
        raise OSError("could not create a user namespace for the python tool")

    box = PythonSandbox(tmp_path / "ws", SandboxLimits(timeout_s=20))
    monkeypatch.setattr(python_sandbox.subprocess, "Popen", refused)
    out = box.run("print(1)")
    assert out == (
        "The python sandbox could not start: could not create a user namespace for the python tool."
    )
    monkeypatch.undo()
    assert box.run("print(2)") == "2\n"
    box.close()
