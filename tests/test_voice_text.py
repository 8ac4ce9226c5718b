"""Pure pieces of the voice pipeline: endpointing rules, the spoken answer's words."""

from __future__ import annotations

import pytest

from mlx_harmony.voice.config import EndpointingSection
from mlx_harmony.voice.speakable import SpeakableStream, speakable
from mlx_harmony.voice.vad import (
    Endpointer,
    SpeechDropped,
    SpeechEnded,
    SpeechStarted,
    energy_detector,
)

BLOCK_MS = 80


def run(endpointer: Endpointer, pattern: str) -> list[tuple[int, object]]:
    """Feed 's' (speech) / '.' (silence) blocks; return (block index, event) pairs."""
    out = []
    for i, c in enumerate(pattern):
        endpointer, event = endpointer.update(c == "s")
        if event is not None:
            out.append((i, event))
    return out


def make(**kw) -> Endpointer:
    params = {"hits": 2, "silence_ms": 400, "min_speech_ms": 200, "warmup_blocks": 0} | kw
    return Endpointer.new(EndpointingSection(**params), BLOCK_MS)


def test_speech_starts_after_hits_and_ends_after_the_configured_silence() -> None:
    events = run(make(), ".." + "s" * 6 + "." * 10)
    (i0, start), (i1, end) = events
    assert i0 == 3 and start == SpeechStarted(blocks_back=2)
    # 400 ms of silence at 80 ms a block is 5 blocks after the last speech block (index 7).
    assert i1 == 7 + 5 and isinstance(end, SpeechEnded) and end.reason == "silence"
    assert end.speech_ms == 6 * BLOCK_MS


def test_a_single_blip_does_not_start_an_utterance() -> None:
    assert run(make(), ".s.s.s.s.") == []


def test_short_pauses_inside_an_utterance_do_not_end_it() -> None:
    events = run(make(), "ssss...ssss...ssss" + "." * 6)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechEnded]


def test_too_short_utterances_are_dropped() -> None:
    events = run(make(min_speech_ms=400), "sss" + "." * 6)
    assert isinstance(events[-1][1], SpeechDropped)


def test_an_utterance_is_cut_at_max_length() -> None:
    events = run(make(max_utterance_s=0.8), "s" * 20)
    ends = [(i, e) for i, e in events if isinstance(e, SpeechEnded)]
    assert ends[0][1].reason == "max_length" and ends[0][0] == 1 + 10 - 2


def test_warmup_blocks_are_ignored() -> None:
    assert run(make(warmup_blocks=3), "sss") == []
    assert len(run(make(warmup_blocks=3), "sssss")) == 1


def test_energy_detector_threshold() -> None:
    import numpy as np

    detect = energy_detector(0.01)
    assert not detect(np.zeros(1920, dtype=np.float32))
    assert detect(np.full(1920, 0.05, dtype=np.float32))


def spoken_words(text: str, pieces: int = 7) -> str:
    stream = SpeakableStream()
    out = ""
    for i in range(0, len(text), pieces):  # streamed a few characters at a time
        out += stream.push(text[i : i + pieces])
    return out + stream.flush()


def test_words_are_released_as_soon_as_they_are_complete() -> None:
    stream = SpeakableStream()
    assert stream.push("Paris is the capi") == "Paris is the "
    assert stream.push("tal of") == "capital "
    assert stream.flush() == "of "


@pytest.mark.parametrize("pieces", [1, 2, 3, 5, 8, 13, 1000])
def test_markup_split_anywhere_is_still_not_read(pieces: int) -> None:
    text = (
        "**Paris** is the _capital_ of France. See [the city page](https://ex.com/paris).\n\n"
        "- one\n- two\n```python\nprint(1)\n```\nDone."
    )
    assert spoken_words(text, pieces) == (
        "Paris is the capital of France. See the city page. one two Done. "
    )


@pytest.mark.parametrize(
    ("markdown", "spoken"),
    [
        ("**Paris** is the _capital_.", "Paris is the capital."),
        ("## Answer\n- one\n- two", "Answer one two"),
        ("See [the docs](https://x.y) now", "See the docs now"),
        ("Run `ls` then:\n```sh\nrm -rf /\n```\ndone", "Run ls then: done"),
    ],
)
def test_markup_is_not_read_aloud(markdown: str, spoken: str) -> None:
    assert speakable(markdown) == spoken


def test_code_blocks_are_not_cut_in_the_middle() -> None:
    got = spoken_words("Here:\n```\na. b. c. d. e. f. g. h.\n```\nThat is all.", 3)
    assert got == "Here: That is all. "


def speech_and_noise(folder):
    """A spoken question (espeak-ng, 24 kHz) and two seconds of loud hiss."""
    import subprocess

    import numpy as np

    wav, raw = folder / "speech.wav", folder / "speech.raw"
    subprocess.run(["espeak-ng", "-w", str(wav), "What is the weather like today?"], check=True)
    subprocess.run(["sox", str(wav), "-r", "24000", "-c", "1", "-b", "32", "-e", "float",
                    str(raw)], check=True)  # fmt: skip
    noise = (np.random.default_rng(0).normal(size=24_000 * 2) * 0.05).astype(np.float32)
    return np.fromfile(raw, dtype=np.float32), noise


@pytest.mark.heavy
def test_silero_detector_hears_speech_but_not_silence_or_noise(tmp_path) -> None:
    import numpy as np

    from mlx_harmony.voice.silero import SileroDetector

    speech, noise = speech_and_noise(tmp_path)

    def fraction(audio: np.ndarray) -> float:
        detect = SileroDetector.load(24_000, 0.5)
        hits = [detect(audio[i : i + 1920]) for i in range(0, len(audio) - 1919, 1920)]
        return sum(hits) / len(hits)

    assert fraction(speech) > 0.6
    assert fraction(np.zeros(24_000 * 2, dtype=np.float32)) == 0
    assert fraction(noise) < 0.1  # loud hiss is energy, not speech


@pytest.mark.heavy
def test_the_default_detector_takes_speech_that_is_near_and_not_noise_or_far_speech(
    tmp_path,
) -> None:
    """Silero's decision on blocks above the energy floor: loud hiss is no speech (the
    energy detector calls it speech), and speech far away (a TV) is too quiet to count."""
    import numpy as np

    from mlx_harmony.voice.config import EndpointingSection
    from mlx_harmony.voice.vad import make_detector

    speech, noise = speech_and_noise(tmp_path)
    params = EndpointingSection()
    assert params.detector == "silero"

    def fraction(audio: np.ndarray, params: EndpointingSection = params) -> float:
        detect = make_detector(params, 24_000)
        hits = [detect(audio[i : i + 1920]) for i in range(0, len(audio) - 1919, 1920)]
        return sum(hits) / len(hits)

    assert fraction(speech) > 0.5
    assert fraction(noise) < 0.1
    assert fraction(speech * 0.02) == 0  # far away: under the energy floor
    assert fraction(noise, EndpointingSection(detector="energy")) > 0.9
