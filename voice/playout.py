"""When an answer's audio starts playing, so that it never stops mid-word.

Speech is synthesized one frame at a time while it plays. Where synthesis keeps up with
playback, each frame is played as it comes. Where it does not (a slower machine), playing
at once would run the speaker dry mid-answer, again and again; instead the first frames
are held back until the audio in hand covers what the rest of the answer will fall behind
by, and then the whole answer plays without a gap. Pure arithmetic: the daemon measures,
predicts and counts; this module only decides.
"""

from __future__ import annotations

import math

# Synthesis is taken to run this much slower than measured: its speed varies from frame to
# frame and with the machine's other work, and a gap costs more than a few frames' wait.
RATE_MARGIN = 1.1


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
