"""moshi-mlx 0.3.0 pins mlx<0.27; pyproject.toml overrides that. This keeps it honest:
every moshi_mlx module the voice pipeline uses imports, and a streaming LM steps, on the
mlx the project installs."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = [
    "moshi_mlx.models",
    "moshi_mlx.models.lm",
    "moshi_mlx.models.generate",
    "moshi_mlx.models.mimi",
    "moshi_mlx.models.tts",
    "moshi_mlx.modules",
    "moshi_mlx.utils.sampling",
]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.heavy
def test_module_imports(name: str) -> None:
    # In a child process: moshi's native dependencies (sentencepiece, sphn) stay out of the
    # test process until the voice tests need them; a segfault in later engine sampling
    # tests was only ever seen after these imports ran in-process.
    out = subprocess.run(
        [sys.executable, "-c", f"import importlib; importlib.import_module({name!r})"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


STEP_SCRIPT = """
import mlx.core as mx
from moshi_mlx import models
from moshi_mlx.utils import sampling

n_q = 8
cfg = {
    "dim": 64, "num_heads": 4, "num_layers": 2, "causal": True, "layer_scale": None,
    "context": 64, "max_period": 10000, "positional_embedding": "rope",
    "depformer_dim": 32, "depformer_num_heads": 2, "depformer_num_layers": 1,
    "depformer_dim_feedforward": 64, "depformer_pos_emb": "none", "dep_q": 0, "n_q": n_q,
    "card": 2048, "text_card": 100, "delays": [0] * (n_q + 1),
    "extra_heads_num_heads": 2, "extra_heads_dim": 6,
}
mx.random.seed(0)
lm = models.Lm(models.LmConfig.from_config_dict(cfg))
gen = models.LmGen(model=lm, max_steps=10, text_sampler=sampling.Sampler(temp=0.0),
                   audio_sampler=sampling.Sampler(temp=0.0))
for _ in range(4):
    text, extra = gen.step_with_extra_heads(mx.random.randint(0, 2048, (1, n_q)))
    assert text.size == 1 and len(extra) == 2, (text.shape, len(extra))
print("stepped")
"""


@pytest.mark.heavy
def test_tiny_streaming_stt_lm_steps() -> None:
    # In a child process: this test is about the installed packages, and keeping
    # moshi's native state out of the test process keeps the other tests independent.
    out = subprocess.run(
        [sys.executable, "-c", STEP_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "stepped"


def test_the_internals_we_use_are_checked_and_a_missing_one_is_named(monkeypatch) -> None:
    from moshi_mlx.models.lm import DepFormer

    from mlx_harmony.voice import moshi_internals

    moshi_internals.check_moshi()  # the installed moshi-mlx has them all
    monkeypatch.delattr(DepFormer, "sample")
    with pytest.raises(ImportError, match=r"DepFormer\.sample is gone.*moshi-mlx 0\.3\.x"):
        moshi_internals.check_moshi()
    with pytest.raises(ImportError, match=r"object\.step_idx is gone"):
        moshi_internals.require(object(), "step_idx")
