"""Which speech detector ends turns well in a noisy room: energy against Silero.

    python -m mlx_harmony.bench.endpointing [--json PATH]

Questions spoken by espeak-ng (several voices and speeds) are mixed with room noise at
several levels — steady fan-like noise, and the babble of other speech far away — with
noise-only stretches before and after, and run block by block through each detector and
the real `Endpointer` (the default config's hits, minimum speech and silence). Counted,
per detector and noise: utterances started in noise alone (false starts), questions
missed, and how long after the speech ended the end was noticed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from mlx_harmony.bench.virtual_audio import read_wav
from mlx_harmony.voice.audio_io import MODEL_RATE
from mlx_harmony.voice.config import EndpointingSection
from mlx_harmony.voice.vad import Endpointer, SpeechEnded, SpeechStarted, make_detector

QUESTIONS = [
    "What is the capital of France?",
    "Set a timer for ten minutes.",
    "How far away is the moon?",
    "Tell me a joke about cats.",
]
VOICES = [("en", 160), ("en+f3", 175), ("en-us", 140)]
LEAD_S, TAIL_S = 3.0, 3.0  # noise alone before and after each question
BLOCK = MODEL_RATE * 80 // 1000


def speech(text: str, voice: str, speed: int, folder: Path) -> np.ndarray:
    raw, out = folder / "raw.wav", folder / "out.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "24000", "-c", "1", "-b", "16", str(out)], check=True)
    return read_wav(out)


def noise(
    kind: str, seconds: float, level: float, rng: np.random.Generator, folder: Path
) -> np.ndarray:
    n = int(seconds * MODEL_RATE)
    if kind == "fan":  # steady, low-passed noise with a hum
        white = rng.normal(size=n + 64)
        low = np.convolve(white, np.ones(64) / 64, mode="valid")[:n]
        hum = 0.3 * np.sin(2 * np.pi * 120 * np.arange(n) / MODEL_RATE)
        x = low / (low.std() + 1e-9) + hum
    else:  # babble: other speech, overlapped and muffled
        voices = [speech(q, v, s, folder) for q, (v, s) in zip(QUESTIONS, VOICES * 2, strict=False)]
        x = np.zeros(n)
        for v in voices:
            reps = np.tile(v, n // len(v) + 2)
            start = rng.integers(0, len(v))
            x += reps[start : start + n]
        x = np.convolve(x, np.ones(8) / 8, mode="same")
        x = x / (x.std() + 1e-9)
    return (x * level / (np.sqrt(np.mean(x**2)) + 1e-9)).astype(np.float32)


def run_detector(detector_name: str, clip: np.ndarray, speech_span: tuple[int, int]) -> dict:
    params = EndpointingSection(detector=detector_name, warmup_blocks=0)  # type: ignore[arg-type]
    detect = make_detector(params, MODEL_RATE)
    endpointer = Endpointer.new(params, 80, warmup=False)
    starts_before = 0
    heard_start = None
    end_at = None
    for i in range(0, len(clip) - BLOCK + 1, BLOCK):
        endpointer, event = endpointer.update(detect(clip[i : i + BLOCK]))
        t = (i + BLOCK) / MODEL_RATE
        if isinstance(event, SpeechStarted):
            if t < speech_span[0] / MODEL_RATE:
                starts_before += 1
            elif heard_start is None:
                heard_start = t
        if isinstance(event, SpeechEnded) and heard_start is not None and end_at is None:
            end_at = t
    speech_end = speech_span[1] / MODEL_RATE
    return {
        "false_starts": starts_before,
        "missed": heard_start is None or end_at is None,
        "end_delay_ms": None if end_at is None else (end_at - speech_end) * 1000,
    }


def measure() -> dict:
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clips = [speech(q, v, s, folder) for q in QUESTIONS for v, s in VOICES]
        for kind in ("fan", "babble"):
            for level_db in (-50, -35, -28):
                level = 10 ** (level_db / 20)
                for clip in clips:
                    bed = noise(kind, LEAD_S + len(clip) / MODEL_RATE + TAIL_S, level, rng, folder)
                    start = int(LEAD_S * MODEL_RATE)
                    mixed = bed.copy()
                    mixed[start : start + len(clip)] += clip
                    voiced = np.nonzero(np.abs(clip) > 0.02)[0]
                    span = (start + int(voiced[0]), start + int(voiced[-1]))
                    for name in ("energy", "silero"):
                        rows.append({"noise": kind, "level_db": level_db, "detector": name}
                                    | run_detector(name, mixed, span))  # fmt: skip
    summary = {}
    for name in ("energy", "silero"):
        for kind in ("fan", "babble"):
            for level_db in (-50, -35, -28):
                sel = [r for r in rows if (r["detector"], r["noise"], r["level_db"])
                       == (name, kind, level_db)]  # fmt: skip
                delays = [r["end_delay_ms"] for r in sel if r["end_delay_ms"] is not None]
                summary[f"{name} {kind} {level_db} dB"] = {
                    "questions": len(sel),
                    "false_starts": sum(r["false_starts"] for r in sel),
                    "missed": sum(r["missed"] for r in sel),
                    "end_delay_ms_median": round(statistics.median(delays)) if delays else None,
                }
    return {"summary": summary, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        raise SystemExit("needs espeak-ng and sox")
    result = measure()
    for key, value in result["summary"].items():
        print(f"{key:<24} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
