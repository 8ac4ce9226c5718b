"""Tiny Kyutai STT and TTS folders in the files moshi-mlx loads, with random weights.

The layouts follow the published repositories: an STT `-mlx` folder holds its LM in MLX
names (`model.safetensors`, loaded with `load_weights`), the TTS folder holds its LM in
PyTorch names (loaded with `Lm.load_pytorch_weights`), both hold Mimi in PyTorch names and a
sentencepiece tokenizer, and voices are `<name>.<sig>@<epoch>.safetensors` embeddings. The
only addition is `mimi_config.json` (the codec's shape, which the real repos leave implicit
because there is one Mimi): it lets the codec be small enough to run faster than real time.

Every file written here is read back through the loader it targets and compared with the
weights it came from, so a fixture that drifts from moshi-mlx's formats fails loudly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from moshi_mlx import models
from moshi_mlx.models.mimi import Mimi, MimiConfig
from moshi_mlx.modules import SeanetConfig, TransformerConfig

from tests.support.tiny_models import PYTHON_USER

TEXT_CARD = 64
MIMI_NQ = 4
MIMI_BINS = 64
SIG, EPOCH = "0badcafe", 7
VOICE = "tiny-voice"
CORPUS = [
    "hello there how are you today",
    "the capital of france is paris",
    "thanks for asking i am fine",
    "what is the weather like in tokyo",
    "tell me a joke about cats and dogs",
    "a quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine ten",
]
# What the tiny STT hears, whatever the audio: one of the tiny GPT-OSS's trained questions,
# so that a spoken turn gets a real Harmony answer (analysis, then a two-sentence final).
HEARD = "What is the capital of France?"
# Text ids with no text in them, as Kyutai's STT emits between words.
PAD_ID = 3


def tiny_mimi_config(n_q: int) -> MimiConfig:
    seanet = SeanetConfig(
        dimension=32, channels=1, causal=True, nfilters=4, nresidual_layers=1,
        ratios=[8, 6, 5, 4], ksize=7, residual_ksize=3, last_ksize=3, dilation_base=2,
        pad_mode="constant", true_skip=True, compress=2,
    )  # fmt: skip
    transformer = TransformerConfig(
        d_model=32, num_heads=2, num_layers=1, causal=True, norm_first=True, bias_ff=False,
        bias_attn=False, layer_scale=0.01, positional_embedding="rope", use_conv_block=False,
        cross_attention=False, conv_kernel_size=3, use_conv_bias=True, gating=False,
        norm="layer_norm", context=250, max_period=10000, max_seq_len=8192, kv_repeat=1,
        dim_feedforward=64, conv_layout=True,
    )  # fmt: skip
    return MimiConfig(
        channels=1, sample_rate=24000, frame_rate=12.5, renormalize=True, seanet=seanet,
        transformer=transformer, quantizer_nq=n_q, quantizer_bins=MIMI_BINS, quantizer_dim=16,
    )  # fmt: skip


def _lm_config(*, n_q: int, dep_q: int, tts: bool) -> dict:
    cfg: dict = {
        "card": MIMI_BINS, "n_q": n_q, "dep_q": dep_q, "delays": [0] + [0] + [1] * (n_q - 1),
        "dim": 64, "text_card": TEXT_CARD, "existing_text_padding_id": 3, "num_heads": 4,
        "num_layers": 2, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
        "context": 500, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
        "positional_embedding": "rope", "depformer_dim": 32, "depformer_num_heads": 2,
        "depformer_num_layers": 1, "depformer_dim_feedforward": 64,
        "depformer_multi_linear": True, "depformer_pos_emb": "none",
        "tokenizer_name": "tokenizer_tiny.model",
    }  # fmt: skip
    if not tts:
        cfg |= {
            "extra_heads_num_heads": 4,
            "extra_heads_dim": 6,
            "stt_config": {"audio_silence_prefix_seconds": 0.0, "audio_delay_seconds": 0.5},
            "mimi_name": "mimi-tiny.safetensors",
            "moshi_name": "model.safetensors",
            "model_type": "stt",
        }
        return cfg
    cfg |= {
        "depformer_weights_per_step": True,
        "depformer_weights_per_step_schedule": [0, 1, 2, 2][:dep_q],
        "depformer_low_rank_embeddings": 8,
        "demux_second_stream": True,
        "cross_attention": True,
        "conditioners": {
            "speaker_wavs": {"type": "tensor", "tensor": {"dim": 16}},
            "cfg": {
                "type": "lut",
                "lut": {
                    "n_bins": 7,
                    "dim": 16,
                    "tokenizer": "noop",
                    "possible_values": ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"],
                },
            },
            "control": {
                "type": "lut",
                "lut": {"dim": 64, "n_bins": 1, "tokenizer": "noop", "possible_values": ["ok"]},
            },
        },
        "fuser": {
            "cross_attention_pos_emb": True,
            "cross_attention_pos_emb_scale": 1,
            "sum": ["control", "cfg"],
            "prepend": [],
            "cross": ["speaker_wavs"],
        },
        "tts_config": {"audio_delay": 0.16, "second_stream_ahead": 2},
        "model_id": {"sig": SIG, "epoch": EPOCH},
        "mimi_name": "mimi-tiny.safetensors",
        "moshi_name": "dsm_tts_tiny.safetensors",
        "model_type": "tts",
    }
    return cfg


def _randomize(module) -> dict[str, mx.array]:
    """Give every parameter small random values (Mimi's codebooks are all zero otherwise)."""
    params = {}
    for name, value in tree_flatten(module.parameters()):
        if name.endswith("cluster_usage"):
            params[name] = mx.random.uniform(0.5, 1.5, value.shape)
        elif name.endswith("initialized") or ("norm" in name and name.endswith(".weight")):
            params[name] = mx.ones(value.shape)
        else:
            params[name] = mx.random.normal(value.shape) * 0.05
    return params


def _same(loaded, expected: dict[str, mx.array], what: str) -> None:
    got = dict(tree_flatten(loaded.parameters()))
    for name, value in expected.items():
        if not np.allclose(np.array(got[name]), np.array(value), atol=1e-6):
            raise AssertionError(f"{what}: {name} does not survive the round trip")


def mimi_to_pytorch(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Inverse of `Mimi.load_pytorch_weights`' renaming and transposes."""
    enc_res, enc_down = [1, 4, 7, 10], [3, 6, 9, 12]
    dec_up, dec_res = [2, 5, 8, 11], [3, 6, 9, 12]
    out = {}
    for k, v in params.items():
        if k.endswith((".conv.weight", ".output_proj.weight", ".input_proj.weight")):
            v = v.swapaxes(-1, -2)
        if k.endswith(".convtr.weight"):
            v = v.transpose(2, 0, 1)
        k = k.replace("encoder.init_conv1d.", "encoder.0.").replace(
            "encoder.final_conv1d.", "encoder.14."
        )
        k = k.replace("decoder.init_conv1d.", "decoder.0.").replace(
            "decoder.final_conv1d.", "decoder.14."
        )
        for i in range(4):
            k = k.replace(f"encoder.layers.{i}.residuals.0.", f"encoder.{enc_res[i]}.")
            k = k.replace(f"encoder.layers.{i}.downsample.", f"encoder.{enc_down[i]}.")
            k = k.replace(f"decoder.layers.{i}.upsample.", f"decoder.{dec_up[i]}.")
            k = k.replace(f"decoder.layers.{i}.residuals.0.", f"decoder.{dec_res[i]}.")
        k = k.replace(".block.1.", ".block.3.").replace(".block.0.", ".block.1.")
        k = k.replace(".gating.linear1.", ".linear1.").replace(".gating.linear2.", ".linear2.")
        k = k.replace(".in_proj.weight", ".in_proj_weight")
        if k.startswith("encoder."):
            k = "encoder.model." + k.removeprefix("encoder.")
        if k.startswith("decoder."):
            k = "decoder.model." + k.removeprefix("decoder.")
        out[k] = v
    return out


def lm_to_pytorch(params: dict[str, mx.array], cfg: models.LmConfig) -> dict[str, mx.array]:
    """Inverse of `Lm.load_pytorch_weights`' renaming (depformer slices share norms)."""
    schedule = cfg.depformer.weights_per_step_schedule
    chunks = max(schedule) + 1 if schedule else cfg.depformer.num_slices
    out: dict[str, mx.array] = {}
    stacked: dict[str, list[mx.array | None]] = {}
    for k, v in params.items():
        if k == "out_norm.weight":
            out["out_norm.alpha"] = v[None, None]
        elif k.startswith("audio_embs."):
            out[k.replace("audio_embs.", "emb.")] = v
        elif k.startswith("transformer."):
            if ".norm" in k and k.endswith(".weight") and "cross_attention" not in k:
                k, v = k.removesuffix(".weight") + ".alpha", v[None, None]
            out[k.replace(".in_proj.weight", ".in_proj_weight")] = v
        elif k.startswith("depformer.slices."):
            parts = k.split(".")
            s = int(parts[2])
            rest = ".".join(parts[3:])
            pth = schedule[s] if schedule else s
            if rest == "linear_in.weight":
                out[f"depformer_in.{pth}.weight"] = v
            elif rest == "linear_out.weight":
                out[f"linears.{s}.weight"] = v
            elif rest.startswith("emb."):
                base = "depformer_text_emb" if s == 0 else f"depformer_emb.{s - 1}"
                out[f"{base}.{rest.removeprefix('emb.')}"] = v
            elif rest.startswith("transformer.layers."):
                layer = parts[5]
                tail = ".".join(parts[6:])
                prefix = f"depformer.layers.{layer}"
                if tail in ("norm1.weight", "norm2.weight"):
                    out[f"{prefix}.{tail.removesuffix('.weight')}.alpha"] = v[None, None]
                elif tail.startswith("gating."):
                    out[f"{prefix}.gating.{pth}.{tail.removeprefix('gating.')}"] = v
                elif tail.startswith("self_attn."):
                    name = tail.replace("in_proj.weight", "in_proj_weight")
                    slots = stacked.setdefault(f"{prefix}.{name}", [None] * chunks)
                    slots[pth] = v
                else:
                    raise AssertionError(f"unmapped depformer weight {k}")
            else:
                raise AssertionError(f"unmapped depformer weight {k}")
        else:
            out[k] = v
    for name, slots in stacked.items():
        out[name] = mx.concatenate([s for s in slots if s is not None], axis=0)
    return out


def _tie_shared(params: dict[str, mx.array], cfg: models.LmConfig) -> None:
    """Make the weights that the PyTorch layout stores once equal across depformer slices."""
    schedule = cfg.depformer.weights_per_step_schedule or list(range(cfg.depformer.num_slices))
    first_of: dict[int, int] = {}
    for s, pth in enumerate(schedule):
        first_of.setdefault(pth, s)
    for k in list(params):
        if not k.startswith("depformer.slices."):
            continue
        parts = k.split(".")
        s = int(parts[2])
        tail = ".".join(parts[3:])
        if ".norm" in tail:
            params[k] = params[f"depformer.slices.0.{tail}"]
        elif "gating" in tail or "self_attn" in tail or tail.startswith("linear_in"):
            params[k] = params[f"depformer.slices.{first_of[schedule[s]]}.{tail}"]


def write_tokenizer(path: Path, model_type: str = "unigram", heard: str = HEARD) -> None:
    import sentencepiece as spm

    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join([*CORPUS, heard] * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=TEXT_CARD,
        model_type=model_type, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
        pad_id=PAD_ID, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    path.with_suffix(".vocab").unlink()


def write_mimi(folder: Path, name: str, n_q: int) -> None:
    cfg = tiny_mimi_config(n_q)
    (folder / "mimi_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    mimi = Mimi(cfg)
    params = _randomize(mimi)
    mx.save_safetensors(str(folder / name), mimi_to_pytorch(params))
    check = Mimi(cfg)
    check.load_pytorch_weights(str(folder / name), strict=True)
    _same(check, params, "mimi")


def hear_one_sentence(params: dict[str, mx.array], token_ids: list[int], start: int) -> None:
    """Wire the STT LM so that greedy decoding emits `token_ids`, then padding, whatever the
    audio: the transformer blocks add nothing to the residual stream, audio embeddings are
    zero, and the text head maps each token's embedding to the token that follows it."""
    if len(set(token_ids)) != len(token_ids) or PAD_ID in token_ids:
        raise AssertionError(f"the heard sentence needs distinct non-pad tokens: {token_ids}")
    silenced = ("self_attn.out_proj.weight", "gating.linear_out.weight")
    for name in params:
        if name.endswith(silenced) or name.startswith("audio_embs."):
            params[name] = mx.zeros(params[name].shape)
    emb = params["text_emb.weight"]
    emb = emb / mx.sqrt(mx.mean(emb * emb, axis=-1, keepdims=True))  # RMS 1: out_norm keeps it
    params["text_emb.weight"] = emb
    head = np.zeros(params["text_linear.weight"].shape, dtype=np.float32)
    chain = [start, *token_ids, PAD_ID]
    for prev, nxt in itertools.pairwise(chain):
        head[nxt] += 8 * np.array(emb[prev]) / emb.shape[1]
    head[PAD_ID] += 8 * np.array(emb[PAD_ID]) / emb.shape[1]  # padding stays padding
    params["text_linear.weight"] = mx.array(head)


def build_stt(folder: Path, heard: str = HEARD) -> None:
    """A tiny Kyutai STT that hears `heard`, whatever the audio."""
    import sentencepiece as spm

    folder.mkdir(parents=True)
    raw = _lm_config(n_q=MIMI_NQ, dep_q=0, tts=False)
    (folder / "config.json").write_text(json.dumps(raw, indent=1))
    write_tokenizer(folder / raw["tokenizer_name"], model_type="word", heard=heard)
    write_mimi(folder, raw["mimi_name"], MIMI_NQ)
    cfg = models.LmConfig.from_config_dict(raw)
    lm = models.Lm(cfg)
    params = _randomize(lm)
    tokenizer = spm.SentencePieceProcessor(str(folder / raw["tokenizer_name"]))  # type: ignore[call-arg]
    hear_one_sentence(params, tokenizer.encode(heard), start=cfg.text_out_vocab_size)
    lm.load_weights(list(params.items()), strict=True)
    lm.save_weights(str(folder / raw["moshi_name"]))
    check = models.Lm(cfg)
    check.load_weights(str(folder / raw["moshi_name"]), strict=True)
    _same(check, params, "stt lm")


def build_tts(folder: Path) -> None:
    folder.mkdir(parents=True)
    raw = _lm_config(n_q=MIMI_NQ, dep_q=MIMI_NQ, tts=True)
    (folder / "config.json").write_text(json.dumps(raw, indent=1))
    write_tokenizer(folder / raw["tokenizer_name"])
    write_mimi(folder, raw["mimi_name"], MIMI_NQ)
    cfg = models.LmConfig.from_config_dict(raw)
    lm = models.Lm(cfg)
    params = _randomize(lm)
    _tie_shared(params, cfg)
    mx.save_safetensors(str(folder / raw["moshi_name"]), lm_to_pytorch(params, cfg))
    check = models.Lm(cfg)
    check.load_pytorch_weights(str(folder / raw["moshi_name"]), cfg, strict=True)
    _same(check, params, "tts lm")
    voices = folder / "voices"
    voices.mkdir()
    speaker = mx.random.normal((1, 16, 10)) * 0.1
    mx.save_safetensors(
        str(voices / f"{VOICE}.{SIG}@{EPOCH}.safetensors"), {"speaker_wavs": speaker}
    )


def build(folder: Path) -> None:
    mx.random.seed(1234)
    build_stt(folder / "stt")
    build_tts(folder / "tts")
    # One that hears the question the tiny tool model answers with the python tool.
    build_stt(folder / "stt-python", heard=PYTHON_USER)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
