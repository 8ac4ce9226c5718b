"""`python -m mlx_harmony.bench.turns`: eot-bench's measure of the turn detector, and its data."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_harmony.bench.turns import (
    GRID_S,
    Scores,
    Turn,
    decision_points,
    evaluate,
    operating_points,
    silences,
    sweep,
)
from mlx_harmony.voice.smart_turn import RATE
from mlx_harmony.voice.turn_policy import Fusion, Policy, ends_unfinished

ROOT = Path(__file__).parent.parent


def scores(rows: list[tuple[int, bool, float, list[float]]]) -> Scores:
    """(turn, is_eot, duration, p at 0.1, 0.2, … s) per span."""
    width = max(len(p) for *_, p in rows)
    p = np.full((len(rows), width), np.nan)
    for i, (*_, values) in enumerate(rows):
        p[i, : len(values)] = values
    return Scores(
        [r[0] for r in rows], np.array([r[1] for r in rows]), np.array([r[2] for r in rows]), p
    )


def test_a_policy_cuts_a_turn_off_when_it_fires_inside_a_pause() -> None:
    s = scores([
        (0, False, 0.5, [0.1, 0.9, 0.9, 0.9, 0.9]),  # a 0.5 s pause that sounds finished
        (0, True, 3.0, [0.2, 0.3, 0.95] + [0.95] * 27),
        (1, True, 3.0, [0.9] * 30),
    ])  # fmt: skip
    fast = evaluate(s, Policy(0.5, 0.2, 2.0), n_turns=2)
    assert fast.cutoff == 0.5  # turn 0 is answered 0.2 s into its pause
    assert fast.latency == pytest.approx((0.3 + 0.2) / 2)
    patient = evaluate(s, Policy(0.5, 0.6, 2.0), n_turns=2)
    assert patient.cutoff == 0.0 and patient.latency == pytest.approx(0.6)
    # A timeout shorter than a pause cuts it off whatever the model says.
    assert evaluate(s, Policy(0.99, 0.1, 0.3), n_turns=2).cutoff == 0.5
    # The silence rule: the score is always 1, the minimum wait alone decides.
    silence = scores([(0, False, 0.5, [1.0] * 5), (0, True, 3.0, [1.0] * 30)])
    assert evaluate(silence, Policy(1.0, 0.5, 3.0), 1).cutoff == 0.0
    assert evaluate(silence, Policy(1.0, 0.4, 3.0), 1).cutoff == 1.0


def test_operating_points_are_the_best_policy_under_each_budget() -> None:
    s = scores([
        (0, False, 0.5, [0.1, 0.9, 0.9, 0.9, 0.9]),
        (0, True, 3.0, [0.2, 0.3, 0.95] + [0.95] * 27),
        (1, True, 3.0, [0.9] * 30),
    ])  # fmt: skip
    points = operating_points(sweep(s, n_turns=2))
    best = points["latency@5%"]
    assert best is not None and best.cutoff == 0.0
    # Above 0.9 the pause never fires; turn 0 ends at 0.3 s, turn 1 at the 0.5 s timeout.
    assert best.latency == pytest.approx(0.4) and best.policy.max_wait_s == 0.5
    assert points["cutoff@300ms"] is not None and points["cutoff@300ms"].cutoff == 0.5


def test_decision_points_follow_eot_benchs_span_filter() -> None:
    turn = Turn("t", "en", np.zeros(RATE), [(0.5, 0.65), (1.0, 1.5), (2.0, 8.0), (9.0, 9.5)])
    points = list(decision_points([turn]))
    # 150 ms is under the 200 ms a mid-turn pause needs, 6 s over its 5 s; the last is the end.
    assert [(s, eot) for _, s, eot, _, _ in points] == [(1, False), (3, True)]


def test_silences_are_found_in_the_audio() -> None:
    audio = np.concatenate([
        np.zeros(RATE // 2), 0.1 * np.ones(RATE), np.zeros(RATE // 4), 0.1 * np.ones(RATE // 2),
        np.zeros(RATE // 20), 0.1 * np.ones(RATE // 2), np.zeros(RATE),
    ]).astype(np.float32)  # fmt: skip
    # Leading silence is no pause; 50 ms is too short to be one.
    assert silences(audio) == [(1.5, 1.75), (2.8, 3.8)]


def test_hold_words_and_the_fusion() -> None:
    assert ends_unfinished("I need eggs, milk and", ["and"])
    assert ends_unfinished("so I was thinking that…", [])
    assert not ends_unfinished("What is it for?", ["and"])
    fusion = Fusion(acoustic_weight=1.0, text_weight=1.0)
    assert fusion.probability(0.9, None, "what time is it") == pytest.approx(0.9, abs=1e-6)
    assert fusion.probability(0.9, 0.9, "what time is it") > 0.98  # two agreeing signals
    assert fusion.probability(0.9, 0.9, "eggs, milk and") == 0.0
    assert fusion.probability(None, None, "what time") is None  # nothing: the silence rule


def wav_bytes(audio: np.ndarray) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio, RATE, format="WAV")
    return buffer.getvalue()


def tiny_eot_bench(path: Path) -> None:
    """Two rows in eot-bench-data's schema (`id`, `language`, `audio` as encoded bytes,
    `silence_spans`, `words`), and one in another language."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(RATE) / RATE)
    quiet = np.zeros(RATE // 2)
    audio = np.concatenate([tone, quiet, tone, 2 * quiet]).astype(np.float32)
    rows = [
        {"id": "a", "language": "en", "audio": {"bytes": wav_bytes(audio), "path": "a.wav"},
         "silence_spans": [{"start": 1.0, "end": 1.5}, {"start": 2.5, "end": 3.5}],
         "words": [{"word": "so", "start": 0.1, "end": 0.5},
                   {"word": "and", "start": 0.5, "end": 0.95},
                   {"word": "then", "start": 1.5, "end": 2.4}]},
        {"id": "b", "language": "en",
         "audio": {"bytes": wav_bytes(audio[: 2 * RATE]), "path": None},
         "silence_spans": [{"start": 1.0, "end": 2.0}], "words": []},
        {"id": "c", "language": "de", "audio": {"bytes": wav_bytes(audio), "path": None},
         "silence_spans": [{"start": 1.0, "end": 2.0}], "words": []},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.heavy
def test_eot_bench_rows_are_scored_with_the_silence_rule_beside_the_detectors(
    tmp_path: Path,
) -> None:
    data = tmp_path / "validation-00000-of-00001.parquet"
    tiny_eot_bench(data)
    out = tmp_path / "turns.json"
    run = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.bench.turns",
         "--eot-bench", str(tmp_path), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("2 turns, 1 mid-turn pauses, from eot-bench rows")
    results = json.loads(out.read_text())
    assert set(results) == {"silence", "smart-turn", "fused", "_meta"}
    # Turn a pauses 0.5 s after "so and": the silence rule must wait all of it.
    silence = results["silence"]["points"]["latency@5%"]
    assert silence["cutoff"] == 0 and silence["min_wait_s"] == pytest.approx(0.5)
    # The hold word keeps turn a whatever the voice sounds like: the fused rule may fire
    # at the least wait the transcript allows.
    fused = results["fused"]["points"]["latency@5%"]
    assert fused["cutoff"] == 0 and fused["latency_s"] < silence["latency_s"]
    assert "| silence |" in run.stdout and "| fused |" in run.stdout


@pytest.mark.heavy
def test_eot_bench_rows_without_its_columns_are_one_line(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "x", "audio": b""}]), data)
    run = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.bench.turns", "--eot-bench", str(data)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip() == f"--eot-bench {data}: rows lack language, silence_spans"


def test_scoring_is_every_tenth_of_a_second_into_a_pause() -> None:
    turn = Turn("t", "en", np.zeros(3 * RATE, np.float32), [(0.5, 0.8), (1.0, 4.0)])
    seen: list[list[float]] = []

    def detector(_turn: Turn, times: list[float]) -> list[float]:
        seen.append(times)
        return [0.5] * len(times)

    from mlx_harmony.bench.turns import score

    s = score([turn], detector)
    assert seen[0] == pytest.approx([0.6, 0.7, 0.8])
    assert len(seen[1]) == round(3.0 / GRID_S)  # the end is scored as long as any wait
    assert s.eot.tolist() == [False, True]
