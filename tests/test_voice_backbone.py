"""The fixed-shape transformer step against moshi-mlx's own, past the attention window."""

import mlx.core as mx
import numpy as np
from moshi_mlx.modules.transformer import Transformer, TransformerConfig

from voice.backbone import WindowCache, window_step


def _transformer(context: int, cross: bool) -> Transformer:
    cfg = TransformerConfig(
        d_model=32, num_heads=2, num_layers=2, causal=True, norm_first=True, bias_ff=False,
        bias_attn=False, layer_scale=None, positional_embedding="rope", use_conv_block=False,
        cross_attention=cross, conv_kernel_size=3, use_conv_bias=True, gating=True,
        norm="rms_norm", context=context, max_period=10000, max_seq_len=8192, kv_repeat=1,
        dim_feedforward=64, conv_layout=False,
    )  # fmt: skip
    mx.random.seed(3)
    model = Transformer(cfg)
    mx.eval(model.parameters())
    return model


def _compare(context: int, steps: int, cross: bool) -> None:
    model = _transformer(context, cross)
    src = mx.random.normal((1, 5, 32)) if cross else None
    cache = model.make_rot_cache()
    ring = WindowCache.build(model, 1, mx.float32, src)
    for i in range(steps):
        xs = mx.random.normal((1, 1, 32))
        want = model(xs, cache=cache, cross_attention_src=src)
        got, ring.keys, ring.values = window_step(
            model, xs, mx.array(ring.offset), ring.keys, ring.values, ring.cross
        )
        ring.offset += 1
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, err_msg=f"step {i}")


def test_the_ring_attends_to_what_moshi_attends_to_before_and_after_it_wraps() -> None:
    _compare(context=4, steps=14, cross=False)


def test_the_ring_with_cross_attention_matches() -> None:
    _compare(context=6, steps=9, cross=True)
