"""What a conversation's prefill chunks cost at gpt-oss-20b's shape (random weights): a
backend that compiles or plans per shape (MLX on CUDA: cuDNN attention graphs per pair of
query and key lengths, kernels compiled at first use) shows it as chunks whose lengths or
positions it has not met before taking far longer than ones it has.

`python -m mlx_harmony.bench.prefill_shapes [--out prefill-shapes.json]`: two passes over the
same chunk lengths, each in a fresh cache; the second pass meets some (length, position)
pairs again.
Run it with `MLX_CUDA_USE_CUDNN_SDPA=1` and `=0` to compare (each is read once a process).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlx_harmony.llm.cli.common import run_main

# A prompt, words prefilled as they are said, answer tokens, chunks past the 128-token
# sliding window: the lengths a spoken conversation feeds.
PASSES = {
    "A": [77, 8, 8, 8, 5, 5, 13, 13, 1, 1, 1, 37, 37, 8, 21, 21, 3, 3, 8],
    "B": [77, 8, 5, 13, 37, 21, 3, 1, 41, 41, 16, 16, 8, 4, 2, 1],
}


def time_chunks(model, lengths: list[int]) -> list[dict]:
    cache = make_prompt_cache(model)
    rows, offset = [], 0
    for n in lengths:
        start = time.perf_counter()
        # As the engine's prefill: the cache is what is wanted, the logits stay unevaluated.
        model(mx.array([[7] * n]), cache=cache)
        mx.eval([c.state for c in cache])
        rows.append({"tokens": n, "cached": offset, "ms": (time.perf_counter() - start) * 1000})
        print(f"{n:4d} tokens after {offset:4d}: {rows[-1]['ms']:9.1f} ms", flush=True)
        offset += n
    return rows


def main() -> None:
    from mlx_harmony.bench.cli import load_engine

    p = argparse.ArgumentParser(
        prog="python -m mlx_harmony.bench.prefill_shapes", description=__doc__
    )
    p.add_argument("--model", default="random:gpt-oss-20b", help="as mlx-harmony-bench's")
    p.add_argument("--out", type=Path, default=Path("prefill-shapes.json"))
    args = p.parse_args()
    engine, _ = load_engine(args.model)
    runs = {name: time_chunks(engine.model, lengths) for name, lengths in PASSES.items()}
    settings = {k: os.environ.get(k) for k in ("MLX_CUDA_USE_CUDNN_SDPA", "MLX_PTX_CACHE_DIR")}
    out = {"device": str(mx.default_device()), "env": settings, "passes": runs}
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    run_main(main)  # as every command: MLX's environment settings first
