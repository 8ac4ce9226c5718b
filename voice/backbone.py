"""A moshi-mlx transformer's one-frame step with a cache of fixed shape, so that the step
can be `mx.compile`d once and replayed every frame.

moshi-mlx's `RotatingKVCache` grows by one key per step (a new shape every frame, so a
compiled step would be traced again every frame) and keeps the position as a Python int.
Here each layer's keys and values live in a ring of `window` slots (the attention context
plus the current frame, the keys moshi-mlx's attention reads), the position is an array,
and the slots not written yet are masked out. The layers' own modules (projections,
norms, RoPE, gating, cross-attention) do the work; only the cache and the attention call
around it are this module's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import mlx.core as mx
from moshi_mlx import models
from moshi_mlx.modules.conditioner import ConditionTensor
from moshi_mlx.modules.transformer import LayerCache, Transformer


@dataclass
class WindowCache:
    """The keys and values of every layer (batch, heads, window, head_dim), the next
    frame's position, and each cross-attention layer's keys and values (computed once:
    the source, e.g. a voice, is fixed)."""

    keys: list[mx.array]
    values: list[mx.array]
    cross: list[tuple[mx.array, mx.array] | None]
    window: int
    offset: int = 0
    _zero: list[mx.array] = field(default_factory=list, repr=False)

    @classmethod
    def build(
        cls,
        transformer: Transformer,
        batch: int,
        dtype: mx.Dtype,
        cross_attention_src: mx.array | None = None,
    ) -> WindowCache:
        cfg = transformer.cfg
        if cfg.kv_repeat != 1:  # as moshi-mlx's own attention
            raise ValueError("only kv_repeat == 1 is supported")
        # moshi-mlx attends to the last `context` keys and the current one, within a cache
        # of `max_seq_len`.
        window = min(cfg.context + 1, cfg.max_seq_len)
        shape = (batch, cfg.num_heads, window, cfg.head_dim)
        zero = mx.zeros(shape, dtype=dtype)
        cross: list[tuple[mx.array, mx.array] | None] = []
        for layer in transformer.layers:
            if layer.cross_attention is None or cross_attention_src is None:
                cross.append(None)
                continue
            # The layer's own code computes (and caches) the source's keys and values.
            holder = LayerCache(self_attn=None)  # type: ignore[arg-type]
            query = mx.zeros((cross_attention_src.shape[0], 1, cfg.d_model), dtype=dtype)
            layer.cross_attention(query, cross_attention_src, holder)
            cross.append(holder.cross_attn)
        mx.eval(zero, [kv for kv in cross if kv is not None])
        n = len(transformer.layers)
        return cls([zero] * n, [zero] * n, cross, window, 0, [zero] * n)

    def reset(self) -> None:
        # Slots at or past the position are masked, so old keys need no clearing.
        self.keys, self.values, self.offset = list(self._zero), list(self._zero), 0


def window_step(
    transformer: Transformer,
    xs: mx.array,
    offset: mx.array,
    keys: list[mx.array],
    values: list[mx.array],
    cross: list[tuple[mx.array, mx.array] | None],
) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """One frame (xs: batch, 1, d_model) through every layer at position `offset`: the
    output and the layers' new keys and values. Pure, so it compiles as a whole."""
    window = keys[0].shape[2]
    slot = (offset % window).reshape(1)
    # Before the ring is full, the slots past the position hold no key yet.
    mask = mx.arange(window) <= offset
    new_keys, new_values = [], []
    for layer, k_cache, v_cache, cross_kv in zip(
        transformer.layers, keys, values, cross, strict=True
    ):
        attn = layer.self_attn
        cfg = attn.cfg
        b, t, d = xs.shape
        h = layer.norm1(xs)
        qkv = attn.in_proj(h).reshape(b, t, 3, cfg.num_heads, cfg.head_dim)
        q = qkv[:, :, 0].transpose(0, 2, 1, 3)
        k = qkv[:, :, 1].transpose(0, 2, 1, 3)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)
        if attn.rope is not None:
            q = attn.rope(q, offset=offset)
            k = attn.rope(k, offset=offset)
        k_cache = mx.slice_update(k_cache, k, slot, axes=(2,))
        v_cache = mx.slice_update(v_cache, v, slot, axes=(2,))
        new_keys.append(k_cache)
        new_values.append(v_cache)
        h = mx.fast.scaled_dot_product_attention(q, k_cache, v_cache, scale=attn.scale, mask=mask)
        h = attn.out_proj(h.transpose(0, 2, 1, 3).reshape(b, t, d))
        xs = xs + layer.layer_scale_1(h)
        if layer.cross_attention is not None:
            # The cross-attention reads the source's keys and values from the cache given.
            held = SimpleNamespace(cross_attn=cross_kv)
            xs = xs + layer.cross_attention(layer.norm_cross(xs), None, held)
        xs = xs + layer.layer_scale_2(layer.gating(layer.norm2(xs)))
    return xs, new_keys, new_values


def frame_input(
    lm: models.Lm,
    text_token_ids: mx.array,
    audio_token_ids: list[mx.array],
    ct: ConditionTensor | None,
    cfg_coef: float,
) -> mx.array:
    """A frame's input to the backbone, as `Lm._sample` builds it."""
    xs = lm.text_emb(text_token_ids)
    for token_ids, emb in zip(audio_token_ids, lm.audio_embs, strict=False):
        xs = xs + emb(token_ids).transpose(1, 0, 2)
    if ct is not None:
        xs = xs + mx.expand_dims(ct.tensor, axis=1)
    return mx.tile(xs, (2, 1, 1)) if cfg_coef != 1 else xs


def frame_text_logits(lm: models.Lm, out: mx.array, cfg_coef: float) -> mx.array:
    text_logits = lm.text_linear(out)
    if cfg_coef == 1:
        return text_logits
    l1, l2 = text_logits.split(2, axis=0)
    return cfg_coef * l1 - (cfg_coef - 1) * l2


class CompiledBackbone:
    """The backbone half of a frame (inputs embedded, the transformer, the text logits) as
    one `mx.compile`d function over a fixed-shape cache (`voice.backbone`). moshi-mlx's
    step issues a few hundred small operations per frame, and on a GPU their launch cost,
    not the arithmetic, bounds the 16 text-only steps before the first audio; compiled,
    they are traced once and fused. The condition and cross-attention source are the
    synthesizer's (fixed per voice), so built once per synthesizer."""

    def __init__(
        self,
        lm: models.Lm,
        ct: ConditionTensor | None,
        cross_attention_src: mx.array | None,
        cfg_coef: float,
    ) -> None:
        def frame(
            text_ids: mx.array,
            audio_ids: list[mx.array],
            offset: mx.array,
            keys: list[mx.array],
            values: list[mx.array],
        ) -> tuple[mx.array, mx.array, list[mx.array], list[mx.array]]:
            xs = frame_input(lm, text_ids, audio_ids, ct, cfg_coef)
            out, keys, values = window_step(
                lm.transformer, xs, offset, keys, values, self.cache.cross
            )
            out = lm.out_norm(out)
            return frame_text_logits(lm, out, cfg_coef), out, keys, values

        # The cache holds what the first layer's projection makes of an embedded frame.
        sample = frame_input(
            lm,
            mx.zeros((1, 1), dtype=mx.int32),
            [mx.zeros((1, 1), dtype=mx.int32)] * lm.cfg.other_codebooks,
            ct,
            cfg_coef,
        )
        first = lm.transformer.layers[0]
        dtype = first.self_attn.in_proj(first.norm1(sample)).dtype
        self.cache = WindowCache.build(lm.transformer, sample.shape[0], dtype, cross_attention_src)
        self._frame = mx.compile(frame)

    def reset(self) -> None:
        self.cache.reset()

    def __call__(
        self, text_token_ids: mx.array, audio_token_ids: list[mx.array]
    ) -> tuple[mx.array, mx.array]:
        """The text logits and the backbone's (normed) output of the next frame."""
        c = self.cache
        offset = mx.array(c.offset, dtype=mx.int32)
        logits, out, c.keys, c.values = self._frame(
            text_token_ids, audio_token_ids, offset, c.keys, c.values
        )
        c.offset += 1
        return logits, out


class CompiledTextLm:
    """A model without a depformer (Kyutai's STT) as `LmGen` drives it, its frame run by
    `CompiledBackbone`: `LmGen` calls `_sample` and reads `cfg` and `extra_heads`, as it
    does of moshi-mlx's `Lm`. Greedy, the same tokens as the plain model (tested)."""

    def __init__(self, lm: models.Lm) -> None:
        if lm.dep_q:
            raise ValueError("a model with a depformer generates audio: see voice.tts")
        self.cfg, self.extra_heads = lm.cfg, lm.extra_heads
        self.backbone = CompiledBackbone(lm, None, None, 1.0)

    def reset(self) -> None:
        self.backbone.reset()

    def _sample(
        self,
        text_token_ids: mx.array,
        audio_token_ids: list[mx.array],
        text_sampler: Callable[[mx.array], tuple[mx.array, mx.array]],
        audio_sampler: object,
        ct: ConditionTensor | None = None,
        cross_attention_src: mx.array | None = None,
        cfg_coef: float = 1.0,
        on_text_hook: Callable[[mx.array], None] | None = None,
        on_audio_hook: Callable[[mx.array], None] | None = None,
    ) -> tuple[mx.array, None, mx.array]:
        logits, out = self.backbone(text_token_ids, audio_token_ids)
        token, _ = text_sampler(logits)
        if on_text_hook is not None:
            on_text_hook(token)
        return token, None, out
