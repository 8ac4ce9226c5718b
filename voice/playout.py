"""When an answer's audio starts playing, so that it never stops mid-word.

Speech is synthesized one frame at a time while it plays. Where synthesis keeps up with
playback, each frame is played as it comes. Where it does not (a slower machine), playing
at once would run the speaker dry mid-answer, again and again; instead the first frames
are held back until the audio in hand covers what the rest of the answer will fall behind
by, and then the whole answer plays without a gap. A pace that keeps up on average can
still run dry where a single step stalls (the machine busy elsewhere, the language model
and the TTS taking turns): how late the latest frame came for its place in the playback
is remembered over the last answers, and where that recurs the next ones start that
much later (`frames_for_lateness`), as a network audio client's jitter buffer does.
Pure arithmetic: the daemon measures, predicts and counts; this module only decides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# Synthesis is taken to run this much slower than measured: its speed varies from frame to
# frame and with the machine's other work, and a gap costs more than a few frames' wait.
RATE_MARGIN = 1.1
# Answers whose lateness sizes the next ones' extra buffer, and how many of them must
# have been that late: a stall that recurs is buffered for until it stops recurring.
LATE_ANSWERS = 4
RECUR = 2
# A frame this much of a frame late is no stall: the audio device's own buffer covers it.
LATE_TOLERANCE = 0.1
# Frames added to a recurring stall's lateness: one stall is not exactly as long as the
# last (the frames rounded up, then at least half a frame more).
LATE_SPREAD = 0.5


def frames_to_buffer(rate: float, total_frames: int) -> int:
    """Frames to have synthesized before the first one plays, for an answer of
    `total_frames` frames synthesized at `rate` times real time.

    In frame-lengths from the moment playback starts with `p` frames in hand: frame
    `j >= p` is ready after `(j - p + 1) / rate` and plays at `j`. Where `rate >= 1` the
    first frame is the tightest (`p >= 1 / rate`: one frame is enough); below it the last
    one is, `(N - p) / rate <= N - 1`, so `p >= N - rate * (N - 1)`: the predicted
    shortfall of the whole answer, plus the frame being played.
    """
    if total_frames <= 1:
        return 1
    if rate >= 1:
        return 1
    need = total_frames - max(rate, 0.0) * (total_frames - 1)
    # A hair of tolerance: N - r(N-1) is often whole, and floating point must not add one.
    return min(total_frames, max(1, math.ceil(need - 1e-9)))


def frames_for_lateness(late_seconds: Iterable[float], frame_seconds: float) -> int:
    """Frames to hold back beyond the pace's buffer so that a frame as late as two of the
    last answers' latest (`late_seconds`, each the most any of an answer's frames came
    after its place in the playback) still comes in time: a stall that recurs is buffered
    for, a one-off one (a kernel built at the first use of a shape) is not."""
    ranked = sorted(late_seconds, reverse=True)
    recurring = ranked[RECUR - 1] if len(ranked) >= RECUR else 0.0
    if recurring <= LATE_TOLERANCE * frame_seconds:
        return 0
    return math.ceil(recurring / frame_seconds + LATE_SPREAD - 1e-9)
