"""Echo cancellation on a virtual room: how much of the assistant's own voice is left.

    python -m mlx_harmony.bench.echo [--delay-ms 60] [--volume 0.7] [--seconds 12] [--json PATH]

A private PulseAudio server (see `bench.virtual_audio`) loops the speaker into the
microphone with a room's delay; speech (espeak-ng) is played through the assistant's own
`Speaker` while its `Microphone` records, and every block goes through `EchoCanceller` as
in the daemon. Printed: the echo's level before and after, per second and overall (dB),
and how many blocks the energy detector would still call speech (the barge-in risk).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mlx_harmony.bench.virtual_audio import VirtualAudio, missing_tools, read_wav
from mlx_harmony.voice.audio_io import Microphone, Speaker
from mlx_harmony.voice.config import EndpointingSection
from mlx_harmony.voice.echo import EchoCanceller
from mlx_harmony.voice.vad import rms

TEXT = (
    "The capital of France is Paris. It is also the largest city in the country, "
    "on the river Seine, with about two million people in the city itself and twelve "
    "million in the whole region around it."
)


def db(x: float) -> float:
    return 10 * float(np.log10(max(x, 1e-20)))


def measure(audio: VirtualAudio, folder: Path, delay_ms: int, volume: float, seconds: float):
    speech = read_wav(audio.say(TEXT, folder))
    speaker, mic = Speaker("pulse"), Microphone("pulse", 80)
    speaker.open()
    mic.open()
    echo = EchoCanceller(speaker)
    loop = audio.loop_speaker_into_mic(delay_ms, volume)
    threshold = EndpointingSection().energy_threshold
    rows = []
    try:
        time.sleep(0.5)  # the loop settles; the blocks until now are silence
        mic.drain()
        for i in range(0, len(speech), 1920):
            speaker.play(speech[i : i + 1920])
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            block = mic.read(timeout=1.0)
            if block is None:
                continue
            cleaned = echo(block)
            rows.append((block.at - started, rms(block.pcm), rms(cleaned.pcm)))
    finally:
        audio.unload_module(loop)
        mic.close()
        speaker.close()
    # Blocks in which the echo alone would count as speech: the barge-in risk.
    loud = [(t, a, b) for t, a, b in rows if a > threshold]
    return {
        "delay_ms": delay_ms,
        "loop_volume": volume,
        "attenuation_db": round(attenuation(loud), 1),
        "speech_blocks_before": len(loud),
        "speech_blocks_after": sum(1 for *_, b in loud if b > threshold),
    }


def attenuation(rows: list[tuple[float, float, float]]) -> float:
    """Echo energy before over energy after, in dB."""
    before = sum(a * a for _, a, _ in rows)
    after = sum(b * b for *_, b in rows)
    return db(before / max(after, 1e-20))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delay-ms", type=int, default=60)
    p.add_argument("--volume", type=float, default=0.7)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if missing_tools():
        raise SystemExit(f"needs {', '.join(missing_tools())} (Linux, PulseAudio)")
    audio = VirtualAudio.start()
    audio.activate()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(audio, Path(tmp), args.delay_ms, args.volume, args.seconds)
    finally:
        audio.stop()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
