"""Kyutai STT and TTS at their published shapes with random weights: step times and
real-time factors on whatever backend MLX has (CPU, Metal, CUDA).

Random weights do the same arithmetic as trained ones, so per-frame times are real; the
audio is noise. A Mimi frame is 80 ms: a step has to stay well under that to keep up.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from moshi_mlx import models
from moshi_mlx.models.mimi import Mimi, mimi_202407

from voice.checkpoints import Checkpoint, quantize_lm
from voice.stt import FRAME, Transcriber
from voice.tts import Synthesizer

DATA = Path(__file__).parent / "data"
FRAME_MS = 80.0
TEXT = "The capital of France is Paris. It is also the largest city in the country."


@dataclass
class KyutaiRecord:
    model: str  # "tts-1.6b" or "stt-1b"
    quantize: int | None
    frames: int
    step_ms_median: float
    step_ms_p90: float
    real_time_factor: float  # step time / 80 ms: below 1 keeps up with speech
    first_audio_s: float | None  # TTS: from speak() to the first 80 ms of audio

    def row(self) -> dict:
        return asdict(self)


def tts_config() -> dict:
    return json.loads((DATA / "kyutai-tts-1.6b-en_fr.config.json").read_text())


def stt_config() -> dict:
    """The STT 1B shape: the same backbone family without the depformer, fed 32 Mimi
    codebooks, with the extra (pause) heads and a 0.5 s text delay."""
    cfg = tts_config()
    for key in ("conditioners", "fuser", "tts_config", "model_id", "cross_attention",
                "demux_second_stream", "depformer_weights_per_step_schedule",
                "depformer_low_rank_embeddings"):  # fmt: skip
        cfg.pop(key, None)
    cfg |= {
        "dep_q": 0, "delays": [0] * 33, "context": 750, "extra_heads_num_heads": 4,
        "extra_heads_dim": 6, "model_type": "stt",
        "stt_config": {"audio_silence_prefix_seconds": 0.0, "audio_delay_seconds": 0.5},
    }  # fmt: skip
    return cfg


def _random_lm(raw: dict, dtype: mx.Dtype) -> models.Lm:
    lm = models.Lm(models.LmConfig.from_config_dict(raw))
    params = tree_map(lambda p: (mx.random.normal(p.shape) * 0.02).astype(dtype), lm.parameters())
    lm.update(params)
    mx.eval(lm.parameters())
    return lm


def _tokenizer(folder: Path):
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([TEXT] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tok"), vocab_size=60,
        hard_vocab_limit=False, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
    )  # fmt: skip
    return spm.SentencePieceProcessor(str(folder / "tok.model"))  # type: ignore[call-arg]


def _mimi(codebooks: int) -> Mimi:
    mimi = Mimi(mimi_202407(codebooks))
    for _, module in mimi.named_modules():
        if hasattr(module, "update_in_place") and hasattr(module, "cluster_usage"):
            module.embedding_sum = mx.random.normal(module.embedding_sum.shape)
            module.cluster_usage = mx.ones(module.cluster_usage.shape)
            module.update_in_place()
    return mimi


def _summary(name: str, q: int | None, times: list[float], first: float | None) -> KyutaiRecord:
    ms = sorted(t * 1000 for t in times)
    median = statistics.median(ms)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    return KyutaiRecord(name, q, len(ms), median, p90, median / FRAME_MS, first)


def bench_tts(frames: int, quantize: int | None, dtype: mx.Dtype = mx.bfloat16) -> KyutaiRecord:
    raw = tts_config()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lm = _random_lm(raw, dtype)
        if quantize:
            quantize_lm(lm, quantize)
        voice = folder / "voice.safetensors"
        dim = raw["conditioners"]["speaker_wavs"]["tensor"]["dim"]
        mx.save_safetensors(str(voice), {"speaker_wavs": mx.random.normal((1, dim, 125)) * 0.1})
        ckpt = Checkpoint(None, raw, lm, _mimi(raw["dep_q"]), _tokenizer(folder))
        tts = Synthesizer(ckpt, voice, temperature=0.6, max_seconds=60)
        for _ in tts.speak(TEXT):  # a whole utterance first: kernels compile per shape
            pass
        start = time.perf_counter()
        speech = tts.speak(TEXT)
        next(speech)
        first = time.perf_counter() - start
        times = []
        for _ in range(frames):
            t = time.perf_counter()
            if next(speech, None) is None:
                break
            times.append(time.perf_counter() - t)
        speech.close()
    return _summary("tts-1.6b", quantize, times, first)


def bench_stt(frames: int, quantize: int | None, dtype: mx.Dtype = mx.bfloat16) -> KyutaiRecord:
    raw = stt_config()
    with tempfile.TemporaryDirectory() as tmp:
        lm = _random_lm(raw, dtype)
        if quantize:
            quantize_lm(lm, quantize)
        ckpt = Checkpoint(None, raw, lm, _mimi(raw["n_q"]), _tokenizer(Path(tmp)))
        stt = Transcriber(ckpt, max_seconds=frames * FRAME_MS / 1000 + 2)
        noise = (np.random.default_rng(0).normal(size=FRAME) * 0.05).astype(np.float32)
        for _ in range(2):  # the second pass is timed: the first compiles kernels per length
            stt.start()
            times = []
            for _ in range(frames):
                t = time.perf_counter()
                stt.feed(noise)
                times.append(time.perf_counter() - t)
            stt.finish()
    return _summary("stt-1b", quantize, times, None)
