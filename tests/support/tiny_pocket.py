"""A tiny Kyutai Pocket TTS folder in the layout mlx-audio publishes, with random weights.

`mlx-community/pocket-tts` is what mlx-audio's converter writes: `config.json` (Kyutai's
nested `flow_lm` / `mimi` config with `model_type` "pocket_tts" and `weights_name`), the
weights in MLX names (`model.safetensors`), the sentencepiece `tokenizer.model` and voice
embeddings (`embeddings/<name>.safetensors`, key `audio_prompt`). The shapes here are
small but keep the published rates (24 kHz, 12.5 frames a second, SEANet ratios 6·5·4
and a downsampling stride of 16), and the Mimi encoder is kept: voices are cloned with it.

The folder is read back through mlx-audio's own loader and compared with the weights it
came from, so a fixture that drifts from mlx-audio's format fails here, not in a test.
Built in its own process and cached by the hash of this file (tests/conftest.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from tests.support.tiny_voice import write_tokenizer

VOICE = "tiny-pocket"
PROMPT_FRAMES = 6  # a voice embedding's length in frames (published voices: about 125)


def config(n_bins: int) -> dict:
    """Kyutai's published Pocket TTS config, every dimension shrunk."""
    return {
        "model_type": "pocket_tts",
        "weights_name": "model.safetensors",
        "flow_lm": {
            "dtype": "float32",
            "flow": {"depth": 1, "dim": 32},
            "transformer": {
                "d_model": 32, "hidden_scale": 2, "max_period": 10000, "num_heads": 2,
                "num_layers": 2,
            },
            "lookup_table": {
                "dim": 32, "n_bins": n_bins, "tokenizer": "sentencepiece",
                # Published configs name the hub's file; the bundled one is read instead.
                "tokenizer_path": "hf://kyutai/pocket-tts-without-voice-cloning/tokenizer.model",
            },
        },
        "mimi": {
            "dtype": "float32", "sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
            "encoder_enabled": True,
            "seanet": {
                "dimension": 16, "channels": 1, "n_filters": 4, "n_residual_layers": 1,
                "ratios": [6, 5, 4], "kernel_size": 7, "residual_kernel_size": 3,
                "last_kernel_size": 3, "dilation_base": 2, "pad_mode": "constant",
                "compress": 2,
            },
            "transformer": {
                "d_model": 16, "num_heads": 2, "num_layers": 1, "layer_scale": 0.01,
                "context": 50, "dim_feedforward": 32, "input_dimension": 16,
                "output_dimensions": [16],
            },
            "quantizer": {"dimension": 8, "output_dimension": 16},
        },
    }  # fmt: skip


def build(folder: Path) -> None:
    import sentencepiece as spm
    from mlx_audio.tts.models.pocket_tts.pocket_tts import Model, ModelConfig
    from mlx_audio.tts.utils import load

    mx.random.seed(4321)
    folder.mkdir(parents=True)
    write_tokenizer(folder / "tokenizer.model")
    n_bins = spm.SentencePieceProcessor(str(folder / "tokenizer.model")).vocab_size()  # type: ignore[call-arg]
    raw = config(n_bins)
    model = Model(ModelConfig.from_dict({**raw, "model_path": str(folder)}))
    params = {
        k: mx.random.normal(v.shape) * 0.2 if v.ndim > 1 else v
        for k, v in tree_flatten(model.parameters())
    }
    # Random weights would end every sentence at its first frame: an end-of-speech head
    # that never fires lets each sentence run to its length limit (a word a second).
    params["flow_lm.out_eos.weight"] = mx.zeros_like(params["flow_lm.out_eos.weight"])
    params["flow_lm.out_eos.bias"] = mx.full(params["flow_lm.out_eos.bias"].shape, -100.0)
    params["speaker_proj_weight"] = mx.random.normal(params["speaker_proj_weight"].shape) * 0.2
    mx.save_safetensors(str(folder / "model.safetensors"), params)
    (folder / "config.json").write_text(json.dumps(raw, indent=1))
    voices = folder / "embeddings"
    voices.mkdir()
    prompt = mx.random.normal((1, PROMPT_FRAMES, raw["flow_lm"]["transformer"]["d_model"]))
    mx.save_safetensors(str(voices / f"{VOICE}.safetensors"), {"audio_prompt": prompt})

    loaded = load(str(folder))
    got = dict(tree_flatten(loaded.parameters()))
    for k, v in params.items():
        if not mx.array_equal(got[k], v).item():
            raise AssertionError(f"pocket tts: {k} did not load as written")


if __name__ == "__main__":
    build(Path(sys.argv[1]))
