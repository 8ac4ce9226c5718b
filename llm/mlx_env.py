"""MLX settings that it reads from the environment once, at their first use: every command
sets them before any array work (`llm.cli.common.run_main`). A value the user exported
is kept.

Both are for MLX on NVIDIA GPUs (the Metal and CPU backends read neither), measured on an
H200 at gpt-oss-20b's shape (docs/performance.md, "A conversation on CUDA"):

- `MLX_CUDA_USE_CUDNN_SDPA=0`: MLX runs every multi-token attention (a prefill chunk)
  through cuDNN, which builds a graph for each new pair of query and key lengths. A
  conversation meets a new pair at every turn (the prompt grows) and every word prefilled
  while the user speaks: 80-160 ms per chunk, up to 1.6 s where a new kind of graph is
  compiled, against 12-60 ms for MLX's own kernels.
- `MLX_PTX_CACHE_DIR`: the kernels MLX compiles at first use (a minute or more for a
  model's first turns on a fresh machine) are kept under the user's cache folder instead
  of the temporary one, which is emptied at reboot: a restarted daemon's first turn then
  takes a second, not minutes.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CUDNN_ATTENTION = "MLX_CUDA_USE_CUDNN_SDPA"
KERNEL_CACHE = "MLX_PTX_CACHE_DIR"


def kernel_cache_dir(environ: MutableMapping[str, str], mlx_version: str) -> Path:
    base = environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-harmony" / "mlx" / mlx_version / "ptx"


def cudnn_attention(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether MLX on CUDA runs multi-token attention through cuDNN (as MLX reads it: on
    unless set to 0; `configure` sets 0 unless the user exported a value)."""
    return environ.get(CUDNN_ATTENTION, "1") != "0"


def configure(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set this product's defaults for MLX's environment settings the user left unset."""
    environ.setdefault(CUDNN_ATTENTION, "0")
    try:
        # Kernels are cached by name alone: each MLX version needs its own folder. Read
        # from the package's metadata, as importing MLX would slow `voice ctl` down.
        mlx_version = version("mlx")
    except PackageNotFoundError:  # a source checkout of MLX: its own default stays
        return
    environ.setdefault(KERNEL_CACHE, str(kernel_cache_dir(environ, mlx_version)))
