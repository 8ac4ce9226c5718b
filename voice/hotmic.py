"""hotmic: does the microphone work, and may this program use it?

Lists the input devices, opens the chosen one, shows a live level meter for a few seconds
and ends with a verdict: working, silent (muted or permission refused: on macOS a refused
permission delivers pure zeros rather than an error) or no device. Exit status 0, 1, 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from voice.audio_io import AudioError, Microphone, permission_hint, sounddevice
from voice.vad import rms

Verdict = Literal["working", "silent", "no device"]
# A level above this anywhere in the check means the microphone delivers sound. Room noise
# through a live microphone sits well above it; a muted or refused one reads exactly zero.
SIGNAL_RMS = 3e-4
EXIT = {"working": 0, "silent": 1, "no device": 2}


@dataclass
class Result:
    verdict: Verdict
    device: str
    peak_rms: float
    blocks: int
    message: str


def meter(level: float, width: int = 40) -> str:
    db = 20 * np.log10(max(level, 1e-6))
    filled = round(np.clip((db + 60) / 60, 0, 1) * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {db:6.1f} dBFS"


def check(device: str | int | None, seconds: float, show: bool = True) -> Result:
    try:
        mic = Microphone(device, block_ms=50)
        mic.open()
    except AudioError as e:
        return Result("no device", str(device or "default"), 0.0, 0, str(e))
    peak, blocks = 0.0, 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            block = mic.read(timeout=0.5)
            if block is None:
                continue
            blocks += 1
            level = rms(block.pcm)
            peak = max(peak, level)
            if show:
                print(f"\r{meter(level)}", end="", flush=True)
    finally:
        name = getattr(mic, "name", str(device))
        mic.close()
    if show:
        print()
    if blocks == 0:
        return Result("no device", name, 0.0, 0, f"{name} delivered no audio at all")
    if peak < SIGNAL_RMS:
        return Result(
            "silent", name, peak, blocks,
            f"{name} opens but delivers silence: it is muted, or this program may not use "
            f"it; {permission_hint()}",
        )  # fmt: skip
    return Result("working", name, peak, blocks, f"{name} works (peak {meter(peak)[-12:]})")


def main() -> None:
    p = argparse.ArgumentParser(prog="hotmic", description=__doc__)
    p.add_argument("--device", help="input device name (substring) or index; default: system's")
    p.add_argument("--seconds", type=float, default=4.0, help="how long to listen")
    p.add_argument("--quiet", action="store_true", help="no meter, only the verdict")
    args = p.parse_args()
    try:
        sd = sounddevice()
    except AudioError as e:
        print(f"no device: {e}")
        sys.exit(EXIT["no device"])
    inputs = [d for d in sd.query_devices() if d["max_input_channels"] > 0]
    if not args.quiet:
        print("Input devices:")
        for d in inputs:
            print(f"  {d['index']:>2} {d['name']}")
        if inputs:
            print(f"Listening for {args.seconds:g} s — say something …")
    result = check(args.device, args.seconds, show=not args.quiet)
    print(f"{result.verdict}: {result.message}")
    sys.exit(EXIT[result.verdict])


if __name__ == "__main__":
    main()
