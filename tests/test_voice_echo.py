"""Echo cancellation (`voice.echo`) on a simulated room: a speaker whose sound reaches the
microphone later than the devices' reported latencies say, offline and fast."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from mlx_harmony.voice.audio_io import MODEL_RATE, Block
from mlx_harmony.voice.echo import EchoCanceller

BLOCK = 1920  # 80 ms microphone blocks
PLAYED = 480  # 20 ms speaker callbacks
AHEAD = MODEL_RATE * 3 // 10  # what the speaker has been given beyond the microphone


class FakeSpeaker:
    rate = MODEL_RATE

    def __init__(self) -> None:
        self.played: deque[tuple[float, np.ndarray]] = deque()


def voice_like(seconds: float, seed: int) -> np.ndarray:
    """Noise shaped into syllables: broadband, with pauses, like speech to an AEC."""
    rng = np.random.default_rng(seed)
    n = int(seconds * MODEL_RATE)
    envelope = (np.sin(np.arange(n) / MODEL_RATE * 2 * np.pi * 3) > -0.2).astype(np.float32)
    return (rng.normal(0, 0.1, n) * envelope).astype(np.float32)


def run(echo_delay_s: float, seconds: float = 8.0, talk: np.ndarray | None = None):
    """Play `seconds` of sound; the microphone hears it `echo_delay_s` after the time the
    speaker reported (negative: earlier, as misreported latencies make it), at half
    level, plus `talk`. Returns (echo canceller, raw blocks, cleaned blocks)."""
    speaker = FakeSpeaker()
    aec = EchoCanceller(speaker)  # type: ignore[arg-type]
    sound = voice_like(seconds, seed=1)
    shift = round(echo_delay_s * MODEL_RATE)
    heard = np.zeros_like(sound)
    if shift >= 0:
        heard[shift:] = sound[: len(sound) - shift]
    else:
        heard[:shift] = sound[-shift:]
    mic = 0.5 * heard + (talk[: len(sound)] if talk is not None else 0)
    raw, cleaned = [], []
    played = 0
    for i in range(0, len(sound) - BLOCK + 1, BLOCK):
        # The speaker's callbacks run ahead of the microphone's (its buffer, its latency).
        while played < min(i + AHEAD, len(sound)):
            speaker.played.append((played / MODEL_RATE, sound[played : played + PLAYED]))
            played += PLAYED
        block = Block(mic[i : i + BLOCK].astype(np.float32), at=0.0, start=i / MODEL_RATE)
        raw.append(block.pcm)
        cleaned.append(aec(block).pcm)
    return aec, raw, cleaned


def level_db(blocks: list[np.ndarray]) -> float:
    return 10 * float(np.log10(np.mean(np.square(np.concatenate(blocks))) + 1e-20))


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, -0.12, -0.2])
def test_the_speakers_sound_is_removed_from_the_microphone(delay: float) -> None:
    aec, raw, cleaned = run(delay)
    settled = slice(len(raw) // 2, None)  # after AEC3 (and the delay search) settled
    assert level_db(raw[settled]) - level_db(cleaned[settled]) > 15
    assert aec.attenuation_db is not None and aec.attenuation_db > 10


def test_the_users_voice_over_the_echo_is_kept() -> None:
    talk = voice_like(8.0, seed=2) * 0.5
    _, raw, cleaned = run(0.05, talk=talk)
    settled = slice(len(raw) // 2, None)
    user = [talk[i * BLOCK : (i + 1) * BLOCK] for i in range(len(raw))][settled]
    # What is left is the user's voice, at about its own level.
    assert abs(level_db(cleaned[settled]) - level_db(user)) < 6
