"""Kyutai Pocket TTS at its published shape with random weights, for the benchmarks.

The shape is Kyutai's English config (`pocket_tts/config/english.yaml`: a 6-layer, 1024-wide
flow transformer, a 6-block flow MLP, Mimi's 512-wide decoder); the folder is written in
mlx-audio's layout and loaded through the product's loader (`voice.pocket_tts`). One
difference: the text table has the size of a tokenizer trained here (Kyutai's has 4,000
entries), which costs nothing per frame (a lookup).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_harmony.voice.pocket_tts import PocketSynthesizer

TEXT = "The capital of France is Paris. It is also the largest city in the country."


def published_config(n_bins: int) -> dict:
    return {
        "model_type": "pocket_tts",
        "weights_name": "model.safetensors",
        "flow_lm": {
            "dtype": "float32",
            "flow": {"depth": 6, "dim": 512},
            "transformer": {
                "d_model": 1024, "hidden_scale": 4, "max_period": 10000, "num_heads": 16,
                "num_layers": 6,
            },
            "lookup_table": {
                "dim": 1024, "n_bins": n_bins, "tokenizer": "sentencepiece",
                "tokenizer_path": "tokenizer.model",
            },
        },
        "mimi": {
            "dtype": "float32", "sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
            "seanet": {
                "dimension": 512, "channels": 1, "n_filters": 64, "n_residual_layers": 1,
                "ratios": [6, 5, 4], "kernel_size": 7, "residual_kernel_size": 3,
                "last_kernel_size": 3, "dilation_base": 2, "pad_mode": "constant",
                "compress": 2,
            },
            "transformer": {
                "d_model": 512, "num_heads": 8, "num_layers": 2, "layer_scale": 0.01,
                "context": 250, "dim_feedforward": 2048, "input_dimension": 512,
                "output_dimensions": [512],
            },
            "quantizer": {"dimension": 32, "output_dimension": 512},
        },
    }  # fmt: skip


def write_random_pocket(folder: Path, dtype: mx.Dtype = mx.float32) -> Path:
    """A Pocket TTS folder at the published shape with random weights and one voice
    (`embeddings/random.safetensors`, 125 frames as Kyutai's catalog voices)."""
    import sentencepiece as spm
    from mlx_audio.tts.models.pocket_tts.pocket_tts import Model, ModelConfig

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([TEXT] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=60,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    n_bins = spm.SentencePieceProcessor(str(folder / "tokenizer.model")).vocab_size()  # type: ignore[call-arg]
    raw = published_config(n_bins)
    model = Model(ModelConfig.from_dict({**raw, "model_path": str(folder)}))
    params = {
        k: (mx.random.normal(v.shape) * 0.02).astype(dtype) if v.ndim > 1 else v.astype(dtype)
        for k, v in tree_flatten(model.parameters())
    }
    # Random weights end speech at once: an end-of-speech head that never fires lets each
    # sentence run to its length limit, so that every timed frame is a real one.
    params["flow_lm.out_eos.bias"] = mx.full(params["flow_lm.out_eos.bias"].shape, -100.0)
    mx.save_safetensors(str(folder / "model.safetensors"), params)
    (folder / "config.json").write_text(json.dumps(raw, indent=1))
    (folder / "embeddings").mkdir(exist_ok=True)
    prompt = mx.random.normal((1, 125, 1024)) * 0.1
    mx.save_safetensors(str(folder / "embeddings" / "random.safetensors"), {"audio_prompt": prompt})
    return folder


def random_pocket(
    folder: Path, quantize: int | None = None, dtype: mx.Dtype = mx.float32
) -> PocketSynthesizer:
    write_random_pocket(folder, dtype)
    return PocketSynthesizer.load(str(folder), "random", folder / "cloned", quantize)
