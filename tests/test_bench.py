"""The benchmark command runs on the tiny models and writes its files (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_harmony.bench.cli import load_prompts
from mlx_harmony.llm.errors import ConfigError

ROOT = Path(__file__).parent.parent


def test_benchmark_smoke(gpt_oss_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.bench.cli",
         "--model", str(gpt_oss_path), "--questions", "2",
         "--max-tokens", "16", "--turns", "3", "--filler", "20", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    sides = [r["side"] for r in results["single_turn"]]
    assert sides == ["engine", "mlx-lm", "engine", "mlx-lm"]
    assert [r["side"] for r in results["multi_turn"]] == ["engine"] * 3 + ["no-reuse"] * 3
    reused = [r["cached_tokens"] for r in results["multi_turn"] if r["side"] == "engine"]
    assert reused[0] == 0 and all(c > 0 for c in reused[1:])
    assert all(r["cached_tokens"] == 0 for r in results["multi_turn"] if r["side"] == "no-reuse")
    assert results["summary"]["decode_tps_ratio"] > 0
    ended, listening = results["listening"]
    assert (ended["side"], listening["side"]) == ("ended", "listening")
    assert ended["prompt_tokens"] == listening["prompt_tokens"]
    # The words prefilled while the user spoke leave only the last few for the end.
    assert listening["prompt_tokens"] - listening["cached_tokens"] <= 8
    assert ended["prompt_tokens"] - ended["cached_tokens"] > 20
    for name in ("single_turn.csv", "multi_turn.csv", "listening.csv", "plot.png"):
        assert (out / name).stat().st_size > 0
    assert "decode tokens/s" in run.stdout


def test_custom_prompt_lists(tmp_path: Path) -> None:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["one", {"instruction": "two"}]))
    assert load_prompts(path, 5) == ["one", "two"]
    path.write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(ConfigError, match=r"item 0: expected a string or an object"):
        load_prompts(path, 5)


def test_the_shipped_question_set_is_alpaca_eval() -> None:
    prompts = load_prompts(None, 1000)
    assert len(prompts) == 805
    assert prompts[0].startswith("What are the names of some famous actors")


def run_voice_bench(
    gpt_oss_path: Path, voice_models: Path, tmp_path: Path, *options: str
) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    config = tmp_path / "voice.json"
    config.write_text(json.dumps({
        "stt": {"model": str(voice_models / "stt")},
        "tts": {"model": str(voice_models / "tts"), "voice": "tiny-voice",
                "voice_repo": str(voice_models / "tts" / "voices")},
        "endpointing": {"silence_ms": 400, "warmup_blocks": 0},
    }))  # fmt: skip
    out = tmp_path / "bench"
    run = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.bench.cli",
         "--model", str(gpt_oss_path), "--skip", "single",
         "--skip", "multi", "--skip", "listening", "--voice", "--voice-config", str(config),
         "--voice-rounds", "1", "--no-plot", "--out", str(out), *options],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run, json.loads((out / "results.json").read_text()), out


def test_voice_latency_benchmark_smoke(
    gpt_oss_path: Path, voice_models: Path, virtual_audio, tmp_path: Path
) -> None:
    """Through PulseAudio's virtual devices, the TTS on its own thread and on the loop's
    (the other variants are the file devices' test below)."""
    run, results, out = run_voice_bench(
        gpt_oss_path, voice_models, tmp_path, "--voice-devices", "pulse", "--voice-prefill", "on",
        "--voice-tts-thread", "both",
    )  # fmt: skip
    rows = results["voice"]
    assert [row["tts_thread"] for row in rows] == [True, False]
    for row in rows:
        assert row["prefill_while_listening"] and row["cached_tokens"] > 0
        assert row["first_audio_ms"] > row["endpointing_ms"] > 0
    labels = ["with_prefill_tts_thread", "with_prefill_one_thread"]
    assert results["voice_summary"]["labels"] == labels
    assert (out / "voice.csv").stat().st_size > 0
    assert "voice-to-voice latency" in run.stdout and labels[1] in run.stdout


def test_voice_latency_benchmark_runs_without_a_sound_server(
    gpt_oss_path: Path, voice_models: Path, tmp_path: Path
) -> None:
    """Paced file devices through the real daemon: what a GPU machine without PulseAudio
    uses (no virtual_audio fixture: nothing of PulseAudio is needed). The pause heads
    off, speculative start off and on in one process, each reported as such; with
    `--voice-one-chat` each variant's second question is its conversation's second turn
    (its prompt holds the first, still in the cache), not a new chat's first. With
    `--voice-realtime` the same questions are then asked over /v1/realtime in the same
    process, timed from speech_stopped and the end of speech to the first audio delta."""
    env_free = ("--voice-devices", "file", "--voice-prefill", "on", "--voice-speculate",
                "both", "--voice-set", "endpointing.semantic=off", "--voice-rounds", "2",
                "--voice-one-chat", "--voice-realtime")  # fmt: skip
    run, results, _ = run_voice_bench(gpt_oss_path, voice_models, tmp_path, *env_free)
    off, off_again, on, on_again = results["voice"]
    for row in (off, on):
        assert row["prefill_while_listening"] and row["cached_tokens"] > 0
        assert row["first_audio_ms"] > row["endpointing_ms"] > 0
    assert (off["speculate_ms"], off["speculative"]) == (0, False)
    assert (on["speculate_ms"], on["speculative"]) == (250, True)
    for first, second in ((off, off_again), (on, on_again)):
        assert second["prompt_tokens"] > first["prompt_tokens"] + 10
        assert second["cached_tokens"] > first["prompt_tokens"]
    summary = results["voice_summary"]
    assert summary["labels"] == ["with_prefill_speculate_0", "with_prefill_speculate_250"]
    assert summary["with_prefill_speculate_250_speculative_turns"] == 2
    assert "with_prefill_speculate_250" in run.stdout
    # The playout buffer's share for recurring stalls, per answer and over the variant.
    rows = results["voice"]
    assert all({"late_ms", "jitter_frames"} <= row.keys() for row in rows)
    assert (
        summary["with_prefill_speculate_0_jitter_frames"]
        == off["jitter_frames"] + off_again["jitter_frames"]
    )
    assert "jitter_frames" in run.stdout
    realtime = summary["realtime"]
    assert [r["status"] for r in realtime] == ["completed", "completed"]
    for row in realtime:
        assert row["audio_ms"] > 0
        assert 0 < row["after_speech_stopped_ms"] < row["after_speech_end_ms"]
    assert "realtime API: first audio delta" in run.stdout


def test_a_scripted_transcript_runs_the_stt_and_reveals_the_question_word_by_word(
    transcriber,
) -> None:
    import numpy as np

    from mlx_harmony.bench.kyutai import ScriptedTranscript
    from mlx_harmony.voice.stt import FRAME

    scripted = ScriptedTranscript(transcriber, "What is the capital of France?", 2)
    scripted.start()
    seen = []
    for _ in range(8):
        before = transcriber.frames_fed
        scripted.feed(np.zeros(FRAME, dtype=np.float32))
        assert transcriber.frames_fed == before + 1  # the real model stepped
        seen.append(scripted.text)
    assert seen[1] == "What" and seen[3] == "What is" and seen[7] == "What is the capital"
    before = transcriber.frames_fed
    assert scripted.peek() == "What is the capital"  # the words so far
    assert transcriber.frames_fed == before and scripted.active  # and went back
    assert scripted.finish() == "What is the capital of France?"
    assert not scripted.active


def test_speculative_start_variants_by_name_or_milliseconds() -> None:
    from mlx_harmony.bench.cli import speculate_variants

    assert speculate_variants("both", None) == (0, 250)
    assert speculate_variants("on", 160) == (160,)
    assert speculate_variants("config", 160) == (None,)
    assert speculate_variants("0,250,160", None) == (0, 250, 160)
    for bad in ("sometimes", "250,-1", ""):
        with pytest.raises(SystemExit, match="--voice-speculate"):
            speculate_variants(bad, None)


@pytest.mark.heavy
def test_prefill_shapes_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "shapes.json"
    run = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.bench.prefill_shapes",
         "--model", "random:gpt-oss-small",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    assert [r["tokens"] for r in results["passes"]["B"]][:3] == [77, 8, 5]
    assert results["passes"]["A"][1]["cached"] == 77
    assert results["env"]["MLX_CUDA_USE_CUDNN_SDPA"] == "0"


@pytest.mark.heavy
def test_random_weights_answer_the_voice_benchmark_in_plain_words(vocab_dir: Path) -> None:
    """What random weights write is mostly symbols and other scripts, which the voice
    loop's speech cleaning drops: a run once spoke not one sound. The benchmark's sampling
    keeps their answers to plain words, every one of them spoken."""
    from mlx_harmony.bench.cli import load_engine, voice_sampling
    from mlx_harmony.bench.shapes import PLAIN_WORDS
    from mlx_harmony.llm.config import PromptConfig
    from mlx_harmony.llm.conversation import Conversation
    from mlx_harmony.llm.messages import AnswerNow, ChatMessage, TextDelta
    from mlx_harmony.voice.speakable import speakable

    engine, bias = load_engine("random:gpt-oss-small")
    sampling = voice_sampling("random:gpt-oss-small", engine, bias, 24)
    question = Conversation([ChatMessage("user", "What time is it?")], PromptConfig())
    events = engine.stream(question, sampling, start=AnswerNow())
    text = "".join(e.text for e in events if isinstance(e, TextDelta) and e.channel == "final")
    assert len(text.split()) >= 12  # every token a word (up to a few split in two)
    assert set(text.split()) <= set(PLAIN_WORDS.split())
    assert speakable(text).split() == text.split()


def test_the_operations_a_tts_frame_launches_are_counted_from_its_graphs(
    voice_models: Path,
) -> None:
    """`bench.graph_ops` on the tiny TTS: every part of a frame has operations, the
    compiled depformer launches fewer kernels than moshi-mlx's loop (its elementwise
    chains fused) and the fused frame's steps fewer still (here as MLX operations: the
    CUDA kernels are counted where MLX runs on CUDA), fewer codebooks take fewer, and a
    frame is the sum of its parts."""
    from mlx_harmony.bench.graph_ops import count
    from mlx_harmony.voice.tts import Synthesizer

    folder = voice_models / "tts"  # its own copy: the count cuts the codebooks
    tts = Synthesizer.load(str(folder), "tiny-voice", str(folder / "voices"), temperature=0.0)
    rows = {(r["codebooks"], r["depformer"]): r for r in count(tts, [4, 2])}
    kinds = ("moshi-mlx loop", "compiled", "fused (MLX ops)")
    assert set(rows) == {(k, d) for k in (4, 2) for d in kinds}
    for k in (4, 2):
        plain, compiled, fused = (rows[k, d] for d in kinds)
        assert 0 < fused["depformer_kernels"] < compiled["depformer_kernels"]
        assert compiled["depformer_kernels"] < plain["depformer_kernels"]
        assert compiled["backbone_kernels"] == plain["backbone_kernels"] > 0
        assert compiled["mimi_kernels"] > 0
        assert plain["frame_kernels"] == (
            plain["backbone_kernels"] + plain["depformer_kernels"] + plain["mimi_kernels"]
        )
    assert rows[2, "compiled"]["depformer_kernels"] < rows[4, "compiled"]["depformer_kernels"]


def test_the_first_frame_benchmark_times_every_step_up_to_each_answers_first_frame(
    voice_models: Path,
) -> None:
    """`bench.first_frame` on the tiny TTS: each answer's steps from its first word
    pushed, the text-only delay batched first, each step starting where the last ended,
    the same steps in every answer (greedy), and a first frame after a few words."""
    from itertools import pairwise

    from mlx_harmony.bench.first_frame import ANSWER, first_frames
    from mlx_harmony.voice.tts import Synthesizer

    folder = voice_models / "tts"
    tts = Synthesizer.load(str(folder), "tiny-voice", str(folder / "voices"), temperature=0.0)
    tts.warmup()
    rows = first_frames(tts, 2)
    for row in rows:
        assert row["first_frame_ms"] > 0 and 0 < row["words"] < len(ANSWER.split())
        assert row["steps"][0][0] == 0 and row["steps"][0][1] > 1
        assert all(a[0] + a[1] == b[0] for a, b in pairwise(row["steps"]))
        assert len(row["gc_ms"]) == len(row["steps"]) and min(row["gc_ms"]) >= 0
    assert [s[:3] for s in rows[0]["steps"]] == [s[:3] for s in rows[1]["steps"]]
    (whole,) = first_frames(tts, 1, ANSWER, frames=20)
    assert sum(s[2] == tts.lm.dep_q for s in whole["steps"]) >= 18
    head = len(rows[0]["steps"])
    assert [s[:3] for s in whole["steps"][:head]] == [s[:3] for s in rows[0]["steps"]]


def test_the_garbage_collectors_pauses_are_counted() -> None:
    """What the first-frame bench says of each step's garbage collection."""
    import gc

    from mlx_harmony.bench.first_frame import GcPauses

    pauses = GcPauses()
    gc.callbacks.append(pauses)
    try:
        garbage = [[i] for i in range(100_000)]
        del garbage
        gc.collect()
    finally:
        gc.callbacks.remove(pauses)
    assert pauses.ms > 0
    counted = pauses.ms
    gc.collect()
    assert pauses.ms == counted  # no longer listening


def test_a_stall_is_a_full_frame_step_over_four_times_the_median() -> None:
    from mlx_harmony.bench.first_frame import stalls

    steps = [(0, 16, 0, 90.0), (16, 1, 1, 15.0)] + [(17 + i, 1, 8, 30.0) for i in range(9)]
    steps.append((26, 1, 8, 125.0))
    assert stalls(steps) == [(26, 1, 8, 125.0)]  # not the batched delay, nor the 1-pass step
    assert stalls(steps[:-1]) == [] and stalls([]) == []


def test_the_first_frame_benchmark_command_writes_its_answers(
    voice_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The command as on a GPU machine, here with the tiny TTS in place of the published
    shapes: whole answers stepped, their stalls listed, the JSON written."""
    from mlx_harmony.bench import first_frame, kyutai
    from mlx_harmony.voice.checkpoints import load_checkpoint

    folder = voice_models / "tts"
    voice = next((folder / "voices").glob("*.safetensors"))
    tiny = load_checkpoint(str(folder), generating_audio=True, quantize=None)
    monkeypatch.setattr(kyutai, "_tts_parts", lambda *_: (tiny, voice))
    out = tmp_path / "first.json"
    argv = ["first_frame", "--answers", "2", "--frames", "30", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    first_frame.main()
    printed = capsys.readouterr().out
    assert printed.count("first frame") == 2 and printed.count("stalls") == 2
    results = json.loads(out.read_text())
    assert results["warm_batch_shapes"] is False  # MLX on the CPU: nothing to build per shape
    assert [len(a["steps"]) >= 30 for a in results["answers"]] == [True, True]
