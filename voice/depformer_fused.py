"""The depformer's frame in a few large steps per codebook instead of ~75 small ones.

A TTS 1.6B frame runs the depformer once per codebook, each pass four transformer layers
on one position: at 32 codebooks that is 2,378 kernels even compiled (`bench.graph_ops`),
and on a GPU each costs its launch, not its arithmetic (a pass reads 80 MB of weights, a
fraction of a millisecond at the H200's bandwidth). `mx.compile` cannot fuse across the
matrix products, so the frame is restructured here into steps that each end where the
next needs every element of the previous one's output:

- once per frame: every slice's `linear_in` of the backbone's output in one batched
  product (it does not depend on the codebooks sampled), the first slice's input, and
  the sampling noise of every codebook;
- per codebook and layer: (embedding +) norm + q/k/v; attention over the slices so far
  + output projection + residual (the KV cache carried as a value); norm + gated MLP in;
  MLP out + residual;
- per codebook: the logits, then the sample.

Each step is one method of a `DepformerOps`. `MlxOps` writes them with MLX operations
(any device: it is what the CPU tests check against moshi-mlx's own loop), and
`voice.depformer_cuda.CudaOps` as one custom CUDA kernel each: 18 kernels a codebook.
Greedy, both emit moshi-mlx's tokens (tested: `MlxOps` on the CPU in the suite, `CudaOps`
on a GPU by `tests/test_voice_depformer_fused.py` where one is present). A slice's audio
embedding is folded with its low-rank projection into one table at load (the same
product moshi-mlx computes per step), ~4 MB a codebook in bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
from moshi_mlx import models
from moshi_mlx.utils.sampling import Sampler

from mlx_harmony.voice.moshi_internals import require

MAX_SLICES = 32  # the attention kernel gives each of a head's positions one lane of a warp


@dataclass(frozen=True)
class Layer:
    norm1: mx.array
    in_proj: mx.array  # (3·dim, dim): q, k, v, each heads by head_dim
    out_proj: mx.array
    norm2: mx.array
    mlp_in: mx.array  # (2·hidden, dim): gate, then value
    mlp_out: mx.array


@dataclass(frozen=True)
class Shape:
    dim: int
    heads: int
    hidden: int
    vocab: int
    slices: int
    eps: float


@dataclass(frozen=True)
class Sampling:
    """moshi-mlx's `Sampler` as the fused frame applies it: greedy at temperature 0, else
    nucleus (top-p) sampling drawn with Gumbel noise made for the whole frame at once."""

    temperature: float
    top_p: float  # 1.0: no nucleus cut


class DepformerOps(Protocol):
    """The frame's steps on 1-D vectors in the activations' dtype (see the module docstring)."""

    name: str  # for the status line

    def qkv(self, x: mx.array, norm: mx.array, w: mx.array) -> mx.array: ...

    def embed_qkv(
        self, pre: mx.array, table: mx.array, token: mx.array, norm: mx.array, w: mx.array
    ) -> tuple[mx.array, mx.array]: ...

    def attend(
        self, x: mx.array, qkv: mx.array, cache: mx.array, position: int, w: mx.array
    ) -> tuple[mx.array, mx.array]: ...

    def mlp_in(self, x: mx.array, norm: mx.array, w: mx.array) -> mx.array: ...

    def mlp_out(self, x: mx.array, h: mx.array, w: mx.array) -> mx.array: ...

    def logits(self, x: mx.array, w: mx.array) -> mx.array: ...

    def sample(self, logits: mx.array, noise: mx.array | None) -> mx.array: ...


def _rms_norm(x: mx.array, w: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, w, eps)


def nucleus(logits: mx.array, noise: mx.array | None, sampling: Sampling) -> mx.array:
    """One token from 1-D logits: argmax at temperature 0; else the tokens outside the
    nucleus (the least likely, together at most 1 - top_p of the probability, as
    moshi-mlx's `top_p_sampling` drops them) are excluded and the Gumbel-max trick picks
    among the rest: argmax(logits / T + noise) is a draw from softmax(logits / T)."""
    if sampling.temperature == 0:
        return mx.argmax(logits).astype(mx.int32).reshape(1)
    assert noise is not None
    z = logits.astype(mx.float32) / sampling.temperature
    keep = mx.ones(z.shape, dtype=mx.bool_)
    if 0 < sampling.top_p < 1:
        p = mx.softmax(z)
        ordered = mx.sort(p)
        first = mx.argmax(mx.cumsum(ordered) > 1 - sampling.top_p)
        keep = p >= ordered[first]
    score = mx.where(keep, z + noise, -mx.inf)
    return mx.argmax(score).astype(mx.int32).reshape(1)


class MlxOps:
    """The steps as MLX operations: any device, and the reference `CudaOps` is held to."""

    name = "fused MLX operations"

    def __init__(self, shape: Shape, sampling: Sampling) -> None:
        self.shape, self.sampling = shape, sampling

    def qkv(self, x: mx.array, norm: mx.array, w: mx.array) -> mx.array:
        return _rms_norm(x, norm, self.shape.eps) @ w.T

    def embed_qkv(
        self, pre: mx.array, table: mx.array, token: mx.array, norm: mx.array, w: mx.array
    ) -> tuple[mx.array, mx.array]:
        x = pre + table[token].reshape(-1)
        return x, self.qkv(x, norm, w)

    def attend(
        self, x: mx.array, qkv: mx.array, cache: mx.array, position: int, w: mx.array
    ) -> tuple[mx.array, mx.array]:
        s = self.shape
        head_dim = s.dim // s.heads
        q, kv = qkv[: s.dim], qkv[s.dim :].reshape(2, 1, s.dim)
        cache = mx.concatenate([cache[:, :position], kv, cache[:, position + 1 :]], axis=1)

        def heads(a: mx.array) -> mx.array:  # (positions, dim) → (1, heads, positions, hd)
            return a.reshape(-1, s.heads, head_dim).transpose(1, 0, 2)[None]

        k, v = heads(cache[0, : position + 1]), heads(cache[1, : position + 1])
        o = mx.fast.scaled_dot_product_attention(heads(q), k, v, scale=head_dim**-0.5)
        return x + o.reshape(-1) @ w.T, cache

    def mlp_in(self, x: mx.array, norm: mx.array, w: mx.array) -> mx.array:
        gate, value = (_rms_norm(x, norm, self.shape.eps) @ w.T).reshape(2, -1)
        return nn.silu(gate) * value

    def mlp_out(self, x: mx.array, h: mx.array, w: mx.array) -> mx.array:
        return x + h @ w.T

    def logits(self, x: mx.array, w: mx.array) -> mx.array:
        return x @ w.T

    def sample(self, logits: mx.array, noise: mx.array | None) -> mx.array:
        return nucleus(logits, noise, self.sampling)


def sampling_of(sampler: Sampler) -> Sampling | None:
    """The fused frame's sampling for moshi-mlx's sampler, or None where it samples in a
    way the frame does not (top-k, min-p, a logit bias)."""
    require(sampler, "temp", "top_p", "top_k", "min_p", "logit_bias")
    if sampler.logit_bias or (sampler.temp > 0 and (sampler.top_k or sampler.min_p)):
        return None
    top_p = sampler.top_p if 0 < sampler.top_p < 1 else 1.0
    return Sampling(float(sampler.temp), float(top_p))


class FusedDepformer:
    """The depformer's weights laid out for the fused frame; calling it runs a frame.

    `cannot(lm, sampler, cfg_coef)` says why a model cannot use it (quantized weights,
    classifier-free guidance in the batch, a sampler the frame does not reproduce)."""

    def __init__(self, lm: models.Lm, sampling: Sampling, ops: DepformerOps) -> None:
        slices = lm.depformer.slices
        self.shape = shape_of(lm)
        self.sampling, self.ops = sampling, ops
        self.first = slices[0]
        # One (slices, dim, main dim) array; each slice's `linear_in` becomes a view of it,
        # so moshi-mlx's own loop (still used at a session's start) reads the same memory.
        self.linear_in = mx.stack([s.linear_in.weight for s in slices])
        mx.eval(self.linear_in)
        for i, s in enumerate(slices):
            s.linear_in.weight = self.linear_in[i]
        self.tables: list[mx.array | None] = [None]
        for s in slices[1:]:
            emb = s.emb
            require(emb, "weight", "low_rank")
            table = emb.weight if emb.low_rank is None else emb.low_rank(emb.weight)
            self.tables.append(table)
        self.layers = [[_layer(layer) for layer in s.transformer.layers] for s in slices]
        self.out = [s.linear_out.weight for s in slices]
        mx.eval(self.tables[1:], [s.linear_in.weight for s in slices])

    @staticmethod
    def cannot(lm: models.Lm, sampler: Sampler, cfg_coef: float) -> str | None:
        require(lm, "depformer")
        slices = lm.depformer.slices
        if cfg_coef != 1:
            return "classifier-free guidance in the batch (cfg_coef != 1)"
        if len(slices) > MAX_SLICES:
            return f"more than {MAX_SLICES} codebooks"
        if sampling_of(sampler) is None:
            return "a sampler with top-k, min-p or a logit bias"
        for s in slices:
            linears = [s.linear_in, s.linear_out, *_linears(s)]
            if any(not isinstance(m, nn.Linear) or "bias" in m for m in linears):
                return "quantized weights or biases"
            if s.transformer.cfg.positional_embedding != "none" or s.transformer.cfg.layer_scale:
                return "positional embeddings or layer scales in the depformer"
            if not all(isinstance(layer.norm1, nn.RMSNorm) for layer in s.transformer.layers):
                return "a norm other than RMSNorm"
            if any(layer.cross_attention is not None for layer in s.transformer.layers):
                return "cross-attention in the depformer"
        return None

    def check(self) -> None:
        """Run one frame on zeros (building every kernel): raises where they cannot run."""
        main = mx.zeros((1, 1, self.linear_in.shape[-1]))
        mx.eval(self(main, mx.zeros((1, 1), dtype=mx.int32)))

    def __call__(self, main_out: mx.array, text_token: mx.array) -> mx.array:
        """The frame's tokens, (1, slices, 1) as moshi-mlx's `DepFormer.sample` returns."""
        s = self.shape
        ops = self.ops
        # Rows are sliced, not indexed: MLX gathers for an integer index (a kernel each).
        pre = mx.split(mx.matmul(self.linear_in, main_out.reshape(-1)), s.slices)
        x0 = (pre[0].reshape(-1) + self.first.emb(text_token).reshape(-1)).astype(pre[0].dtype)
        noise: list[mx.array] | None = None
        if self.sampling.temperature > 0:
            noise = mx.split(mx.random.gumbel((s.slices, s.vocab)), s.slices)
        # Keys and values in the activations' dtype, as moshi-mlx's cache keeps them.
        empty = mx.zeros((2, s.slices, s.dim), dtype=x0.dtype)
        caches = [empty] * len(self.layers[0])
        tokens: list[mx.array] = []
        for i in range(s.slices):
            layers = self.layers[i]
            if i == 0:
                x, qkv = x0, ops.qkv(x0, layers[0].norm1, layers[0].in_proj)
            else:
                table = self.tables[i]
                assert table is not None
                first = layers[0]
                row = pre[i].reshape(-1)
                x, qkv = ops.embed_qkv(row, table, tokens[-1], first.norm1, first.in_proj)
            for j, layer in enumerate(layers):
                if j > 0:
                    qkv = ops.qkv(x, layer.norm1, layer.in_proj)
                x, caches[j] = ops.attend(x, qkv, caches[j], i, layer.out_proj)
                x = ops.mlp_out(x, ops.mlp_in(x, layer.norm2, layer.mlp_in), layer.mlp_out)
            logits = ops.logits(x, self.out[i])
            tokens.append(ops.sample(logits, None if noise is None else noise[i].reshape(-1)))
        return mx.stack(tokens).reshape(1, s.slices, 1)


def _linears(s) -> list:
    return [
        m
        for layer in s.transformer.layers
        for m in (layer.self_attn.in_proj, layer.self_attn.out_proj,
                  layer.gating.linear_in, layer.gating.linear_out)
    ]  # fmt: skip


def _layer(layer) -> Layer:
    return Layer(
        layer.norm1.weight, layer.self_attn.in_proj.weight, layer.self_attn.out_proj.weight,
        layer.norm2.weight, layer.gating.linear_in.weight, layer.gating.linear_out.weight,
    )  # fmt: skip


def shape_of(lm: models.Lm) -> Shape:
    first = lm.depformer.slices[0]
    cfg = first.transformer.cfg
    layer = first.transformer.layers[0]
    return Shape(
        dim=cfg.d_model,
        heads=cfg.num_heads,
        hidden=layer.gating.linear_out.weight.shape[1],
        vocab=first.linear_out.weight.shape[0],
        slices=len(lm.depformer.slices),
        eps=float(layer.norm1.eps),
    )


def fused_depformer(
    lm: models.Lm, sampler: Sampler, cfg_coef: float, kernels: bool
) -> FusedDepformer | None:
    """The fused frame for this model, or None where it cannot use one (`cannot`).
    `kernels`: its steps as CUDA kernels (MLX on an NVIDIA GPU), else MLX operations."""
    if FusedDepformer.cannot(lm, sampler, cfg_coef):
        return None
    sampling = sampling_of(sampler)
    assert sampling is not None
    shape = shape_of(lm)
    if kernels:
        from mlx_harmony.voice.depformer_cuda import CudaOps

        return FusedDepformer(lm, sampling, CudaOps(shape, sampling))
    return FusedDepformer(lm, sampling, MlxOps(shape, sampling))


def compiled(frame: FusedDepformer) -> Callable[[mx.array, mx.array], mx.array]:
    """The frame as one compiled function (its Python runs once, to be traced)."""

    def run(main_out: mx.array, text_token: mx.array) -> mx.array:
        return frame(main_out, text_token)

    return mx.compile(run, inputs=mx.random.state, outputs=mx.random.state)
