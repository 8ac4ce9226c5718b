"""How fast text to speech runs on this machine, and how many codebooks it can afford.

A Kyutai TTS frame (80 ms of audio) costs a backbone step, one depformer pass per audio
codebook generated, and Mimi's decode. The first steps of every answer run the backbone
alone (the audio is still delayed), so one short measured session gives both ends of a
line, frame(k) = fixed + k · per codebook; the codebook count is the largest whose frame
keeps synthesis the configured margin ahead of playback. Fewer codebooks is coarser sound,
never a gap (see the README for what each count costs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import median


@dataclass(frozen=True)
class FrameCost:
    """Seconds of synthesis per frame: the parts every frame pays, and each codebook's."""

    fixed: float  # backbone step and Mimi decode
    per_codebook: float  # one depformer pass

    def frame(self, codebooks: int) -> float:
        return self.fixed + self.per_codebook * codebooks


@dataclass(frozen=True)
class StepTimes:
    """One measured session: seconds of the steps that ran the backbone alone, of those
    that ran every kept codebook and gave audio, and of Mimi's decode in the latter."""

    codebooks: int
    backbone: list[float]
    full: list[float]
    decode: list[float]

    @property
    def frame(self) -> float:
        return median(self.full)


def frame_cost(times: StepTimes) -> FrameCost:
    """The line through the measured session's two ends. Without backbone-only steps
    (a model with no text-only delay) all of the frame but the decode is put on the
    codebooks: the choice then errs towards too many, which the re-measure corrects."""
    frame = times.frame
    decode = median(times.decode) if times.decode else 0.0
    backbone = median(times.backbone) if times.backbone else 0.0
    fixed = min(frame, backbone + decode)
    per = (frame - fixed) / times.codebooks if times.codebooks else 0.0
    return FrameCost(fixed, max(per, 0.0))


def line_through(a: tuple[int, float], b: tuple[int, float]) -> FrameCost:
    """The line through two measured (codebooks, frame seconds) points."""
    (ka, ta), (kb, tb) = a, b
    if ka == kb:
        return FrameCost(0.0, ta / ka if ka else 0.0)
    per = max((ta - tb) / (ka - kb), 0.0)
    return FrameCost(max(ta - per * ka, 0.0), per)


def choose_codebooks(
    cost: FrameCost, have: int, floor: int, margin: float, frame_seconds: float
) -> int:
    """The most codebooks (at most `have`, at least `floor` or `have` if fewer, and never
    fewer than 2: Mimi decodes the first apart from the rest) whose frame is synthesized
    `margin` times faster than it plays."""
    floor = min(max(floor, 2), have)
    budget = frame_seconds / margin
    for k in range(have, floor - 1, -1):
        if cost.frame(k) <= budget:
            return k
    return floor


MOST_CUTS = 4  # each re-traces the depformer and times 8 frames: seconds of start-up


def fit_codebooks(
    times: StepTimes,
    cost: FrameCost,
    cut: Callable[[int], StepTimes],
    floor: int,
    margin: float,
    frame_seconds: float,
) -> tuple[FrameCost, StepTimes]:
    """Cut to the codebook count `cost` chooses, re-measure there (`cut`), and refit the
    line through the last two measures, until a measured frame keeps the margin, the
    floor is reached or `MOST_CUTS` cuts were made. The line fitted to one session is a
    first guess, and a frame's cost need not be linear in its codebooks (each later
    depformer pass attends over more): a secant step from above lands nearer each time.
    The last cut's line and times."""
    measured = [(times.codebooks, times.frame)]
    for _ in range(MOST_CUTS):
        k = choose_codebooks(cost, times.codebooks, floor, margin, frame_seconds)
        if k >= times.codebooks:
            break
        times = cut(k)
        measured.append((k, times.frame))
        cost = line_through(measured[-2], measured[-1])
        if frame_seconds / times.frame >= margin:
            break
    return cost, times


@dataclass(frozen=True)
class TtsSpeed:
    """What the start-up measurement found and chose, for the status line and the log."""

    codebooks: int | None  # None: a model without codebooks to choose (Pocket TTS)
    of: int | None  # the model's own count
    frame_seconds: float  # synthesis time of one frame, all kept codebooks
    audio_seconds: float  # the audio one frame holds
    chosen: bool  # picked for this machine (tts.codebooks "auto"), not fixed by the config
    margin: float
    depformer: str | None = None  # how TTS 1.6B's depformer runs, where it is not the usual
    bits: int | None = None  # weights quantized at start, where the fewest codebooks fell short

    @property
    def rate(self) -> float:
        """Audio seconds synthesized per second (above 1 keeps up with playback)."""
        return self.audio_seconds / self.frame_seconds if self.frame_seconds > 0 else 99.0

    @property
    def keeps_up(self) -> bool:
        return self.rate >= self.margin

    def describe(self) -> str:
        speed = f"{self.rate:.2f}x real time ({self.frame_seconds * 1000:.0f} ms a frame)"
        if self.codebooks is None:
            line, faster = f"Pocket TTS, {speed}", "tts.quantize 8 speeds it up"
        else:
            how = "chosen for this machine" if self.chosen else "set in tts.codebooks"
            weights = f", {self.bits}-bit weights" if self.bits else ""
            line = f"{self.codebooks} of {self.of} codebooks{weights} ({how}), {speed}"
            line += f", depformer as {self.depformer}" if self.depformer else ""
            faster = (
                'Pocket TTS, tts.backend "pocket", keeps up on smaller machines'
                if self.chosen
                else "tts.quantize 8 or fewer tts.codebooks speed it up"
            )
        if not self.keeps_up:
            line += (
                f"; under the {self.margin:g}x margin: an answer may wait until enough is "
                f"buffered to play without a gap ({faster})"
            )
        return line

    def as_log(self) -> dict[str, float | int | bool | None]:
        return {
            "codebooks": self.codebooks,
            "of": self.of,
            "frame_ms": round(self.frame_seconds * 1000, 1),
            "rate": round(self.rate, 3),
            "chosen": self.chosen,
            "depformer": self.depformer,
            "bits": self.bits,
        }
