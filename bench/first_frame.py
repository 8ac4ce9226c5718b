"""Where an answer's first sound goes: TTS 1.6B's steps up to each answer's first frame.

`python3 -m mlx_harmony.bench.first_frame [--answers 4] [--warm-shapes auto|on|off]
[--fused-depformer auto|off] [--frames N]`: TTS 1.6B at its published shapes with random
weights, warmed up and timed as the voice command does, then answers whose words are
pushed one at a time, as a language model writes them, each step timed until the first
frame (or the N-th: the steps that took over 4x the median frame, stalls, are listed).
The first answer of a process is compared with the ones after it: a backend that builds
kernels per shape at their first use (MLX on CUDA) shows there what a user's first
question would pay.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_harmony.llm.cli.common import run_main
from mlx_harmony.voice.speaking import STALL_FACTOR
from mlx_harmony.voice.tts import Synthesizer

ANSWER = "Sure, the capital of France is Paris, which is also its largest city by far."


class GcPauses:
    """Milliseconds the garbage collector has held the process so far (`gc.callbacks`):
    a collection of the older generations walks every Python object, and a step it
    lands in is that much longer."""

    def __init__(self) -> None:
        self.ms, self._since = 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._since = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._since) * 1000


def first_frames(tts: Synthesizer, answers: int, text: str = ANSWER, frames: int = 1) -> list[dict]:
    """Each answer stepped until its `frames`-th frame (or its end): ms from its first
    word to its first frame, the words pushed by then, and its steps as (position, model
    steps, depformer passes, ms); a step of several model steps is the text-only delay's
    batched backbone call; with them the garbage collector's ms within each step."""
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    try:
        return [_answer(tts, n, text, frames, pauses) for n in range(answers)]
    finally:
        gc.callbacks.remove(pauses)


def _answer(tts: Synthesizer, n: int, text: str, frames: int, pauses: GcPauses) -> dict:
    session, words = tts.session(), [w + " " for w in text.split()]
    steps: list[tuple[int, int, int, float]] = []
    gc_ms: list[float] = []
    pushed, made, first, words_then = 0, 0, None, 0
    start = time.perf_counter()
    while made < frames and not session.done:
        if pushed < len(words):
            session.push(words[pushed])
            pushed += 1
        elif not session.closed:
            session.close()
        while made < frames and session.ready:
            at, t, collected = session.offset, time.perf_counter(), pauses.ms
            frame = session.step()
            now = time.perf_counter()
            steps.append((at, session.last_steps, session.last_slices, (now - t) * 1000))
            gc_ms.append(pauses.ms - collected)
            if frame is not None:
                made += 1
                if first is None:
                    first, words_then = (now - start) * 1000, pushed
    return {
        "answer": n,
        "first_frame_ms": first,
        "words": words_then,
        "steps": steps,
        "gc_ms": gc_ms,
    }


def stalls(steps: list[tuple[int, int, int, float]]) -> list[tuple]:
    """The single steps that ran every kept codebook and took over `STALL_FACTOR` times
    their median: what the voice loop counts as a stall (the gaps of its compiled frame
    came from such steps)."""
    most = max((s[2] for s in steps), default=0)
    full = [s for s in steps if s[1] == 1 and s[2] == most > 0]
    if not full:
        return []
    usual = statistics.median(s[3] for s in full)
    return [s for s in full if s[3] > STALL_FACTOR * usual]


def main() -> None:
    from mlx_harmony.bench.kyutai import _tts_parts

    p = argparse.ArgumentParser(prog="python -m mlx_harmony.bench.first_frame", description=__doc__)
    p.add_argument("--answers", type=int, default=4)
    p.add_argument("--frames", type=int, default=1,
                   help="step each answer to this many frames, and list the steps that took "
                   "over 4x the median frame (stalls, as the voice loop counts them)")  # fmt: skip
    p.add_argument("--warm-shapes", choices=["auto", "on", "off"], default="auto",
                   help="warm the batched delay's attention shapes (auto: where MLX builds "
                   "cuDNN attention graphs per shape, as the voice command does)")  # fmt: skip
    p.add_argument("--fused-depformer", choices=["auto", "off"], default="auto",
                   help="as tts.fused_depformer")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("first-frame.json"))
    args = p.parse_args()
    warm = None if args.warm_shapes == "auto" else args.warm_shapes == "on"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, voice = _tts_parts(Path(tmp), None, mx.bfloat16)
        tts = Synthesizer(
            checkpoint, voice, max_seconds=120, warm_batch_shapes=warm,
            fused_depformer=args.fused_depformer,
        )  # fmt: skip
        tts.warmup()
        speed = tts.calibrate(True, 8, 1.2)
    print(speed.describe(), flush=True)
    # About 3 frames a word: a text long enough for the frames asked.
    text = " ".join([ANSWER] * (1 + args.frames // 40))
    rows = first_frames(tts, args.answers, text, args.frames)
    for row in rows:
        head = [s for s in row["steps"] if s[0] <= tts.model.delay_steps + max(tts.lm.delays)]
        steps = ", ".join(f"{n}@{at}:{ms:.1f}" for at, n, _, ms in head)
        first = f"answer {row['answer'] + 1}: first frame {row['first_frame_ms']:.0f} ms"
        print(f"{first} after {row['words']} words; steps (n@position: ms) {steps}", flush=True)
        if args.frames > 1:
            gc_at = dict(zip(row["steps"], row["gc_ms"], strict=True))
            slow = ", ".join(
                f"@{s[0]}: {s[3]:.0f} ms (gc {gc_at[s]:.0f})" for s in stalls(row["steps"])
            )
            at, _, _, ms = max(row["steps"], key=lambda s: s[3])
            print(f"  {len(row['steps'])} steps, the longest {ms:.0f} ms @{at}; "
                  f"stalls {slow or 'none'}; gc {sum(row['gc_ms']):.0f} ms in all",
                  flush=True)  # fmt: skip
    later = [r["first_frame_ms"] for r in rows[1:]]
    if later:
        ratio = rows[0]["first_frame_ms"] / statistics.median(later)
        print(f"first answer / median of the others: {ratio:.2f}x")
    out = {
        "device": str(mx.default_device()),
        "tts": speed.as_log(),
        "warm_batch_shapes": tts.warm_batch_shapes,
        "answers": rows,
    }
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    run_main(main)  # as every command: MLX's environment settings first
