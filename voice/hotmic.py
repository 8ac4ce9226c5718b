"""hotmic: does the microphone work, and may this program use it?

Lists the input devices, opens the chosen one, shows a live level meter for a few seconds
and ends with a verdict: working, silent (muted or permission refused: on macOS a refused
permission delivers pure zeros rather than an error) or no device. Exit status 0, 1, 2.

`--speaker` checks the other side: a short tone, then a line spoken by the configured
Kyutai voice, through the chosen output device.

`--as-service` runs the same check the way the background service runs (started by
systemd or launchd, with no terminal): on macOS the microphone permission belongs to the
program that opens the device, and a terminal's permission does not carry over.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mlx_harmony.llm.cli.common import run_main
from mlx_harmony.voice.audio_io import (
    MODEL_RATE,
    AudioError,
    Microphone,
    Speaker,
    permission_hint,
    sounddevice,
)
from mlx_harmony.voice.config import TtsSection, VoiceConfig, load_voice_config
from mlx_harmony.voice.vad import rms

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


SPOKEN_LINE = "This is the speaker check of your voice assistant."
# How long the device may take, beyond the sound itself, to play what it was given.
PLAY_GRACE_SECONDS = 5.0


def tone(seconds: float = 0.4, hz: float = 660.0) -> np.ndarray:
    """A soft beep with 20 ms fades, so that it does not click."""
    t = np.arange(int(MODEL_RATE * seconds)) / MODEL_RATE
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)
    return (0.3 * np.sin(2 * np.pi * hz * t) * fade).astype(np.float32)


def speaker_check(device: str | int | None, tts: TtsSection | None) -> Result:
    """Play a tone (and a spoken line with `tts`) and wait until the device played it."""
    speaker = Speaker(device)
    try:
        speaker.open()
    except AudioError as e:
        return Result("no device", str(device or "default"), 0.0, 0, str(e))
    try:
        sound = [tone()]
        if tts is not None:
            from mlx_harmony.voice.synthesis import load_tts

            sound += list(load_tts(tts).speak(SPOKEN_LINE))
        samples = sum(len(s) for s in sound)
        for pcm in sound:
            speaker.play(pcm)
        deadline = time.monotonic() + samples / MODEL_RATE + PLAY_GRACE_SECONDS
        while speaker.busy and time.monotonic() < deadline and not speaker.lost:
            time.sleep(0.05)
        played = speaker.played_samples * MODEL_RATE // speaker.rate
    finally:
        speaker.close()
    name = speaker.name
    if played < samples:
        return Result(
            "silent", name, 0.0, played,
            f"{name} took the sound but played only {played} of {samples} samples",
        )  # fmt: skip
    what = "a tone and a spoken line" if tts is not None else "a tone"
    return Result("working", name, 1.0, played, f"{name} played {what}: did you hear it?")


def as_service(args: list[str], seconds: float) -> int:
    from mlx_harmony.voice.service import manager

    argv = [sys.executable, "-m", "mlx_harmony.voice.hotmic", *args, "--quiet"]
    print("Checking as the background service would …", flush=True)
    code, output = manager().run_once(argv, timeout=seconds + 120)
    print(output, end="")
    return code


def main() -> None:
    run_main(_main)


def _main() -> int:
    p = argparse.ArgumentParser(prog="hotmic", description=__doc__)
    p.add_argument("--device", help="input device name (substring) or index; default: system's")
    p.add_argument("--seconds", type=float, default=4.0, help="how long to listen")
    p.add_argument("--quiet", action="store_true", help="no meter, only the verdict")
    p.add_argument("--speaker", action="store_true", help="check the output device instead")
    p.add_argument("--output-device", help="output device name (substring) or index")
    p.add_argument("--config", type=Path, help="voice config: its TTS model, voice and devices")
    p.add_argument("--no-voice", action="store_true", help="with --speaker: the tone only")
    p.add_argument(
        "--as-service", action="store_true", help="run the check as the background service would"
    )
    args = p.parse_args()
    if args.as_service:
        return as_service([a for a in sys.argv[1:] if a != "--as-service"], args.seconds)
    try:
        sd = sounddevice()
    except AudioError as e:
        print(f"no device: {e}")
        return EXIT["no device"]
    config = load_voice_config(args.config)[0] if args.config else VoiceConfig()
    if args.speaker:
        device = args.output_device or config.audio.output_device
        if not args.quiet:
            print("Playing a tone" + ("" if args.no_voice else " and a spoken line") + " …")
        result = speaker_check(device, None if args.no_voice else config.tts)
        print(f"{result.verdict}: {result.message}")
        return EXIT[result.verdict]
    inputs = [d for d in sd.query_devices() if d["max_input_channels"] > 0]
    if not args.quiet:
        print("Input devices:")
        for d in inputs:
            print(f"  {d['index']:>2} {d['name']}")
        if inputs:
            print(f"Listening for {args.seconds:g} s — say something …")
    result = check(args.device or config.audio.input_device, args.seconds, show=not args.quiet)
    print(f"{result.verdict}: {result.message}")
    return EXIT[result.verdict]


if __name__ == "__main__":
    main()
