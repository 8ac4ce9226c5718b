"""Operations a TTS 1.6B frame asks MLX for, counted from its graphs: no device needed.

On a GPU a frame of Kyutai's TTS is bound by how many operations it launches (MLX on
CUDA pays 5-18 µs each; issue #26), and the count is the same on every backend, where
the time per operation is not. Each part of a frame is built lazily at the published
shape (random weights) and its graph is written with `mx.export_to_dot`, then counted:
the backbone's step (as a session runs it), the depformer's pass over the kept codebooks
(moshi-mlx's loop or the compiled function the product runs: fused operations are one
node there) and Mimi's decoding of the frame. "Kernels" leaves out the operations that
only make a view (no kernel runs for them); a few primitives launch more than one.

    python -m mlx_harmony.bench.graph_ops --codebooks 32,16,8 --json graph-ops.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlx.core as mx
from moshi_mlx.models.lm import DepFormer

from mlx_harmony.bench.kyutai import _tts_parts
from mlx_harmony.llm.cli.common import run_main
from mlx_harmony.voice.depformer_fused import compiled as compiled_fused
from mlx_harmony.voice.depformer_fused import fused_depformer
from mlx_harmony.voice.moshi_internals import compiled_depformer, keep_codebooks
from mlx_harmony.voice.tts import Synthesizer

# Primitives that only describe a view of their input: no kernel is launched for them.
VIEWS = frozenset(
    {"Broadcast", "Reshape", "Slice", "Transpose", "ExpandDims", "Squeeze", "AsStrided",
     "StopGradient", "Depends", "Split", "Unflatten", "Flatten"}
)  # fmt: skip
_NODE = re.compile(r'\[label ="([^"]+)", shape=rectangle\]')


def graph_ops(*outputs: mx.array) -> Counter[str]:
    """The primitives in the unevaluated graph behind `outputs`, by name."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.dot"
        mx.export_to_dot(str(path), *outputs)
        return Counter(_NODE.findall(path.read_text()))


def kernels(ops: Counter[str]) -> int:
    return sum(n for name, n in ops.items() if name not in VIEWS)


class _Counted(Exception):
    """Raised from the text hook once the backbone's graph is counted: the step stops."""


def backbone_ops(tts: Synthesizer) -> Counter[str]:
    """The backbone's step (text and audio embeddings, the transformer, the text head and
    its sampling) as a session steps it, up to the text token it reads back: the second
    step (the first also builds what is kept from then on)."""
    session = tts.session(batch=False)
    session.push("Hello there.")
    session.close()
    session.step()
    counted: Counter[str] = Counter()

    def count(text_tokens: mx.array) -> None:
        counted.update(graph_ops(text_tokens))
        raise _Counted

    session.gen.on_text_hook = count
    with contextlib.suppress(_Counted):
        session.step()
    return counted


def depformer_ops(
    tts: Synthesizer, depformer: Callable[[mx.array, mx.array], mx.array]
) -> Counter[str]:
    """One pass of the depformer over the kept codebooks, from the backbone's output."""
    lm = tts.lm
    batch = 2 if tts.model.cfg_coef != 1 else 1
    out = mx.random.normal((batch, 1, lm.cfg.transformer.d_model)).astype(mx.bfloat16)
    text = mx.array([[3]], dtype=mx.int32)
    mx.eval(out, text)
    return graph_ops(depformer(out, text))


def _moshi_depformer(lm, sampler, cfg: float, out: mx.array, text: mx.array) -> mx.array:
    return DepFormer.sample(lm.depformer, out, sampler, text, lm.depformer_cache, cfg)


def mimi_ops(tts: Synthesizer) -> Counter[str]:
    """Mimi's decoding of one frame of the kept codebooks: the second (the first also
    computes what its codebooks and streaming state keep)."""
    frame = mx.zeros((1, tts.lm.dep_q, 1), dtype=mx.int32)
    tts.mimi.reset_all()
    mx.eval(tts.mimi.decode_step(frame))
    return graph_ops(tts.mimi.decode_step(frame))


def count(tts: Synthesizer, codebooks: list[int]) -> list[dict]:
    """Each codebook count, both depformers; the model is cut from the most codebooks
    down (a cut is for good)."""
    rows = []
    backbone = backbone_ops(tts)
    for k in sorted(codebooks, reverse=True):
        keep_codebooks(tts.lm, k)
        lm, sampler, cfg = tts.lm, tts.audio_sampler, tts.model.cfg_coef

        mimi = mimi_ops(tts)
        plain = partial(_moshi_depformer, lm, sampler, cfg)
        variants = [("moshi-mlx loop", plain), ("compiled", compiled_depformer(lm, sampler, cfg))]
        # The fused frame's steps: as MLX operations anywhere, as CUDA kernels on CUDA.
        for name, on_cuda in (("fused (MLX ops)", False), ("fused kernels", True)):
            if on_cuda and not mx.cuda.is_available():
                continue
            frame = fused_depformer(lm, sampler, cfg, kernels=on_cuda)
            if frame is not None:
                variants.append((name, compiled_fused(frame)))
        for name, fn in variants:
            dep = depformer_ops(tts, fn)
            rows.append({
                "codebooks": lm.dep_q, "depformer": name,
                "backbone_ops": sum(backbone.values()), "backbone_kernels": kernels(backbone),
                "depformer_ops": sum(dep.values()), "depformer_kernels": kernels(dep),
                "mimi_ops": sum(mimi.values()), "mimi_kernels": kernels(mimi),
                "frame_kernels": kernels(backbone) + kernels(dep) + kernels(mimi),
                "depformer_top": dict(dep.most_common(8)),
            })  # fmt: skip
    return rows


def published() -> Synthesizer:
    """TTS 1.6B at its published shape with random weights (as `bench.kyutai` times it)."""
    folder = Path(tempfile.mkdtemp(prefix="graph-ops-"))
    ckpt, voice = _tts_parts(folder, None, mx.bfloat16)
    return Synthesizer(ckpt, voice, temperature=0.6, max_seconds=30, fused_depformer="off")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codebooks", default="32,16,8", help="kept codebook counts to count")
    p.add_argument("--json", type=Path, help="write the rows here too")
    args = p.parse_args()
    rows = count(published(), [int(k) for k in args.codebooks.split(",")])
    print(f"{'codebooks':>9} {'depformer':<16} {'backbone':>9} {'depformer':>10} "
          f"{'Mimi':>6} {'frame':>6}   (kernels; operations in brackets)")  # fmt: skip
    for r in rows:
        print(
            f"{r['codebooks']:>9} {r['depformer']:<16} {r['backbone_kernels']:>9} "
            f"{r['depformer_kernels']:>5} ({r['depformer_ops']}) {r['mimi_kernels']:>6} "
            f"{r['frame_kernels']:>6}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    run_main(main)
