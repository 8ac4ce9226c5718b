"""Real PortAudio devices without a sound card: a private PulseAudio server (Linux).

Used by the voice tests and by `mlx-harmony-bench --voice`.

A null sink `spk` is the speaker (its monitor is recorded), a second null sink `micsink`
feeds the virtual source `mic`, which is the microphone: whatever is played into
`micsink` is what a program recording from `mic` hears. PortAudio reaches the server
through ALSA's `pulse` plugin (devices `pulse` and `default`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_harmony.llm.files import process_alive

TOOLS = ("pulseaudio", "pactl", "paplay", "parec", "espeak-ng", "sox")
MIC_SOURCE = "module-virtual-source source_name=mic master=micsink.monitor"


PREFIX = "pulse-"
OWNER_FILE = "owner.pid"  # the process that started the server, in its runtime folder


SERVER_EXIT_S = 10.0  # how long an abandoned server may take to exit once told to


def clean_up_abandoned() -> list[Path]:
    """Stop the servers of earlier runs that were killed before they could (their
    owner is gone), and remove their folders; return the folders removed."""
    removed = []
    for runtime in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = int((runtime / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or not finished starting
        if process_alive(owner):
            continue
        try:
            server = int((runtime / "pulse" / "pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            server = None
        if server is not None and process_alive(server):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(server, signal.SIGTERM)  # its players end with their connection
            # It removes its own files as it exits: the folder is only gone once it has.
            deadline = time.monotonic() + SERVER_EXIT_S
            while process_alive(server) and _running(server) and time.monotonic() < deadline:
                time.sleep(0.02)
        shutil.rmtree(runtime, ignore_errors=True)
        removed.append(runtime)
    return removed


def _running(pid: int) -> bool:
    """Not a zombie (one that exited, waiting for its parent to read its status)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


@dataclass
class VirtualAudio:
    runtime: Path
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def start(cls) -> VirtualAudio:
        clean_up_abandoned()
        runtime = Path(tempfile.mkdtemp(prefix=PREFIX))
        (runtime / OWNER_FILE).write_text(str(os.getpid()))
        env = {
            **os.environ,
            "XDG_RUNTIME_DIR": str(runtime),
            "PULSE_RUNTIME_PATH": str(runtime / "pulse"),
        }
        va = cls(runtime, env)
        va._launch()
        return va

    def _launch(self) -> None:
        subprocess.run(
            [
                "pulseaudio", "--daemonize=yes", "--exit-idle-time=-1", "-n",
                "--load=module-native-protocol-unix",
                "--load=module-null-sink sink_name=spk",
                "--load=module-null-sink sink_name=micsink",
                f"--load={MIC_SOURCE}",
            ],
            env=self.env, check=True, capture_output=True,
        )  # fmt: skip
        _wait(lambda: self.pactl("info", check=False).returncode == 0)
        self.pactl("set-default-sink", "spk")
        self.pactl("set-default-source", "mic")
        # A null sink's monitor only delivers while something plays into the sink: keep
        # silence flowing into both, so recordings and the microphone run continuously.
        for sink in ("spk", "micsink"):
            self.procs.append(
                subprocess.Popen(
                    [
                        "pacat",
                        "--playback",
                        f"--device={sink}",
                        "--raw",
                        "--format=s16le",
                        "--rate=24000",
                        "--channels=1",
                        "/dev/zero",
                    ],
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        _wait(lambda: len(self.pactl("list", "short", "sink-inputs").stdout.splitlines()) >= 2)

    def shutdown_server(self) -> None:
        """The whole sound system goes away (as when an audio interface is unplugged)."""
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs.clear()
        self.pactl("exit", check=False)
        _wait(lambda: self.pactl("info", check=False).returncode != 0)

    def restart_server(self) -> None:
        self._launch()

    def activate(self) -> None:
        """Point this process's PortAudio (through ALSA's pulse plugin) at this server."""
        os.environ["XDG_RUNTIME_DIR"] = self.env["XDG_RUNTIME_DIR"]
        os.environ["PULSE_RUNTIME_PATH"] = self.env["PULSE_RUNTIME_PATH"]

    def pactl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["pactl", *args], env=self.env, check=check, capture_output=True, text=True
        )

    def stop(self) -> None:
        self.shutdown_server()
        shutil.rmtree(self.runtime, ignore_errors=True)

    # ------------------------------------------------------------------ microphone
    def say(self, text: str, folder: Path, lead_silence: float = 0.0) -> Path:
        return speech_wav(text, folder, lead_silence)

    def play_into_mic(self, wav: Path) -> subprocess.Popen:
        """Start playing a file into the virtual microphone; returns the player process."""
        return subprocess.Popen(
            ["paplay", "--device=micsink", str(wav)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def loop_speaker_into_mic(self, delay_ms: int = 60, volume: float = 0.7) -> str:
        """What the speaker plays reaches the microphone `delay_ms` later at `volume`, as
        a laptop's loudspeakers reach its microphone through the room. Returns the
        module id for `unload_module`."""
        module = self.pactl(
            "load-module", "module-loopback", "source=spk.monitor", "sink=micsink",
            f"latency_msec={delay_ms}", "source_dont_move=true", "sink_dont_move=true",
        ).stdout.strip()  # fmt: skip

        # `pactl list short sink-inputs`: index, sink, client, driver, sample spec.
        def loop_input() -> str | None:
            for line in self.pactl("list", "short", "sink-inputs").stdout.splitlines():
                fields = line.split()
                if len(fields) > 3 and fields[3] == "module-loopback.c":
                    return fields[0]
            return None

        _wait(lambda: loop_input() is not None)
        self.pactl("set-sink-input-volume", str(loop_input()), f"{round(volume * 65536)}")
        return module

    def unload_module(self, module: str) -> None:
        self.pactl("unload-module", module)

    # ------------------------------------------------------------------ speaker
    def record_speaker(self, path: Path) -> subprocess.Popen:
        return subprocess.Popen(
            ["parec", "--device=spk.monitor", "--file-format=wav", "--rate=24000",
             "--channels=1", "--format=s16le", str(path)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip


def speech_wav(text: str, folder: Path, lead_silence: float = 0.0) -> Path:
    """Speech made with espeak-ng, at 24 kHz mono, with optional leading silence."""
    raw = folder / f"say-{abs(hash(text))}.wav"
    out = folder / f"speech-{abs(hash((text, lead_silence)))}.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True)
    cmd = ["sox", str(raw), "-r", "24000", "-c", "1", "-b", "16", str(out)]
    if lead_silence:
        cmd += ["pad", str(lead_silence), "0"]
    subprocess.run(cmd, check=True)
    return out


def wait_recorded(path: Path, seconds: float, rate: int = 24000, timeout: float = 60.0) -> None:
    """Wait until a recording being written (16-bit mono wav) holds `seconds` of audio."""
    size = 44 + round(seconds * rate) * 2
    _wait(lambda: path.exists() and path.stat().st_size >= size, timeout)


def _wait(ready, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError("the PulseAudio server did not come up")
        time.sleep(0.05)


def read_wav(path: Path) -> np.ndarray:
    """Samples in [-1, 1] of a 16-bit wav (a recording still being written is fine)."""
    with wave.open(str(path)) as w:
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype=np.int16).astype(np.float32) / 32768.0


def non_silent_seconds(samples: np.ndarray, rate: int = 24000, threshold: float = 0.01) -> float:
    block = rate // 50
    n = len(samples) // block
    if n == 0:
        return 0.0
    rms = np.sqrt(np.mean(samples[: n * block].reshape(n, block) ** 2, axis=1))
    return float(np.sum(rms > threshold)) / 50


def sox_stat(path: Path) -> dict[str, float]:
    out = subprocess.run(["sox", str(path), "-n", "stat"], capture_output=True, text=True).stderr
    stats = {}
    for line in out.splitlines():
        m = re.match(r"\s*([A-Za-z ()]+?):\s+(-?[\d.]+)", line)
        if m:
            stats[" ".join(m.group(1).split())] = float(m.group(2))
    return stats
