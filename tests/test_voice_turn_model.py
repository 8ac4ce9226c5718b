"""The acoustic turn model (Smart Turn v3.2): its features, the real ONNX file, the worker
that runs it beside the loop, and what happens without it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.voice import smart_turn
from mlx_harmony.voice.config import EndpointingSection
from mlx_harmony.voice.smart_turn import RATE, SmartTurn, log_mel, model_path
from mlx_harmony.voice.turn_scorer import TurnScorer, load_turn_scorer

DATA = Path(__file__).parent / "data"


def reference_audio() -> np.ndarray:
    """The signal `whisper_mel_reference.npz` was computed from, once, with transformers'
    `WhisperFeatureExtractor(chunk_length=8)` (do_normalize=True): 2 s of zeros (the left
    padding the model gets), 1 s of silence, then a gliding tone, a beating one and a chirp."""
    t = np.arange(6 * RATE) / RATE
    x = 0.3 * np.sin(2 * np.pi * (180 + 60 * np.sin(2 * np.pi * 0.7 * t)) * t)
    x += 0.1 * np.sin(2 * np.pi * 2100 * t) * np.sin(2 * np.pi * 3 * t)
    x += 0.02 * np.sin(2 * np.pi * 6800 * t * t / 6)
    x[:RATE] = 0.0
    return np.pad(x, (2 * RATE, 0)).astype(np.float32)


def test_features_are_whispers_log_mel() -> None:
    reference = np.load(DATA / "whisper_mel_reference.npz")["features"]
    features = log_mel(reference_audio())
    assert features.shape == (80, 800) and features.dtype == np.float32
    np.testing.assert_allclose(features, reference, atol=1e-5)


def test_the_window_is_the_last_eight_seconds_zero_padded_in_front() -> None:
    short = np.ones(RATE, np.float32)
    window = smart_turn.last_seconds(short)
    assert len(window) == 8 * RATE and window[: 7 * RATE].max() == 0 and window[-1] == 1
    long = np.arange(10 * RATE, dtype=np.float32)
    assert smart_turn.last_seconds(long)[0] == 2 * RATE


def espeak(text: str, folder: Path) -> np.ndarray:
    import soundfile
    import soxr

    wav = folder / "said.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(wav), text], check=True)
    audio, rate = soundfile.read(str(wav), dtype="float32")
    return soxr.resample(audio, rate, RATE).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> SmartTurn:
    return SmartTurn.load()  # pipecat's bundled copy: the tests' environment has it


@pytest.mark.heavy
def test_the_published_model_hears_a_finished_question_and_one_cut_short(
    model: SmartTurn, tmp_path: Path
) -> None:
    assert model.path.name == "smart-turn-v3.2-cpu.onnx"
    said = espeak("What is the weather like in Paris tomorrow", tmp_path)
    assert model.probability(said) > 0.5
    assert model.probability(said[: int(len(said) * 0.6)]) < 0.5  # cut mid-word


@pytest.mark.heavy
def test_the_scorer_runs_beside_the_caller_one_call_at_a_time(
    model: SmartTurn, tmp_path: Path
) -> None:
    said = espeak("What is the weather like in Paris tomorrow", tmp_path)
    import soxr

    at_24k = soxr.resample(said, RATE, 24_000).astype(np.float32)
    scorer = TurnScorer(model, 24_000)
    try:
        scorer.start([at_24k[:1920]])
        for i in range(1920, len(at_24k), 1920):
            scorer.add(at_24k[i : i + 1920])
        scorer.request(1.0)
        scorer.request(2.0)  # while the first runs: dropped, not queued
        scorer.wait(timeout=60)
        results = scorer.results()
        assert [at for at, _ in results] == [1.0]
        assert results[0][1] > 0.5
    finally:
        scorer.close()


def test_a_missing_model_file_is_one_line_and_the_silence_rule(tmp_path: Path) -> None:
    lines: list[str] = []
    missing = EndpointingSection(turn_model=str(tmp_path / "nope.onnx"))
    assert load_turn_scorer(missing, 24_000, lines.append) is None
    assert lines == [
        f"endpointing.turn_model: {tmp_path / 'nope.onnx'}: no such file; turns end after "
        "700 ms of silence instead"
    ]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    lines.clear()
    assert (
        load_turn_scorer(EndpointingSection(turn_model=str(broken)), 24_000, lines.append) is None
    )
    assert len(lines) == 1 and lines[0].startswith(f"{broken}: not a turn model")
    assert load_turn_scorer(EndpointingSection(turn_model=None), 24_000, lines.append) is None


def test_without_pipecat_the_model_comes_from_the_hub_cache_and_offline_says_so(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(smart_turn, "_bundled", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="not in the Hugging Face cache"):
        model_path("smart-turn-v3.2")


@pytest.mark.heavy
def test_a_worker_that_dies_stops_the_scores_not_the_assistant(model: SmartTurn) -> None:
    scorer = TurnScorer(model, RATE)
    try:
        scorer.warmup()
        scorer.start([np.zeros(RATE, np.float32)])
        pool = scorer._pool
        (worker,) = pool._processes.values()  # type: ignore[attr-defined]
        worker.kill()  # as the kernel's OOM killer would
        worker.join()
        scorer.request(1.0)
        scorer.wait(timeout=60)
        assert scorer.results() == []
        assert scorer.failure is not None and "BrokenProcessPool" in scorer.failure
        scorer.request(2.0)  # nothing more is asked of it
        assert scorer.results() == []
    finally:
        scorer.close()
