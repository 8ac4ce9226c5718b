"""GPT-OSS at its real shape with random weights, for timing where the weights can't come.

The configuration is gpt-oss-20b's; experts are quantized to MXFP4 and the other linear
layers to 8 bits, as in mlx-community/gpt-oss-20b-MXFP4-Q8. Random weights do the same
work per token as trained ones; the text they produce is noise, so benchmarks on them keep
generating to `max_tokens` (stop tokens are biased away on both sides of a comparison).
Where the text is spoken, `plain_words_bias` keeps it to plain words.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gpt_oss
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_harmony.bench.harmony_tokenizer import STOP_IDS, VOCAB_SIZE, write_harmony_tokenizer
from mlx_harmony.llm.engine import Engine

GPT_OSS_20B = {
    "model_type": "gpt_oss",
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_hidden_layers": 24,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "experts_per_token": 4,
    "sliding_window": 128,
    "rope_theta": 150000,
    "rms_norm_eps": 1e-5,
    "swiglu_limit": 7.0,
    "vocab_size": VOCAB_SIZE,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
}


def _quantize(model: nn.Module) -> None:
    def experts(path: str, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and ".experts." in path

    def others(path: str, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and ".experts." not in path

    nn.quantize(model, 32, 4, mode="mxfp4", class_predicate=experts)
    nn.quantize(model, 64, 8, class_predicate=others)


def random_gpt_oss(config: dict, tokenizer_dir: Path, vocab_file: Path) -> Engine:
    """An engine on a randomly initialised GPT-OSS of `config`'s shape."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        write_harmony_tokenizer(tokenizer_dir, vocab_file)
    # The same weights every run: what greedy decoding writes on them (and so how much
    # the voice benchmark has to say) does not change from one run to the next.
    mx.random.seed(0)
    model = gpt_oss.Model(gpt_oss.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    _quantize(model)
    # Materialise layer by layer: only the quantized weights are ever held at once.
    mx.eval(model.model.embed_tokens.parameters())
    for layer in model.model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(tokenizer_dir, eos_token_ids=STOP_IDS)
    return Engine(model, tokenizer, f"gpt-oss-{config['num_hidden_layers']}L (random weights)")


# Random weights write arbitrary tokens: often symbols, markup or other scripts, which
# the voice loop's speech cleaning drops, leaving nothing to say (a whole run without one
# sound). Pushed far above the random logits (a few units either way), these words are all
# that greedy decoding picks, the weights choosing which.
PLAIN_WORDS = " the time is now ten past four and the sky is clear so take a short walk"


def plain_words_bias(engine: Engine, bias: float = 50.0) -> dict[int, float]:
    """A logit bias that has random weights answer in plain spoken words."""
    return {t: bias for t in engine.tokenizer.encode(PLAIN_WORDS, add_special_tokens=False)}


def scaled_down(config: dict, layers: int = 2, hidden: int = 128, experts: int = 4) -> dict:
    """The same architecture, small enough for a CPU smoke test."""
    return config | {
        "hidden_size": hidden, "intermediate_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": experts,
        "num_experts_per_tok": 2, "experts_per_token": 2,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
    }  # fmt: skip
