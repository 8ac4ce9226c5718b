"""Audio streams without a sound server: the close/rescan interplay that once deadlocked."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mlx_harmony.voice.audio_io as audio_io
from mlx_harmony.voice.audio_io import Microphone, rescan

ROOT = Path(__file__).parent.parent


class StuckStream:
    """A PortAudio stream whose abort blocks, as one does when its server vanished."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.aborted = False

    def abort(self) -> None:
        self.release.wait()  # a close that waited for it would never return
        self.aborted = True

    def close(self) -> None:
        pass


def test_rescan_waits_for_a_closing_stream_and_never_terminates_under_it(monkeypatch) -> None:
    calls: list[str] = []

    class FakeSd:
        def _terminate(self) -> None:
            calls.append("terminate")

        def _initialize(self) -> None:
            calls.append("initialize")

    monkeypatch.setattr(audio_io, "sounddevice", lambda: FakeSd())
    monkeypatch.setattr(audio_io, "CLOSE_SECONDS", 0.05)
    mic = Microphone(None, 80)
    stuck = StuckStream()
    mic._stream = stuck
    mic.close()  # returns although the abort is stuck
    assert not stuck.aborted
    assert rescan(wait=0.2) is False and calls == []  # PortAudio left alone
    stuck.release.set()
    assert rescan(wait=2) is True and calls == ["terminate", "initialize"]


@pytest.mark.heavy
def test_a_killed_runs_sound_server_is_stopped_at_the_next_start(tmp_path) -> None:
    """A test run killed with -9 cannot stop its PulseAudio server: the next start does."""
    from mlx_harmony.bench.virtual_audio import OWNER_FILE, clean_up_abandoned, missing_tools

    if sys.platform != "linux" or missing_tools():
        pytest.skip("virtual audio devices are built with PulseAudio (Linux)")
    started = tmp_path / "runtime"
    code = (
        "import pathlib, sys, time\n"
        "from mlx_harmony.bench.virtual_audio import VirtualAudio\n"
        "va = VirtualAudio.start()\n"
        f"pathlib.Path({str(started)!r}).write_text(str(va.runtime))\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    runtime = Path(started.read_text())
    server = int((runtime / "pulse" / "pid").read_text().split()[0])
    assert int((runtime / OWNER_FILE).read_text()) == child.pid
    child.kill()
    child.wait()
    assert runtime in clean_up_abandoned()
    assert not runtime.exists()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server}").exists() and "zombie" not in _state(server):
        assert time.monotonic() < deadline, "the abandoned server still runs"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"
