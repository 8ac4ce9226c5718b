"""An o200k_harmony tokenizer (GPT-OSS's) that `mlx_lm.load` reads, written offline.

Built from the official `o200k_base.tiktoken` file (which `llm.vocab` unpacks from the
bpe-openai wheel) with transformers' tiktoken converter: the ids equal openai-harmony's.
The benchmarks use it for GPT-OSS-shaped models with random weights; the tests for the
tiny GPT-OSS they train.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

# The `pat_str` of o200k_base in tiktoken_ext/openai_public.py.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
NAMED_SPECIALS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
    200018: "<|endofprompt|>",
}
VOCAB_SIZE = 201_088
# <|return|>, <|endoftext|>, <|call|>: where a GPT-OSS turn ends.
STOP_IDS = [200002, 199999, 200012]


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def write_harmony_tokenizer(folder: Path, vocab_file: Path) -> None:
    """Write o200k_harmony as a Hugging Face fast tokenizer that `mlx_lm.load` reads."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        # transformers reads the file through the `tiktoken` package; the format is
        # simple enough to read here and spare the project that dependency.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return load_tiktoken_ranks(Path(tiktoken_url))

    specials = [NAMED_SPECIALS.get(i, f"<|reserved_{i}|>") for i in range(199_998, VOCAB_SIZE)]
    converted = _Converter(
        vocab_file=str(vocab_file), pattern=O200K_PATTERN, extra_special_tokens=specials
    ).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=converted,
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        bos_token="<|startoftext|>",
    )
    tok.save_pretrained(folder)
    # transformers 5 writes its own class name, which older loaders do not know.
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
