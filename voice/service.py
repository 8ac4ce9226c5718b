"""mlx-harmony-voice service: run the assistant in the background, from login on.

    mlx-harmony-voice service install [--config FILE] [--no-start]
    mlx-harmony-voice service uninstall
    mlx-harmony-voice service status
    mlx-harmony-voice service logs [-n LINES] [-f]

Linux: a systemd user unit; macOS: a launchd agent. Either starts the same program as the
foreground command, headless, with `--log-file` (rotated) and the user's config; a crash is
followed by a restart after a growing pause (systemd's `RestartSteps` where it has them,
launchd's `ThrottleInterval`), and a broken config (exit status 2) is not restarted at all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.files import atomic_write_bytes
from mlx_harmony.voice.config import load_voice_config
from mlx_harmony.voice.control import NotRunning, default_socket_path, send_request
from mlx_harmony.voice.ctl import describe_status

UNIT = "mlx-harmony-voice.service"
LABEL = "org.mlx-harmony.voice"
# systemd learned RestartSteps / RestartMaxDelaySec (a growing restart pause) in v254.
SYSTEMD_BACKOFF_VERSION = 254
CONFIG_ERROR_STATUS = 2  # run_main's exit status for a user's config error


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else _home() / default


def log_path() -> Path:
    if sys.platform == "darwin":
        return _home() / "Library" / "Logs" / "mlx-harmony" / "voice.log"
    return _xdg("XDG_STATE_HOME", ".local/state") / "mlx-harmony" / "voice.log"


def default_config_path() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "mlx-harmony" / "voice.json"


def command_line(config: Path | None) -> list[str]:
    """The service's command: this Python, this program, the config, the log file."""
    argv = [sys.executable, "-m", "mlx_harmony.voice.cli"]
    if config is not None:
        argv += ["--config", str(config)]
    return [*argv, "--log-file", str(log_path())]


def _systemd_quote(arg: str) -> str:
    # systemd's ExecStart splits like a shell, but "%" starts a specifier and "$" a variable.
    arg = arg.replace("%", "%%").replace("$", "$$")
    return shlex.quote(arg) if arg else '""'


def systemd_unit(argv: list[str], systemd_version: int) -> str:
    if systemd_version >= SYSTEMD_BACKOFF_VERSION:
        backoff = "RestartSec=2\nRestartSteps=8\nRestartMaxDelaySec=300\n"
    else:  # a fixed pause long enough not to spin, and never give up
        backoff = "RestartSec=15\n"
    return (
        "[Unit]\n"
        "Description=mlx-harmony voice assistant\n"
        "After=pipewire-pulse.service pulseaudio.service\n"
        "StartLimitIntervalSec=0\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={' '.join(_systemd_quote(a) for a in argv)}\n"
        "WorkingDirectory=%h\n"
        "Environment=PYTHONUNBUFFERED=1\n"
        "Restart=on-failure\n"
        f"{backoff}"
        f"RestartPreventExitStatus={CONFIG_ERROR_STATUS}\n"
        "TimeoutStopSec=30\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def launchd_plist(argv: list[str]) -> bytes:
    logs = log_path().parent
    return plistlib.dumps(
        {
            "Label": LABEL,
            "ProgramArguments": argv,
            "RunAtLoad": True,
            # Restarted after a crash, not after a clean stop; launchd waits
            # ThrottleInterval seconds between starts, so a crash loop cannot spin.
            "KeepAlive": {"SuccessfulExit": False},
            "ThrottleInterval": 30,
            "ProcessType": "Interactive",  # audio: no App Nap throttling
            "WorkingDirectory": str(_home()),
            "EnvironmentVariables": {
                "PYTHONUNBUFFERED": "1",
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            },
            # What escapes the log file (a native crash) still lands beside it.
            "StandardOutPath": str(logs / "voice.stdout.log"),
            "StandardErrorPath": str(logs / "voice.stdout.log"),
        }
    )


@dataclass
class ManagerState:
    running: bool
    detail: str  # the manager's own words: "active (running) since …", "last exit code 2"


class Systemd:
    """The user's systemd instance, through `systemctl --user`."""

    name = "systemd user unit"
    # What to try when no user instance answers (a server, a container, an ssh session).
    hint = (
        "is a systemd user instance running? `systemctl --user status` tells; on a server, "
        "`loginctl enable-linger $USER` starts one at boot"
    )

    @property
    def file(self) -> Path:
        return _xdg("XDG_CONFIG_HOME", ".config") / "systemd" / "user" / UNIT

    def text(self, argv: list[str]) -> bytes:
        return systemd_unit(argv, self.version()).encode()

    def installed_argv(self) -> list[str]:
        for line in self.file.read_text(errors="replace").splitlines():
            if line.startswith("ExecStart="):
                try:
                    words = shlex.split(line.removeprefix("ExecStart="))
                except ValueError:  # edited by hand beyond what we wrote
                    return []
                return [w.replace("%%", "%").replace("$$", "$") for w in words]
        return []

    def version(self) -> int:
        out = _run(["systemctl", "--version"], check=False)
        match = re.match(r"systemd (\d+)", out)
        return int(match.group(1)) if match else 0

    def load(self, start: bool) -> None:
        _run(["systemctl", "--user", "daemon-reload"])
        _run(["systemctl", "--user", "enable", *(["--now"] if start else []), UNIT])
        if start:  # an update of a running service takes effect now
            _run(["systemctl", "--user", "restart", UNIT])

    def unload(self) -> None:
        _run(["systemctl", "--user", "disable", "--now", UNIT], check=False)

    def reload(self) -> None:
        _run(["systemctl", "--user", "daemon-reload"], check=False)

    def run_once(self, argv: list[str], timeout: float) -> tuple[int, str]:
        """Run a command as the service runs: started by the user's manager, no terminal."""
        unit = f"mlx-harmony-check-{os.getpid()}"
        done = _run_capturing(
            ["systemd-run", "--user", "--wait", "--pipe", "--quiet", "--collect",
             f"--unit={unit}", f"--working-directory={_home()}", "--", *argv],
            timeout,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def state(self) -> ManagerState:
        out = _run(
            ["systemctl", "--user", "show", UNIT, "--property",
             "ActiveState,SubState,ActiveEnterTimestamp,MainPID,NRestarts,ExecMainStatus"],
            check=False,
        )  # fmt: skip
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        if "ActiveState" not in props:  # systemctl could not reach a user instance
            return ManagerState(False, "not running (no user service manager answers)")
        active = props.get("ActiveState", "unknown")
        detail = f"{active} ({props.get('SubState', '?')})"
        if active == "active" and props.get("ActiveEnterTimestamp"):
            detail += f" since {props['ActiveEnterTimestamp']}"
        if props.get("NRestarts", "0") not in ("", "0"):
            detail += f", restarted {props['NRestarts']} times"
        if active != "active" and props.get("ExecMainStatus", "0") not in ("", "0"):
            detail += f", last exit status {props['ExecMainStatus']}"
        return ManagerState(active == "active", detail)


class Launchd:
    """The user's launchd domain, through `launchctl`."""

    name = "launchd agent"
    hint = "run it from a logged-in user's session (launchctl's gui domain)"

    @property
    def file(self) -> Path:
        return _home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"

    @property
    def target(self) -> str:
        return f"gui/{os.getuid()}"

    def text(self, argv: list[str]) -> bytes:
        return launchd_plist(argv)

    def installed_argv(self) -> list[str]:
        try:
            return list(plistlib.loads(self.file.read_bytes()).get("ProgramArguments", []))
        except plistlib.InvalidFileException:
            return []

    def load(self, start: bool) -> None:
        _run(["launchctl", "bootout", f"{self.target}/{LABEL}"], check=False)
        _run(["launchctl", "bootstrap", self.target, str(self.file)])
        if not start:
            _run(["launchctl", "kill", "TERM", f"{self.target}/{LABEL}"], check=False)

    def unload(self) -> None:
        _run(["launchctl", "bootout", f"{self.target}/{LABEL}"], check=False)

    def reload(self) -> None:
        pass

    def run_once(self, argv: list[str], timeout: float) -> tuple[int, str]:
        """Run a command as the agent runs: launched by launchd, so that macOS asks the
        microphone permission of that program rather than of the terminal."""
        label = f"{LABEL}.check"
        folder = Path(tempfile.mkdtemp(prefix="mlx-harmony-check-"))
        out, status = folder / "out.txt", folder / "status.txt"
        q_out, q_status = shlex.quote(str(out)), shlex.quote(str(status))
        script = f"{shlex.join(argv)} > {q_out} 2>&1; echo $? > {q_status}"
        plist = folder / f"{label}.plist"
        plist.write_bytes(
            plistlib.dumps(
                {"Label": label, "ProgramArguments": ["/bin/sh", "-c", script],
                 "RunAtLoad": True, "ProcessType": "Interactive"}
            )
        )  # fmt: skip
        _run(["launchctl", "bootout", f"{self.target}/{label}"], check=False)
        _run(["launchctl", "bootstrap", self.target, str(plist)])
        try:
            deadline = time.monotonic() + timeout
            while not status.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            _run(["launchctl", "bootout", f"{self.target}/{label}"], check=False)
        if not status.exists():
            raise ConfigError(f"the check did not finish within {timeout:.0f} s under launchd")
        text = out.read_text(errors="replace")
        shutil.rmtree(folder, ignore_errors=True)
        return int(status.read_text().strip() or 1), text

    def state(self) -> ManagerState:
        out = _run(["launchctl", "print", f"{self.target}/{LABEL}"], check=False)
        fields = dict(re.findall(r"^\s*([a-z ]+?) = (.*)$", out, re.MULTILINE))
        running = fields.get("state") == "running"
        detail = fields.get("state", "not loaded")
        if "pid" in fields:
            detail += f" (pid {fields['pid']})"
        if fields.get("last exit code") not in (None, "0", "(never exited)"):
            detail += f", last exit code {fields['last exit code']}"
        return ManagerState(running, detail)


def manager() -> Systemd | Launchd:
    if sys.platform == "darwin":
        return Launchd()
    if shutil.which("systemctl") is None:
        raise ConfigError("no systemctl here: the background service needs systemd (Linux)")
    return Systemd()


def _run_capturing(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ConfigError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{' '.join(argv)}: no answer after {timeout:.0f} s") from None


def _run(argv: list[str], check: bool = True) -> str:
    done = _run_capturing(argv, timeout=60)
    if check and done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(f"{' '.join(argv)} failed: {why[0] if why else done.returncode}")
    return done.stdout


# ---------------------------------------------------------------------- commands


def install(config: Path | None, start: bool) -> str:
    if config is None and default_config_path().is_file():
        config = default_config_path()
    if config is not None:
        config = config.expanduser().resolve()
        load_voice_config(config)  # a broken config is refused now, not at every login
    m = manager()
    before = m.file.read_bytes() if m.file.is_file() else None
    atomic_write_bytes(m.file, m.text(command_line(config)))
    try:
        m.load(start)
    except ConfigError as e:  # no manager to take it: leave things as they were
        if before is None:
            m.file.unlink(missing_ok=True)
        else:
            atomic_write_bytes(m.file, before)
        raise ConfigError(f"{e}; nothing was installed ({m.hint})") from None
    what = "installed and started" if start else "installed (starts at next login)"
    return (
        f"{m.name} {what}: {m.file}\n"
        f"config: {config or '(defaults)'}\n"
        f"log: {log_path()}  (mlx-harmony-voice service logs)"
    )


def uninstall() -> str:
    m = manager()
    if not m.file.exists():
        return f"not installed ({m.file} does not exist)"
    m.unload()
    m.file.unlink()
    m.reload()
    return f"{m.name} stopped and removed: {m.file}"


def last_error(path: Path) -> str | None:
    """The log's last error line (its own or a traceback's last line), if any."""
    candidates = [path, *(path.with_name(f"{path.name}.{i}") for i in (1, 2, 3))]
    for file in candidates:
        if not file.is_file():
            continue
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        for i in range(len(lines) - 1, -1, -1):
            message = lines[i][20:]  # after the "YYYY-MM-DD HH:MM:SS " stamp
            if message.startswith("error:") or re.match(r"\w+(Error|Exception)\b", message):
                return lines[i]
    return None


def status(socket_path: Path) -> tuple[str, bool]:
    """A report and whether the assistant runs."""
    m = manager()
    if not m.file.exists():
        return f"not installed (no {m.file})", False
    state = m.state()
    lines = [f"{m.name}: {state.detail}", f"unit: {m.file}"]
    try:
        live = send_request(socket_path, {"cmd": "status"}, timeout=5)
        lines.append(describe_status(live))
    except (NotRunning, OSError):
        argv = m.installed_argv()
        config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else "(defaults)"
        lines.append(f"config: {config}")
        if state.running:
            lines.append("control socket: not answering yet (loading models?)")
    lines.append(f"log: {log_path()}")
    error = last_error(log_path())
    lines.append(f"last error: {error}" if error else "last error: none")
    return "\n".join(lines), state.running


def logs(lines: int, follow: bool) -> None:
    path = log_path()
    if not path.is_file():
        raise ConfigError(f"{path}: no log yet (has the service run?)")
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh.readlines()[-lines:]:
            print(line, end="")
        while follow:
            line = fh.readline()
            if line:
                print(line, end="", flush=True)
            else:
                time.sleep(0.5)
                if path.stat().st_ino != os.fstat(fh.fileno()).st_ino:  # rotated
                    fh.close()
                    fh = path.open(encoding="utf-8", errors="replace")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx-harmony-voice service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", required=True)
    i = sub.add_parser("install", help="start the assistant at login (and now)")
    i.add_argument("--config", type=Path, help=f"voice config (default {default_config_path()})")
    i.add_argument("--no-start", action="store_true", help="only from the next login on")
    sub.add_parser("uninstall", help="stop it and remove the unit")
    s = sub.add_parser("status", help="is it running, since when, with what; the last error")
    s.add_argument("--socket", type=Path, help="control socket (default: the usual one)")
    lg = sub.add_parser("logs", help="the service's log")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("-f", "--follow", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "install":
        print(install(args.config, start=not args.no_start))
    elif args.action == "uninstall":
        print(uninstall())
    elif args.action == "status":
        report, running = status(args.socket or default_socket_path())
        print(report)
        return 0 if running else 3  # systemctl's and LSB's "not running"
    else:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends --follow
            logs(args.lines, args.follow)
    return 0
