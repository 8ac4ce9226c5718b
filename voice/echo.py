"""Acoustic echo cancellation: the assistant's own voice taken out of the microphone.

WebRTC's AEC3 (through `pywebrtc-audio`: 1 MB of wheels for macOS and Linux, a plain
numpy API; LiveKit's module is the same AEC3 in a 30 MB SDK, see the README) is given
each microphone block together with what the speaker played while that block was being
captured (`Speaker.played`), so the assistant's own voice on a laptop's loudspeakers is
removed and the user can interrupt it without a headset. AEC3 works on 10 ms frames at
16, 32 or 48 kHz: the 24 kHz blocks go through it at 48 kHz, keeping the whole band the
STT hears.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from mlx_harmony.voice.audio_io import MODEL_RATE, Block, Speaker

AEC_RATE = 48_000
FRAME = AEC_RATE // 100
# With each microphone block goes what the speaker plays this much after the block's
# capture time (by the devices' reported latencies) until the echo's real delay is
# measured: AEC3 finds small delays itself, but only for an echo that comes after its
# reference, and reported latencies can be off by a hundred milliseconds and more (seen
# through PulseAudio).
LEAD_S = 0.15
# Reference kept behind the newest microphone block.
KEEP_S = 3.0
# The echo's delay is measured by cross-correlating the microphone with the reference
# (decimated to EST_RATE) over the last EST_WINDOW_S, every EST_EVERY_S while something
# plays, for delays in LAGS_S around the reported timing; where it is off, the reference
# is moved to lead its echo by MARGIN_S.
EST_RATE = 4_000
EST_WINDOW_S = 1.5
EST_EVERY_S = 0.5
LAGS_S = (-0.3, 0.6)
MARGIN_S = 0.04
# How far behind its reference an echo may come and still be cancelled well (measured
# in tests/test_voice_echo.py: 20-65 dB from 30 to 450 ms; an echo that comes before
# its reference is not cancelled at all; re-aligning costs seconds of adapting).
GOOD_LAG_S = (0.01, 0.4)
MIN_CORRELATION = 0.3
# A played block whose time disagrees with the running timeline by more than this
# re-anchors it (an underrun, a reopened device); smaller differences are jitter.
REANCHOR_S = 0.05
QUIET = 1e-4  # reference energy below which nothing is being played


def available() -> bool:
    return importlib.util.find_spec("pywebrtc_audio") is not None


def _resampler(src: int, dst: int):
    import soxr

    return soxr.ResampleStream(src, dst, 1, dtype="float32")


class EchoCanceller:
    """Call it with each microphone block; it returns the block without the speaker's sound."""

    def __init__(self, speaker: Speaker) -> None:
        from pywebrtc_audio import EchoCanceller as Aec3

        self.speaker = speaker
        self._aec = Aec3(sample_rate=AEC_RATE)
        self._reset_streams()
        # Energy of the microphone and of what is left, over blocks played while the
        # speaker was sounding: the echo attenuation achieved (see `attenuation_db`).
        self.echo_in = 0.0
        self.echo_out = 0.0

    def _reset_streams(self) -> None:
        self._ref = np.zeros(0, dtype=np.float32)  # 24 kHz, what was heard from _ref_start
        self._ref_start: float | None = None
        self._ref_rate = 0
        self._up_near = _resampler(MODEL_RATE, AEC_RATE)
        self._up_far = _resampler(MODEL_RATE, AEC_RATE)
        self._down = _resampler(AEC_RATE, MODEL_RATE)
        self._carry_near = np.zeros(0, dtype=np.float32)
        self._carry_far = np.zeros(0, dtype=np.float32)
        self._out = np.zeros(0, dtype=np.float32)
        self._primed = False
        self._lead = LEAD_S
        self._candidate: float | None = None  # the last delay measured
        self._near = np.zeros(0, dtype=np.float32)  # the microphone's last EST_WINDOW_S
        self._near_end = 0.0  # capture time just after _near's last sample
        self._since_estimate = 0.0

    def reset(self) -> None:
        """Devices were reopened: the timeline and the echo path start over."""
        self._aec.reset()
        self._reset_streams()

    @property
    def attenuation_db(self) -> float | None:
        if self.echo_in <= 0 or self.echo_out <= 0:
            return None
        return float(10 * np.log10(self.echo_in / self.echo_out))

    def _pull_reference(self) -> None:
        while True:
            try:
                heard_at, pcm = self.speaker.played.popleft()
            except IndexError:
                return
            if self._ref_rate != self.speaker.rate:
                self._ref_rate = self.speaker.rate
                self._to_model = _resampler(self._ref_rate, MODEL_RATE)
            pcm = self._to_model.resample_chunk(pcm)
            expected = (
                None if self._ref_start is None else self._ref_start + len(self._ref) / MODEL_RATE
            )
            if expected is None or abs(heard_at - expected) > REANCHOR_S:
                self._ref = np.zeros(0, dtype=np.float32)
                self._ref_start = heard_at
            self._ref = np.concatenate([self._ref, pcm])

    def _far(self, start: float, n: int) -> np.ndarray:
        far = np.zeros(n, dtype=np.float32)
        if self._ref_start is None:
            return far
        i = round((start + self._lead - self._ref_start) * MODEL_RATE)
        lo, hi = max(i, 0), min(i + n, len(self._ref))
        if hi > lo:
            far[lo - i : hi - i] = self._ref[lo:hi]
        old = i - round(KEEP_S * MODEL_RATE)
        if old > 0:
            self._ref = self._ref[old:]
            self._ref_start += old / MODEL_RATE
        return far

    def _measure_delay(self) -> None:
        """Set the lead from the echo's delay, found where the microphone correlates best
        with what was played (kept as it was when nothing clear is found)."""
        window = round(EST_WINDOW_S * MODEL_RATE)
        if len(self._near) < window or self._ref_start is None:
            return
        first = self._near_end - window / MODEL_RATE
        early, late = LAGS_S
        a = round((first - late - self._ref_start) * MODEL_RATE)
        # The search reaches as far towards negative delays as the reference already goes.
        b = min(a + window + round((late - early) * MODEL_RATE), len(self._ref))
        if a < 0 or b - a < window:
            return
        q = MODEL_RATE // EST_RATE
        near = self._near[: window // q * q].reshape(-1, q).mean(axis=1)
        ref = self._ref[a : a + (b - a) // q * q].reshape(-1, q).mean(axis=1)
        if float(np.sqrt(np.mean(np.square(ref)))) < QUIET * 10:
            return  # nothing was played: nothing to find
        size = 1 << (len(ref) + len(near)).bit_length()
        corr = np.fft.irfft(np.fft.rfft(ref, size) * np.conj(np.fft.rfft(near, size)), size)
        corr = corr[: len(ref) - len(near) + 1]
        energy = np.concatenate([[0.0], np.cumsum(np.square(ref, dtype=np.float64))])
        sliding = energy[len(near) :] - energy[: len(ref) - len(near) + 1]
        norm = np.sqrt(np.maximum(sliding, 1e-12) * float(np.sum(np.square(near))) + 1e-12)
        scores = np.abs(corr) / norm
        k = int(np.argmax(scores))
        if scores[k] < MIN_CORRELATION:
            return
        # The microphone at time t holds what was played at t - delay.
        delay = late - k / EST_RATE
        # Moved only when the echo falls outside what AEC3 handles well behind its
        # reference, and when two measurements in a row agree (one can be fooled by the
        # user talking over the answer): each move costs seconds of AEC3 adapting again.
        lag = self._lead + delay
        agreed = self._candidate is not None and abs(delay - self._candidate) < 0.01
        self._candidate = delay
        if agreed and not GOOD_LAG_S[0] <= lag <= GOOD_LAG_S[1]:
            self._lead = MARGIN_S - delay

    def _remember(self, block: Block) -> None:
        keep = round(EST_WINDOW_S * MODEL_RATE)
        self._near = np.concatenate([self._near, block.pcm])[-keep:]
        self._near_end = block.start + len(block.pcm) / MODEL_RATE
        self._since_estimate += len(block.pcm) / MODEL_RATE
        if self._since_estimate >= EST_EVERY_S:
            self._since_estimate = 0.0
            self._measure_delay()

    def __call__(self, block: Block) -> Block:
        self._pull_reference()
        self._remember(block)
        n = len(block.pcm)
        far = self._far(block.start, n)
        near = np.concatenate([self._carry_near, self._up_near.resample_chunk(block.pcm)])
        far48 = np.concatenate([self._carry_far, self._up_far.resample_chunk(far)])
        m = min(len(near), len(far48)) // FRAME * FRAME
        cleaned = self._aec.process(near[:m], far48[:m]) if m else near[:0]
        self._carry_near, self._carry_far = near[m:], far48[m:]
        self._out = np.concatenate([self._out, self._down.resample_chunk(cleaned)])
        if not self._primed:
            # The resamplers' delay: start the cleaned stream that much behind.
            self._out = np.concatenate([np.zeros(n, dtype=np.float32), self._out])
            self._primed = True
        pcm, self._out = self._out[:n], self._out[n:]
        if len(pcm) < n:
            pcm = np.concatenate([np.zeros(n - len(pcm), dtype=np.float32), pcm])
        if float(np.mean(np.square(far))) > QUIET**2:
            self.echo_in += float(np.sum(np.square(block.pcm, dtype=np.float64)))
            self.echo_out += float(np.sum(np.square(pcm, dtype=np.float64)))
        return Block(pcm, block.at, block.start)
