"""Kyutai STT and TTS at their published shapes with random weights: step times and
real-time factors on whatever backend MLX has (CPU, Metal, CUDA).

Random weights do the same arithmetic as trained ones, so per-frame times are real; the
audio is noise. A Mimi frame is 80 ms: a step has to stay well under that to keep up.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from moshi_mlx import models
from moshi_mlx.models.mimi import Mimi, mimi_202407

from mlx_harmony.llm.cli.common import run_main
from mlx_harmony.voice.checkpoints import Checkpoint, quantize_lm
from mlx_harmony.voice.config import TtsSection
from mlx_harmony.voice.stt import FRAME, Transcriber
from mlx_harmony.voice.synthesis import TextToSpeech
from mlx_harmony.voice.tts import Synthesizer

DATA = Path(__file__).parent / "data"
FRAME_MS = 80.0
TEXT = "The capital of France is Paris. It is also the largest city in the country."
# Long enough that random weights (which end a script early, sampling "new word" often)
# still speak for the frames that are timed.
LONG_TEXT = " ".join([TEXT] * 6)


@dataclass
class KyutaiRecord:
    model: str  # "tts-1.6b", "tts-1.6b moshi-mlx generate" (the peer) or "stt-1b"
    quantize: int | None
    frames: int
    step_ms_median: float
    step_ms_p90: float
    real_time_factor: float  # step time / 80 ms: below 1 keeps up with speech
    first_audio_s: float | None  # TTS: from the first words pushed to the first 80 ms out
    codebooks: int | None = None  # TTS: audio codebooks generated
    skip_delay_depformer: bool | None = None  # TTS: depformer skipped in the text-only delay
    compile_depformer: bool | None = None  # TTS: the depformer's frame as one compiled call
    batch_delay: bool | None = None  # TTS: the text-only delay's known steps batched
    # TTS: the depformer's frame fused into a few steps a codebook, as MLX operations
    # ("mlx") or CUDA kernels ("kernels"); "off": moshi-mlx's loop.
    fused_depformer: str | None = None
    # TTS, where a step's time goes: the backbone (up to its text token), the depformer
    # (up to the frame's audio tokens), Mimi's decode of the frame.
    backbone_ms_median: float | None = None
    depformer_ms_median: float | None = None
    mimi_ms_median: float | None = None

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


def _summary(
    name: str, q: int | None, times: list[float], first: float | None, **tts: object
) -> KyutaiRecord:
    ms = sorted(t * 1000 for t in times)
    median = statistics.median(ms)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    return KyutaiRecord(name, q, len(ms), median, p90, median / FRAME_MS, first, **tts)  # type: ignore[arg-type]


def _tts_parts(folder: Path, quantize: int | None, dtype: mx.Dtype) -> tuple[Checkpoint, Path]:
    raw = tts_config()
    lm = _random_lm(raw, dtype)
    if quantize:
        quantize_lm(lm, quantize)
    voice = folder / "voice.safetensors"
    dim = raw["conditioners"]["speaker_wavs"]["tensor"]["dim"]
    mx.save_safetensors(str(voice), {"speaker_wavs": mx.random.normal((1, dim, 125)) * 0.1})
    return Checkpoint(raw, lm, _mimi(raw["dep_q"]), _tokenizer(folder)), voice


class _FrameParts:
    """Splits each session step at the points where it waits for the GPU anyway: the text
    token read by the script's state machine (end of the backbone), the frame's audio
    tokens read back (end of the depformer) and Mimi's decoded samples."""

    def __init__(self, tts: Synthesizer) -> None:
        self.t0 = self.t_text = self.t_audio = self.t_mimi = 0.0
        self.rows: list[tuple[float, float, float]] = []
        machine, mimi = tts.model.machine, tts.mimi
        process, decode = machine.process, mimi.decode_step

        def timed_process(*args):
            self.t_text = time.perf_counter()
            return process(*args)

        def timed_decode(codes: mx.array) -> mx.array:
            self.t_audio = time.perf_counter()  # the audio tokens were just read back
            pcm = decode(codes)
            mx.eval(pcm)
            self.t_mimi = time.perf_counter()
            return pcm

        machine.process = timed_process
        mimi.decode_step = timed_decode

    def start(self) -> float:
        self.t0 = time.perf_counter()
        return self.t0

    def keep(self) -> None:
        self.rows.append(
            (self.t_text - self.t0, self.t_audio - self.t_text, self.t_mimi - self.t_audio)
        )

    def medians(self) -> dict[str, float]:
        if not self.rows:
            return {}
        names = ("backbone_ms_median", "depformer_ms_median", "mimi_ms_median")
        return {n: statistics.median(r[i] for r in self.rows) * 1000 for i, n in enumerate(names)}


def _timed_session(
    tts: TextToSpeech, frames: int, parts: _FrameParts | None = None
) -> tuple[float | None, list[float]]:
    """The product's path: a whole utterance first (kernels compile per shape), then one
    streaming session, the answer's words pushed at once (a language model writes faster
    than speech), frames stepped out. Seconds from the push to the first frame, and each
    later frame's step (not those that also ran other steps: a batched text-only delay, a
    chunk's text prefill)."""
    for _ in tts.speak(TEXT):
        pass
    session: Any = tts.session()
    start = time.perf_counter()
    session.push(LONG_TEXT + " ")
    first, times = None, []
    while len(times) < frames and not session.done:
        if not session.ready:
            session.close()
            continue
        t = parts.start() if parts is not None else time.perf_counter()
        frame = session.step()
        if frame is None:
            continue
        if first is None:
            first = time.perf_counter() - start
        elif session.last_steps == 1:
            times.append(time.perf_counter() - t)
            if parts is not None:
                parts.keep()
    return first, times


def bench_tts(
    frames: int,
    quantize: int | None,
    codebooks: int | None = None,
    skip_delay_depformer: bool = True,
    compile_depformer: bool = True,
    batch_delay: bool = True,
    dtype: mx.Dtype = mx.bfloat16,
    fused_depformer: str = "off",
) -> KyutaiRecord:
    """TTS 1.6B through the product's session loop (`_timed_session`), Mimi's decode
    included and timed on its own."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, voice = _tts_parts(Path(tmp), quantize, dtype)
        tts = Synthesizer(
            ckpt, voice, temperature=0.6, max_seconds=120, codebooks=codebooks,
            skip_delay_depformer=skip_delay_depformer, compile_depformer=compile_depformer,
            batch_delay=batch_delay, fused_depformer=fused_depformer,  # type: ignore[arg-type]
        )  # fmt: skip
        parts = _FrameParts(tts)
        first, times = _timed_session(tts, frames, parts)
    return _summary(
        "tts-1.6b", quantize, times, first,
        codebooks=tts.lm.dep_q, skip_delay_depformer=skip_delay_depformer,
        compile_depformer=compile_depformer, batch_delay=tts.batch_delay,
        fused_depformer=fused_depformer if tts._fused is not None else "off", **parts.medians(),
    )  # fmt: skip


def bench_tts_moshi(
    frames: int, quantize: int | None, dtype: mx.Dtype = mx.bfloat16
) -> KyutaiRecord:
    """The peer: moshi-mlx's own `TTSModel.generate` on the same shapes and text, each frame
    decoded by Mimi as it comes (as its own `run_tts` does)."""
    from moshi_mlx.models.tts import TTSModel

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, voice = _tts_parts(Path(tmp), quantize, dtype)
        # Its loop runs a script to the end: stop it once the timed frames are out.
        delay = int(ckpt.raw_config["tts_config"]["audio_delay"] * ckpt.mimi.frame_rate)
        model = TTSModel(
            ckpt.lm, ckpt.mimi, ckpt.tokenizer, temp=0.6, raw_config=ckpt.raw_config,
            max_gen_length=frames + delay + 8,
        )  # fmt: skip
        cfg = 2.0 if model.valid_cfg_conditionings else None
        attributes = model.make_condition_attributes([voice], cfg)
        stamps: list[float] = []

        def on_frame(frame: mx.array) -> None:
            if bool((frame != -1).all()):
                mx.eval(ckpt.mimi.decode_step(frame[:, :, None]))
                stamps.append(time.perf_counter())

        entries = model.prepare_script([LONG_TEXT], padding_between=1)
        model.generate([entries], [attributes], on_frame=on_frame)  # compiles kernels
        stamps.clear()
        start = time.perf_counter()
        entries = model.prepare_script([LONG_TEXT], padding_between=1)
        model.generate([entries], [attributes], on_frame=on_frame)
    first = stamps[0] - start if stamps else None
    times = [b - a for a, b in itertools.pairwise(stamps)][:frames]
    return _summary(
        "tts-1.6b moshi-mlx generate", quantize, times, first,
        codebooks=ckpt.lm.dep_q, skip_delay_depformer=False, compile_depformer=False,
    )  # fmt: skip


def bench_stt(frames: int, quantize: int | None, dtype: mx.Dtype = mx.bfloat16) -> KyutaiRecord:
    raw = stt_config()
    with tempfile.TemporaryDirectory() as tmp:
        lm = _random_lm(raw, dtype)
        if quantize:
            quantize_lm(lm, quantize)
        ckpt = Checkpoint(raw, lm, _mimi(raw["n_q"]), _tokenizer(Path(tmp)))
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


def bench_pocket(frames: int, quantize: int | None, dtype: mx.Dtype = mx.float32) -> KyutaiRecord:
    """The second backend, Pocket TTS at its published shape, on the same text and the same
    session loop as `bench_tts` (its first audio waits for the first sentence: its text is
    a prefix of each chunk)."""
    from mlx_harmony.bench.pocket import random_pocket

    with tempfile.TemporaryDirectory() as tmp:
        first, times = _timed_session(random_pocket(Path(tmp), quantize, dtype), frames)
    name = "pocket-tts" if dtype == mx.float32 else f"pocket-tts {dtype}".replace("mlx.core.", "")
    return _summary(name, quantize, times, first)


LEVERS = "plain,skip,skip+compile,skip+compile+batch"


def bench_tts_levers(
    frames: int, quantize: int | None, codebooks: str, levers: str = LEVERS
) -> list[KyutaiRecord]:
    """`bench_tts` for each codebook count (comma-separated) and each lever set: plain,
    skip (the depformer skipped where its tokens are dropped), compile (its frame compiled),
    batch (the text-only delay's known steps as one backbone call; needs skip), fused (the
    compiled frame restructured into a few steps a codebook, as MLX operations), kernels
    (those steps as CUDA kernels; needs compile), or several joined by `+`."""
    sets = [set(v.split("+")) for v in levers.split(",")]
    fused = {"kernels": "kernels", "fused": "mlx"}
    return [
        bench_tts(
            frames,
            quantize,
            int(k),
            "skip" in lever,
            "compile" in lever,
            "batch" in lever,
            fused_depformer=next((fused[f] for f in fused if f in lever), "off"),
        )
        for k in codebooks.split(",")
        for lever in sets
    ]


def main() -> None:
    """`python -m mlx_harmony.bench.kyutai`: the Kyutai tables alone, without the chat engine's
    dependencies (for a GPU machine that has only MLX and moshi-mlx)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mlx_harmony.bench.kyutai", description=main.__doc__)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--codebooks", default="32,24,16,8")
    p.add_argument("--quantize", type=int, choices=[4, 8], action="append", default=[],
                   help="quantizations to time besides bf16 (repeatable)")  # fmt: skip
    p.add_argument("--levers", default=LEVERS, help=bench_tts_levers.__doc__)
    p.add_argument("--backends", default="kyutai,pocket",
                   help="TTS backends to time (comma-separated): kyutai (TTS 1.6B, its "
                   "moshi-mlx peer and STT 1B), pocket (Pocket TTS, float32 and bf16)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("kyutai.json"))
    args = p.parse_args()
    backends = set(args.backends.split(","))
    rows: list[dict] = []

    def emit(record: KyutaiRecord) -> None:
        rows.append(record.row())
        print(json.dumps(rows[-1]), flush=True)

    if "kyutai" in backends:
        emit(bench_tts_moshi(args.frames, None))
    for q in [None, *args.quantize]:
        if "pocket" in backends:
            emit(bench_pocket(args.frames, q))
            emit(bench_pocket(args.frames, q, mx.bfloat16))
        if "kyutai" in backends:
            for record in bench_tts_levers(args.frames, q, args.codebooks, args.levers):
                emit(record)
            emit(bench_stt(args.frames, q))
    args.out.write_text(json.dumps({"device": str(mx.default_device()), "rows": rows}, indent=1))


if __name__ == "__main__":
    run_main(main)  # as every command: MLX's environment settings first


class ScriptedTranscript:
    """A random-weight STT doing all of its real work (every frame through Mimi and the
    model, its flushes and peeks) while the transcript is a fixed question, revealed a
    word every few frames as a trained model would: its own words would be noise, and the
    assistant needs words."""

    def __init__(self, stt: Transcriber, text: str, frames_per_word: int = 3) -> None:
        self.stt, self.words, self.frames_per_word = stt, text.split(), frames_per_word
        self._start = 0

    # A random-weight model's pause heads predict noise: these runs end turns by silence.
    predicts_pauses = False
    pause = None

    def warmup(self) -> None:
        self.stt.warmup()

    def start(self) -> None:
        self.stt.start()
        self._start = self.stt.frames_fed

    @property
    def text(self) -> str:
        shown = (self.stt.frames_fed - self._start) // self.frames_per_word
        return " ".join(self.words[: min(shown, len(self.words))])

    @property
    def active(self) -> bool:
        return self.stt.active

    @property
    def room(self) -> int:
        return self.stt.room

    @property
    def frames_fed(self) -> int:
        return self.stt.frames_fed

    def feed(self, pcm: np.ndarray) -> str:
        before = self.text
        self.stt.feed(pcm)
        return self.text[len(before) :]

    def peek(self, silence_s: float = 0.0) -> str:
        self.stt.peek(silence_s)
        return self.text

    def stop(self) -> None:
        self.stt.stop()

    def finish(self, silence_s: float = 0.0) -> str:
        self.stt.finish(silence_s)
        return " ".join(self.words)


def random_voice_models(
    folder: Path,
    question: str,
    tts_config: TtsSection,
    stt_quantize: int | None = None,
) -> tuple[ScriptedTranscript, TextToSpeech]:
    """STT 1B and TTS 1.6B (or Pocket TTS, as `tts.backend` says) at their published
    shapes with random weights, warmed up (MLX on CUDA compiles kernels per shape: the
    first frames take seconds) and the TTS's codebooks chosen and timed as the voice
    command does."""
    raw = stt_config()
    lm = _random_lm(raw, mx.bfloat16)
    if stt_quantize:
        quantize_lm(lm, stt_quantize)
    stt_folder, tts_folder = folder / "stt", folder / "tts"
    stt_folder.mkdir(parents=True, exist_ok=True)
    tts_folder.mkdir(parents=True, exist_ok=True)
    stt = Transcriber(Checkpoint(raw, lm, _mimi(raw["n_q"]), _tokenizer(stt_folder)))
    auto = tts_config.codebooks == "auto"
    tts: TextToSpeech
    if tts_config.backend == "pocket":
        from mlx_harmony.bench.pocket import random_pocket

        tts = random_pocket(tts_folder, tts_config.quantize)
    else:
        ckpt, voice = _tts_parts(tts_folder, tts_config.quantize, mx.bfloat16)
        tts = Synthesizer(
            ckpt, voice, temperature=0.6, max_seconds=120,
            codebooks=None if auto else tts_config.codebooks,
            fused_depformer=tts_config.fused_depformer,
        )  # fmt: skip
    scripted = ScriptedTranscript(stt, question)
    scripted.warmup()
    stt.start()
    for _ in range(12):
        stt.feed(np.zeros(FRAME, dtype=np.float32))
    stt.finish()
    tts.warmup()  # as the voice command does, then the same timing
    tts.calibrate(auto, tts_config.min_codebooks, tts_config.realtime_margin)
    return scripted, tts
