"""mlx-harmony: a local voice assistant and Harmony chat engine on MLX.

Installed, its packages are `mlx_harmony.llm` (the engine), `mlx_harmony.voice` (the audio
pipeline) and `mlx_harmony.bench` (the benchmarks), one import package beside any other
(`llm` on PyPI is another project). In the repository they are the top-level folders
`llm/`, `voice/` and `bench/` (the project's layout); run from a checkout, this package's
path takes in the repository root so that the same imports find them there.
"""

from pathlib import Path

_here = Path(__file__).resolve().parent
if not (_here / "llm").is_dir() and (_here.parent / "llm" / "engine.py").is_file():
    __path__.append(str(_here.parent))
