"""mlx-harmony-voice service: the unit and agent files it writes, and install / status /
logs / uninstall against a temporary home.

The files are checked by the service managers' own parsers (`systemd-analyze verify`,
`plistlib`). No user systemd instance can run on a test machine (no systemd as PID 1, no
user bus), so `systemctl` itself is a script on PATH that notes its arguments and answers
`--version` and `show` as systemd does.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_harmony.voice.control import ControlServer
from mlx_harmony.voice.service import launchd_plist, status, systemd_unit

ROOT = Path(__file__).parent.parent
SERVICE = [sys.executable, "-m", "mlx_harmony.voice.cli", "service"]
ARGV = [
    "/opt/my python/bin/python3",
    "-m",
    "mlx_harmony.voice.cli",
    "--config",
    "/home/u/100% me.json",
]
FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$SYSTEMCTL_CALLS"
case "$*" in
  --version) echo "systemd 255 (255.4-1)";;
  *" show "*) printf 'ActiveState=active\\nSubState=running\\nActiveEnterTimestamp=%s\\n' \\
      'Tue 2026-12-01 21:00:00 UTC'; printf 'MainPID=4242\\nNRestarts=2\\nExecMainStatus=0\\n';;
esac
"""


def exec_start(unit: str) -> list[str]:
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    return [a.replace("%%", "%").replace("$$", "$") for a in shlex.split(line[10:])]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.heavy
def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    version = subprocess.run(["systemctl", "--version"], capture_output=True, text=True)
    number = int(version.stdout.split()[1])
    argv = [sys.executable, *ARGV[1:]]  # the executable must exist for verify
    unit = tmp_path / "mlx-harmony-voice.service"
    unit.write_text(systemd_unit(argv, number))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    out = subprocess.run(
        ["systemd-analyze", "--user", "verify", str(unit)],
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)}, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert exec_start(unit.read_text()) == argv  # spaces and "%" survive systemd's parsing


def test_the_unit_restarts_after_a_crash_with_a_pause_but_not_after_a_config_error() -> None:
    old, new = systemd_unit(ARGV, 252), systemd_unit(ARGV, 255)
    for unit in (old, new):
        assert "Restart=on-failure\n" in unit and "RestartPreventExitStatus=2\n" in unit
        assert "StartLimitIntervalSec=0\n" in unit and "WantedBy=default.target\n" in unit
    # systemd ≥ 254 grows the pause between restarts; older ones get a fixed, long one.
    assert "RestartSteps=" in new and "RestartMaxDelaySec=300" in new
    assert "RestartSteps" not in old and "RestartSec=15\n" in old


def test_the_launchd_agent_is_a_valid_plist(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "darwin")  # logs go where macOS keeps them
    agent = plistlib.loads(launchd_plist(ARGV))
    assert agent["Label"] == "org.mlx-harmony.voice"
    assert agent["ProgramArguments"] == ARGV
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}  # crashes only
    assert agent["ThrottleInterval"] >= 10  # no tight restart loop
    assert agent["StandardErrorPath"].startswith(str(tmp_path / "Library" / "Logs"))


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """A temporary home with a fake systemctl first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(0o755)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    return {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config"),
        "XDG_STATE_HOME": str(tmp_path / "home" / ".local" / "state"),
        "XDG_RUNTIME_DIR": str(runtime),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SYSTEMCTL_CALLS": str(tmp_path / "calls.txt"),
    }


def service(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SERVICE, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["SYSTEMCTL_CALLS"])
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.heavy
def test_install_status_logs_and_uninstall(home: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "my voice.json"
    config.write_text('{"endpointing": {"silence_ms": 500}}')
    unit = Path(home["XDG_CONFIG_HOME"]) / "systemd" / "user" / "mlx-harmony-voice.service"
    log = Path(home["XDG_STATE_HOME"]) / "mlx-harmony" / "voice.log"

    out = service(home, "install", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert f"systemd user unit installed and started: {unit}" in out.stdout
    assert exec_start(unit.read_text()) == [
        sys.executable, "-m", "mlx_harmony.voice.cli",
        "--config", str(config), "--log-file", str(log),
    ]  # fmt: skip
    assert "RestartSteps=" in unit.read_text()  # the (fake) systemd is 255
    assert calls(home) == [
        "--version",
        "--user daemon-reload",
        "--user enable --now mlx-harmony-voice.service",
        "--user restart mlx-harmony-voice.service",
    ]

    log.parent.mkdir(parents=True)
    log.write_text(
        "2026-12-01 21:00:01 Loaded tiny in 1.0s.\n"
        "2026-12-01 21:00:02 error: cannot open input device (default): busy\n"
        "2026-12-01 21:00:05 Listening. Speak or type a question; Ctrl-C quits.\n"
    )
    out = service(home, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (
        "systemd user unit: active (running) since Tue 2026-12-01 21:00:00 UTC, restarted 2 times"
    )
    assert f"config: {config}" in lines  # read from the unit: the assistant is still loading
    assert "control socket: not answering yet (loading models?)" in lines
    assert lines[-1] == (
        "last error: 2026-12-01 21:00:02 error: cannot open input device (default): busy"
    )

    out = service(home, "logs", "-n", "1")
    assert out.stdout == "2026-12-01 21:00:05 Listening. Speak or type a question; Ctrl-C quits.\n"

    out = service(home, "uninstall")
    assert out.returncode == 0 and not unit.exists()
    assert "--user disable --now mlx-harmony-voice.service" in calls(home)
    out = service(home, "status")
    assert out.returncode == 3 and out.stdout.startswith("not installed")


@pytest.mark.heavy
def test_install_refuses_a_broken_config_and_writes_nothing(home, tmp_path: Path) -> None:
    config = tmp_path / "voice.json"
    config.write_text('{"barge_in": {"enabled": "sometimes"}}')
    out = service(home, "install", "--config", str(config))
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {config}: field 'barge_in.enabled'")
    assert len(out.stderr.splitlines()) == 1
    assert not (Path(home["XDG_CONFIG_HOME"]) / "systemd").exists()
    assert calls(home) == []


class Running:
    def status(self) -> dict[str, object]:
        return {"state": "listening", "muted": True, "turns": 3}

    def submit(self, request, reply) -> None:
        reply.error("not in this test")


@pytest.mark.heavy
def test_status_of_a_running_assistant_comes_from_its_socket(
    home, monkeypatch, tmp_path: Path
) -> None:
    for key in ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "PATH", "SYSTEMCTL_CALLS"):
        monkeypatch.setenv(key, home[key])
    assert service(home, "install", "--no-start").returncode == 0
    assert "--user enable mlx-harmony-voice.service" in calls(home)
    about = {"pid": 4242, "started": 1_796_158_800.0, "model": "tiny", "config": "/c.json"}
    control = ControlServer(tmp_path / "runtime" / "voice.sock", Running(), about)
    control.open()
    try:
        report, running = status(control.path)
    finally:
        control.close()
    assert running
    lines = report.splitlines()
    assert "state: listening (muted)" in lines and "model: tiny" in lines
    assert "config: /c.json" in lines and "turns answered: 3" in lines
    assert any(line.startswith("since: ") and "(pid 4242)" in line for line in lines)
    assert lines[-1] == "last error: none"


def test_the_log_file_is_stamped_and_rotated(monkeypatch, tmp_path: Path) -> None:
    from mlx_harmony.voice import logfile

    monkeypatch.setattr(logfile, "MAX_BYTES", 2_000)
    path = tmp_path / "logs" / "voice.log"
    stream = logfile.LogStream(path)
    for i in range(200):
        stream.write(f"line {i}\nhalf ")  # a line may arrive in pieces
        stream.write("done\n")
    stream.write("no newline at the end")
    stream.close()
    files = sorted(path.parent.iterdir())
    assert [f.name for f in files] == ["voice.log", "voice.log.1", "voice.log.2", "voice.log.3"]
    assert all(f.stat().st_size <= 2_000 for f in files)
    lines = path.read_text().splitlines()
    assert lines[-1][20:] == "no newline at the end" and lines[-2][20:] == "half done"
    assert all(line[4] == "-" and line[19] == " " for line in lines)  # "YYYY-MM-DD HH:MM:SS "


NO_USER_MANAGER = """#!/bin/sh
echo "$*" >> "$SYSTEMCTL_CALLS"
case "$*" in
  --version) echo "systemd 255 (255.4-1)";;
  *) echo "Failed to connect to bus: No medium found" >&2; exit 1;;
esac
"""


@pytest.mark.heavy
def test_without_a_user_service_manager_nothing_is_left_and_status_says_so(
    home: dict[str, str],
) -> None:
    (Path(home["PATH"].split(":")[0]) / "systemctl").write_text(NO_USER_MANAGER)
    unit = Path(home["XDG_CONFIG_HOME"]) / "systemd" / "user" / "mlx-harmony-voice.service"
    out = service(home, "install")
    assert out.returncode == 2
    assert out.stderr.startswith("error: systemctl --user daemon-reload failed: Failed to connect")
    assert "nothing was installed (is a systemd user instance running?" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert not unit.exists()
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text("[Service]\nExecStart=/bin/true\n")  # one put there by hand
    out = service(home, "status")
    assert out.stdout.splitlines()[0] == (
        "systemd user unit: not running (no user service manager answers)"
    )
    assert service(home, "install").returncode == 2
    assert unit.read_text() == "[Service]\nExecStart=/bin/true\n"  # put back as it was
