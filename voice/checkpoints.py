"""Loading Kyutai checkpoints (STT, TTS, Mimi) from a Hugging Face repo id or a local folder.

The published repos differ in naming: `-mlx` STT repos hold the LM in MLX names (possibly
pre-quantized, `*.q4/.q8.safetensors`), the TTS repo and the PyTorch STT repos hold it in
PyTorch names. Mimi is always in PyTorch names. moshi-mlx has a loader for each; this module
picks the right one from the file's own keys, so every repo layout goes through one path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from moshi_mlx import models
from moshi_mlx.models.mimi import Mimi, MimiConfig, mimi_202407
from moshi_mlx.modules import SeanetConfig, TransformerConfig
from safetensors import safe_open
from sentencepiece import SentencePieceProcessor

from mlx_harmony.llm.errors import ConfigError

# An mlx-harmony addition, absent from the published repos (which all use the one Mimi):
# a folder may describe a smaller codec, which is how the tests run faster than real time.
MIMI_CONFIG_FILE = "mimi_config.json"


@dataclass
class Checkpoint:
    raw_config: dict[str, Any]
    lm: models.Lm
    mimi: Mimi
    tokenizer: SentencePieceProcessor


def fetch(ref: str, filename: str) -> Path:
    """A file of a checkpoint: `ref` is a local folder or a Hugging Face repo id."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        path = folder / filename
        if not path.is_file():
            raise ConfigError(f"{folder}: missing {filename}")
        return path
    if folder.exists() or ref.count("/") != 1:
        raise ConfigError(f"{ref}: not a model folder or a Hugging Face repo id (owner/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(ref, filename))  # shows a progress bar while downloading
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"{ref}: {filename} is not in the local Hugging Face cache and cannot be "
            "downloaded (offline?); download it once or give a local folder"
        ) from None
    except HfHubHTTPError as e:
        raise ConfigError(f"{ref}: cannot download {filename}: {str(e).splitlines()[0]}") from None


def _mimi_config(ref: str, codebooks: int) -> MimiConfig:
    folder = Path(ref).expanduser()
    path = folder / MIMI_CONFIG_FILE
    if not path.is_file():
        return mimi_202407(codebooks)
    raw = json.loads(path.read_text())
    try:
        seanet = SeanetConfig(**raw.pop("seanet"))
        transformer = TransformerConfig(**raw.pop("transformer"))
        raw["quantizer_nq"] = codebooks
        return MimiConfig(seanet=seanet, transformer=transformer, **raw)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a Mimi configuration ({e})") from None


def _has_pytorch_names(path: Path) -> bool:
    with safe_open(str(path), framework="numpy") as f:
        return "out_norm.alpha" in set(f.keys())


def quantize_lm(lm: models.Lm, bits: int, group_size: int = 64) -> None:
    """The layers moshi-mlx's own TTS script quantizes (embeddings and heads stay exact);
    a layer whose width the group size does not divide is left as it is."""

    def fits(_: str, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (
            hasattr(module, "to_quantized")
            and weight is not None
            and weight.shape[-1] % group_size == 0
        )

    nn.quantize(lm.depformer, group_size, bits, class_predicate=fits)
    for layer in lm.transformer.layers:
        nn.quantize(layer.self_attn, group_size, bits, class_predicate=fits)
        nn.quantize(layer.gating, group_size, bits, class_predicate=fits)


def is_quantized(lm: models.Lm) -> bool:
    return any(isinstance(m, nn.QuantizedLinear) for _, m in lm.named_modules())


def load_checkpoint(ref: str, *, generating_audio: bool, quantize: int | None) -> Checkpoint:
    """Config, LM, Mimi and text tokenizer of a Kyutai STT or TTS checkpoint."""
    config_path = fetch(ref, "config.json")
    try:
        raw = json.loads(config_path.read_text())
        lm_config = models.LmConfig.from_config_dict(raw)
        names = {k: raw[k] for k in ("mimi_name", "tokenizer_name")}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{config_path}: not a Kyutai model config ({e!r})") from None
    weights = fetch(ref, raw.get("moshi_name", "model.safetensors"))
    lm = models.Lm(lm_config)
    lm.set_dtype(mx.bfloat16)
    try:
        if _has_pytorch_names(weights):
            lm.load_pytorch_weights(str(weights), lm_config, strict=True)
        else:
            for bits in (4, 8):
                if weights.name.endswith(f".q{bits}.safetensors"):
                    nn.quantize(lm, bits=bits, group_size=32 if bits == 4 else 64)
                    quantize = None  # already quantized
            lm.load_weights(str(weights), strict=True)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{weights}: weights do not match {config_path} ({e})") from None
    if quantize:
        quantize_lm(lm, quantize)

    codebooks = lm_config.generated_codebooks if generating_audio else lm_config.other_codebooks
    mimi = Mimi(_mimi_config(ref, codebooks))
    mimi_path = fetch(ref, names["mimi_name"])
    try:
        mimi.load_pytorch_weights(str(mimi_path), strict=True)
    except (ValueError, KeyError) as e:
        raise ConfigError(
            f"{mimi_path}: not a Mimi codec for {codebooks} codebooks ({e})"
        ) from None
    tokenizer = SentencePieceProcessor(str(fetch(ref, names["tokenizer_name"])))  # type: ignore[call-arg]
    # Read in now, as mlx_lm.load does: left lazy, the weights would load during the
    # first frame, and would belong to this thread's streams (a server's model worker,
    # another thread, could not run the model).
    mx.eval(lm.parameters(), mimi.parameters())
    return Checkpoint(raw, lm, mimi, tokenizer)
