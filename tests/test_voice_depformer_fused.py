"""The depformer's frame fused into a few steps per codebook (`voice.depformer_fused`), as
MLX operations everywhere and as CUDA kernels (`voice.depformer_cuda`) where MLX runs on
an NVIDIA GPU: greedy, both emit moshi-mlx's own tokens and audio."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from moshi_mlx.models.lm import DepFormer
from moshi_mlx.utils.sampling import Sampler

from mlx_harmony.voice.depformer_fused import (
    FusedDepformer,
    MlxOps,
    Sampling,
    fused_depformer,
    nucleus,
    sampling_of,
    shape_of,
)
from mlx_harmony.voice.tts import Synthesizer

CUDA = mx.cuda.is_available()
on_cuda = pytest.mark.skipif(not CUDA, reason="the CUDA kernels need MLX on an NVIDIA GPU")
TEXT = "The capital of France is Paris. It is also the largest city."


def load(folder: Path, **kwargs) -> Synthesizer:
    kwargs.setdefault("temperature", 0.0)
    return Synthesizer.load(str(folder), "tiny-voice", str(folder / "voices"), **kwargs)


def frame_inputs(lm, seed: int) -> tuple[mx.array, mx.array]:
    """The backbone's output (float32, as TTS 1.6B's float32 norm gives it) and a text
    token."""
    mx.random.seed(seed)
    main = mx.random.normal((1, 1, lm.cfg.transformer.d_model))
    text = mx.random.randint(0, lm.cfg.text_out_vocab_size, (1, 1))
    return main, text


def moshi_frame(lm, sampler: Sampler, main: mx.array, text: mx.array) -> np.ndarray:
    tokens = DepFormer.sample(lm.depformer, main, sampler, text, lm.depformer_cache)
    return np.array(tokens.astype(mx.int32))


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=on_cuda)])
def test_the_fused_tts_speaks_exactly_as_moshi_mlx_loop(voice_models: Path, kernels: bool) -> None:
    """Greedy, the audio is the same to the sample as with moshi-mlx's own depformer loop
    (uncompiled), and the fused frame is what produced it."""
    folder = voice_models / "tts"
    plain = load(folder, compile_depformer=False, fused_depformer="off")
    fused = load(folder, fused_depformer="kernels" if kernels else "mlx")
    a = np.concatenate(list(plain.speak(TEXT)))
    b = np.concatenate(list(fused.speak(TEXT)))
    assert fused._fused is not None
    assert isinstance(fused._fused.ops, MlxOps) != kernels
    assert len(b) > 10 * fused.frame_samples and np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=on_cuda)])
def test_a_fused_frame_emits_moshi_mlx_tokens(voice_models: Path, kernels: bool, dtype) -> None:
    """Frame by frame on inputs the tiny model never saw, in float32 and in bfloat16 (where
    every value the plain path rounds to the model's dtype is rounded alike)."""
    tts = load(voice_models / "tts", fused_depformer="off")
    lm = tts.lm
    lm.set_dtype(dtype)
    greedy = Sampler(temp=0.0)
    frame = fused_depformer(lm, greedy, 1.0, kernels=kernels)
    assert frame is not None
    for seed in range(8):
        main, text = frame_inputs(lm, seed)
        want = moshi_frame(lm, greedy, main, text)
        got = np.array(frame(main, text))
        assert got.shape == want.shape and np.array_equal(got, want), seed


@on_cuda
@pytest.mark.heavy  # builds TTS 1.6B's depformer
@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_the_kernels_sample_as_the_mlx_steps_at_the_published_shape(temperature: float) -> None:
    """TTS 1.6B's depformer at its published shape (random weights, bfloat16): the CUDA
    kernels and the MLX steps pick the same tokens, greedy and, given the same noise,
    nucleus-sampled."""
    from mlx_harmony.bench.kyutai import _random_lm, tts_config
    from mlx_harmony.voice.depformer_cuda import CudaOps
    from mlx_harmony.voice.moshi_internals import keep_codebooks

    lm = _random_lm(tts_config(), mx.bfloat16)
    keep_codebooks(lm, 8)
    sampling = Sampling(temperature, 0.95)
    shape = shape_of(lm)
    ref = FusedDepformer(lm, sampling, MlxOps(shape, sampling))
    cuda = FusedDepformer(lm, sampling, CudaOps(shape, sampling))
    for seed in range(4):
        main, text = frame_inputs(lm, seed)
        mx.random.seed(100 + seed)
        want = np.array(ref(main, text))
        mx.random.seed(100 + seed)
        got = np.array(cuda(main, text))
        assert np.array_equal(got, want), seed


@pytest.mark.skipif(CUDA, reason="here the kernels build")
def test_kernels_that_cannot_be_built_leave_the_compiled_frame_and_say_why(
    voice_models: Path,
) -> None:
    """Asked for where MLX has no CUDA back-end (as a GPU NVRTC cannot compile for would
    fail), the kernels fail once at their first use: the voice speaks as before, with the
    compiled MLX frame, and the status line says why."""
    folder = voice_models / "tts"
    plain = load(folder, compile_depformer=False, fused_depformer="off")
    tts = load(folder, fused_depformer="kernels")
    a = np.concatenate(list(plain.speak(TEXT)))
    b = np.concatenate(list(tts.speak(TEXT)))
    assert np.array_equal(a, b) and tts._fused is None
    line = tts.calibrate(False, 2, 1.0).describe()
    assert "depformer as compiled MLX operations (the fused CUDA kernels failed: " in line
    assert "No CUDA back-end" in line


def test_models_the_fused_frame_cannot_run_keep_the_compiled_loop(voice_models: Path) -> None:
    tts = load(voice_models / "tts", fused_depformer="off")
    lm = tts.lm
    assert FusedDepformer.cannot(lm, Sampler(temp=0.6), 1.0) is None
    assert "guidance" in FusedDepformer.cannot(lm, Sampler(temp=0.6), 2.0)
    assert "top-k" in FusedDepformer.cannot(lm, Sampler(temp=0.6, top_k=50), 1.0)
    nn.quantize(lm.depformer.slices[1].transformer.layers[0].self_attn, group_size=32, bits=8)
    assert "quantized" in FusedDepformer.cannot(lm, Sampler(temp=0.6), 1.0)
    assert fused_depformer(lm, Sampler(temp=0.6), 1.0, kernels=False) is None


def test_sampling_follows_moshi_mlx_sampler() -> None:
    assert sampling_of(Sampler(temp=0.6)) == Sampling(0.6, 0.95)
    assert sampling_of(Sampler(temp=0.6, top_p=1.0)) == Sampling(0.6, 1.0)
    assert sampling_of(Sampler(temp=0.0, top_k=50)) == Sampling(0.0, 0.95)  # greedy anyway
    assert sampling_of(Sampler(temp=0.6, min_p=0.1)) is None
    assert sampling_of(Sampler(temp=0.6, logit_bias={3: 1.0})) is None


def test_the_nucleus_keeps_the_tokens_moshi_mlx_top_p_can_draw() -> None:
    """Probabilities .5, .3, .15, .04, .01: at top_p .95 the two least likely (.05 together,
    not more than 1 - .95) are out, so even overwhelming noise cannot pick them; within
    the nucleus, the noise decides."""
    logits = mx.log(mx.array([0.04, 0.5, 0.01, 0.3, 0.15]))
    sampling = Sampling(1.0, 0.95)
    for out in (0, 2):
        noise = mx.zeros(5).at[out].add(100.0)
        assert nucleus(logits, noise, sampling).item() == 1
    for inside in (1, 3, 4):
        noise = mx.zeros(5).at[inside].add(100.0)
        assert nucleus(logits, noise, sampling).item() == inside
    # Without a nucleus cut any token can be drawn; greedy is the argmax.
    noise = mx.zeros(5).at[2].add(100.0)
    assert nucleus(logits, noise, Sampling(1.0, 1.0)).item() == 2
    assert nucleus(logits, None, Sampling(0.0, 0.95)).item() == 1
