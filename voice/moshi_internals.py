"""moshi-mlx's internals that mlx-harmony relies on, all in one place.

moshi-mlx has no public way to step its TTS with a leaner depformer (`Lm._sample` always
runs every codebook), to generate fewer codebooks than a checkpoint has (it stores
`TTSModel(n_q=…)` but never applies it), or to snapshot an STT stream. What is done
instead reaches into its private names; all of it lives here, checked against the
installed moshi-mlx when this module is imported, so that a version that moved them fails
at start with one line naming what is missing, never mid-answer. `pyproject.toml` pins the
range tested (`TESTED`).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version
from types import SimpleNamespace

import mlx.core as mx
from moshi_mlx import models
from moshi_mlx.models.lm import DepFormer, LmConfig
from moshi_mlx.models.mimi import Mimi
from moshi_mlx.modules.conditioner import ConditionTensor
from moshi_mlx.modules.transformer import TransformerLayer
from moshi_mlx.utils.sampling import Sampler

from mlx_harmony.llm.errors import ConfigError

TESTED = "0.3"  # moshi-mlx 0.3.x

# Class attributes used below; an instance's are checked where it is first used (`require`).
_NEEDED = (
    (models.Lm, ("_sample", "dep_q")),
    (DepFormer, ("sample",)),
    (models.LmGen, ("step", "step_with_extra_heads", "last_audio_tokens")),
    (LmConfig, ("from_config_dict",)),
    (TransformerLayer, ("_cross_attention_block",)),
)


def _missing(owner: str, name: str) -> ImportError:
    return ImportError(
        f"moshi-mlx {version('moshi-mlx')}: {owner}.{name} is gone; mlx-harmony uses it and "
        f"is tested with moshi-mlx {TESTED}.x"
    )


def check_moshi() -> None:
    """Raise ImportError naming the first internal this module needs and cannot find."""
    for owner, names in _NEEDED:
        for name in names:
            if not hasattr(owner, name):
                raise _missing(owner.__name__, name)


def require(obj: object, *names: str) -> None:
    """The same for the attributes an object of moshi-mlx's is expected to have."""
    for name in names:
        if not hasattr(obj, name):
            raise _missing(type(obj).__name__, name)


check_moshi()


def keep_codebooks(lm: models.Lm, codebooks: int) -> None:
    """Generate only the first `codebooks` audio codebooks (the coarsest; the rest are fed
    as "zero", and Mimi decodes the ones it gets): fewer depformer steps per frame, coarser
    audio. moshi-mlx stores `TTSModel(n_q=…)` but never applies it, and building the LM with
    fewer depformer slices would break its weight mapping (the per-step weight schedule
    splits shared tensors by the full slice count), so the loaded model is cut instead."""
    require(lm, "cfg", "depformer")
    require(lm.cfg.depformer, "num_slices", "weights_per_step_schedule")
    have = lm.cfg.depformer.num_slices
    if codebooks < 2:  # Mimi's decoder splits the first codebook from the others
        raise ConfigError(f"tts.codebooks: {codebooks} is below 2")
    if codebooks >= have:
        return  # at most what the model has
    lm.depformer.slices = lm.depformer.slices[:codebooks]
    lm.cfg.depformer.num_slices = codebooks
    schedule = lm.cfg.depformer.weights_per_step_schedule
    if schedule is not None:
        lm.cfg.depformer.weights_per_step_schedule = schedule[:codebooks]


# What moshi-mlx's streaming modules keep between steps besides KV caches: a convolution's
# last input and whether its left padding was applied, SEANet's unmatched residual halves.
# All are replaced (never written into) at each step, so keeping the references keeps them.
_MODULE_STATE = ("_prev_xs", "_left_pad_applied", "_lhs", "_rhs")


class StreamPosition:
    """Where a transcriber's streams stand (the LM's step and KV caches, Mimi's encoder
    convolutions and transformer cache), to go back there after steps that must leave no
    trace. moshi-mlx has no snapshot of its own; KV caches write each step's keys past
    their offset and read only up to it, so putting the offsets back is enough (the
    caches never wrap within an utterance's step budget). The peek test checks that what
    follows a restore is exactly what a stream that never peeked computes (greedy: at a
    temperature the flush's samples also moved the random state)."""

    def __init__(self, saved: list[tuple[object, str, object]]) -> None:
        self._saved = saved  # (owner, attribute, value)

    @classmethod
    def of(cls, gen: models.LmGen, lm: models.Lm, mimi: Mimi) -> StreamPosition:
        require(gen, "step_idx")
        require(lm, "transformer_cache")
        require(mimi, "encoder_cache", "encoder", "downsample")
        saved: list[tuple[object, str, object]] = [(gen, "step_idx", gen.step_idx)]
        caches = [c.self_attn for c in (*lm.transformer_cache, *mimi.encoder_cache)]
        for cache in caches:
            saved += [
                (cache, k, getattr(cache, k)) for k in ("offset", "_idx") if hasattr(cache, k)
            ]
        modules = [*mimi.encoder.modules(), *mimi.downsample.modules()]
        for module in modules:
            saved += [(module, k, getattr(module, k)) for k in _MODULE_STATE if hasattr(module, k)]
        return cls(saved)

    def restore(self) -> None:
        for owner, name, value in self._saved:
            setattr(owner, name, value)


class SteppedLm:
    """The LM as `LmGen` steps it, leaner in two ways moshi-mlx has no switch for:

    - the depformer runs only as far as its tokens are kept: not at all in the text-only
      delay at the start of a session (16 of the first ≈19 steps of Kyutai's TTS), as
      Kyutai's own server does, and only its first codebook's pass on the steps after it
      until the other codebooks' acoustic delay has elapsed (2 steps);
    - the depformer's frame runs as one compiled function when given one (see
      `compiled_depformer`).

    The backbone half of `Lm._sample` is repeated here for that. Greedy, the tokens are the
    same as moshi-mlx's own `_sample` (tested)."""

    def __init__(
        self,
        lm: models.Lm,
        slices_needed: Callable[[], int],
        zero: int,
        depformer: Callable[[mx.array, mx.array], mx.array] | None,
    ) -> None:
        require(
            lm, "cfg", "text_emb", "audio_embs", "transformer", "transformer_cache", "out_norm",
            "text_linear", "depformer", "depformer_cache",
        )  # fmt: skip
        require(lm.depformer, "slices")
        self.lm, self.slices_needed, self.zero, self.cfg = lm, slices_needed, zero, lm.cfg
        self.depformer = depformer

    def _sample(
        self,
        text_token_ids: mx.array,
        audio_token_ids: list[mx.array],
        text_sampler: Sampler,
        audio_sampler: Sampler,
        ct: ConditionTensor | None = None,
        cross_attention_src: mx.array | None = None,
        cfg_coef: float = 1.0,
        on_text_hook: Callable[[mx.array], None] | None = None,
        on_audio_hook: Callable[[mx.array], None] | None = None,
    ) -> tuple[mx.array, mx.array | None, mx.array]:
        lm = self.lm
        needed = self.slices_needed()
        if needed == lm.dep_q and self.depformer is None:
            return lm._sample(
                text_token_ids, audio_token_ids, text_sampler, audio_sampler, ct,
                cross_attention_src, cfg_coef, on_text_hook, on_audio_hook,
            )  # fmt: skip
        xs = lm.text_emb(text_token_ids)
        for token_ids, emb in zip(audio_token_ids, lm.audio_embs, strict=False):
            xs = xs + emb(token_ids).transpose(1, 0, 2)
        if ct is not None:
            xs = xs + mx.expand_dims(ct.tensor, axis=1)
        if cfg_coef != 1:
            xs = mx.tile(xs, (2, 1, 1))
        out = lm.transformer(
            xs, cache=lm.transformer_cache, cross_attention_src=cross_attention_src
        )
        out = lm.out_norm(out)
        text_logits = lm.text_linear(out)
        if cfg_coef != 1:
            l1, l2 = text_logits.split(2, axis=0)
            text_logits = cfg_coef * l1 - (cfg_coef - 1) * l2
        text_token, _ = text_sampler(text_logits)
        if on_text_hook is not None:
            on_text_hook(text_token)
        if needed == lm.dep_q:
            assert self.depformer is not None
            audio = self.depformer(out, text_token)
        else:
            batch = text_token.shape[0]
            audio = mx.full((batch, lm.dep_q - needed, 1), self.zero, dtype=mx.int32)
            if needed:
                # moshi-mlx's own loop, over the first slices only (it reads nothing else
                # of the depformer); twice a session, so not worth compiling.
                first = SimpleNamespace(slices=lm.depformer.slices[:needed])
                kept = DepFormer.sample(
                    first,  # type: ignore[arg-type]
                    out,
                    audio_sampler,
                    text_token,
                    lm.depformer_cache,
                    cfg_coef,
                )
                audio = mx.concatenate([kept.astype(mx.int32), audio], axis=1)
        if on_audio_hook is not None:
            on_audio_hook(audio)
        return text_token, audio, out


def compiled_depformer(
    lm: models.Lm, sampler: Sampler, cfg_coef: float
) -> Callable[[mx.array, mx.array], mx.array]:
    """The depformer's frame (one pass per codebook, each a few transformer layers) as one
    `mx.compile`d function. Its cache is reset at every frame, so the pass is a pure
    function of the backbone's output, the text token and the random state; compiled, the
    per-operation cost that bounds a frame on a GPU is paid once per fused kernel. Built
    once per model: a new function would be traced again."""

    def frame(main_out: mx.array, text_token: mx.array) -> mx.array:
        return lm.depformer.sample(
            main_out, sampler, text_token, lm.depformer_cache, cfg_coef=cfg_coef
        )

    return mx.compile(frame, inputs=mx.random.state, outputs=mx.random.state)


def backbone_text_logits(
    lm: models.Lm,
    text_ids: mx.array,
    audio_ids: list[mx.array],
    ct: ConditionTensor | None,
    cross_attention_src: mx.array | None,
    cfg_coef: float,
) -> mx.array:
    """The backbone over several steps at once, causally, appended to its KV caches: the
    text logits of each (batch, steps, vocabulary). `text_ids` and each of `audio_ids` are
    (batch, steps). moshi-mlx's `Transformer` steps one position at a time (its layers
    pass no mask, so several positions would see each other's future); the layer is
    repeated here with a causal mask, and its rotating KV caches, which only append
    several positions correctly to a buffer holding exactly the positions written, are
    trimmed to that first (`rewind_backbone` undoes steps that must not count)."""
    xs = lm.text_emb(text_ids)
    for token_ids, emb in zip(audio_ids, lm.audio_embs, strict=False):
        xs = xs + emb(token_ids)
    if ct is not None:
        xs = xs + mx.expand_dims(ct.tensor, axis=1)
    if cfg_coef != 1:
        xs = mx.tile(xs, (2, 1, 1))
    require(lm, "transformer", "out_norm", "text_linear")
    for layer in lm.transformer.layers:
        require(layer, "norm1", "self_attn", "layer_scale_1", "cross_attention")
        require(layer, "norm2", "gating", "layer_scale_2")
    start = backbone_offset(lm)
    rewind_backbone(lm, start)
    steps = xs.shape[1]
    mask = mx.arange(start + steps)[None, :] <= (start + mx.arange(steps))[:, None]
    for layer, cache in zip(lm.transformer.layers, lm.transformer_cache, strict=True):
        n1 = layer.self_attn(layer.norm1(xs), cache=cache.self_attn, mask=mask)
        xs = xs + layer.layer_scale_1(n1)
        if layer.cross_attention is not None:
            xs = layer._cross_attention_block(xs, cache, cross_attention_src)
        xs = xs + layer.layer_scale_2(layer.gating(layer.norm2(xs)))
    logits = lm.text_linear(lm.out_norm(xs))
    if cfg_coef != 1:
        l1, l2 = logits.split(2, axis=0)
        logits = cfg_coef * l1 - (cfg_coef - 1) * l2
    return logits


def backbone_offset(lm: models.Lm) -> int:
    """How many steps the backbone's KV caches hold."""
    require(lm, "transformer_cache")
    return lm.transformer_cache[0].self_attn.offset


def backbone_room(lm: models.Lm) -> int:
    """How many steps the backbone's KV caches can hold before they rotate or its
    attention drops the oldest (`backbone_text_logits` must stay below that)."""
    cache = lm.transformer_cache[0].self_attn
    require(cache, "max_size")
    return min(cache.max_size, lm.cfg.transformer.context)


def rewind_backbone(lm: models.Lm, steps: int) -> None:
    """Keep only the first `steps` positions of the backbone's KV caches (all of them
    written since the session's reset, none rotated out)."""
    for layer_cache in lm.transformer_cache:
        cache = layer_cache.self_attn
        require(cache, "keys", "values", "offset", "_idx")
        if cache.keys is None:
            continue
        cache.keys = cache.keys[..., :steps, :]
        cache.values = cache.values[..., :steps, :]
        cache.offset = cache._idx = steps
