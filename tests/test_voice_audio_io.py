"""Audio streams without a sound server: the close/rescan interplay that once deadlocked."""

from __future__ import annotations

import threading
import time

import voice.audio_io as audio_io
from voice.audio_io import Microphone, rescan


class StuckStream:
    """A PortAudio stream whose abort blocks, as one does when its server vanished."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def abort(self) -> None:
        self.release.wait(10)

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
    mic = Microphone(None, 80)
    stuck = StuckStream()
    mic._stream = stuck
    started = time.monotonic()
    mic.close()  # returns although the abort is stuck
    assert time.monotonic() - started < 3
    assert rescan(wait=0.2) is False and calls == []  # PortAudio left alone
    stuck.release.set()
    assert rescan(wait=2) is True and calls == ["terminate", "initialize"]
