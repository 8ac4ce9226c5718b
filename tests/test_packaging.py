"""The package installs as one import package, `mlx_harmony`, beside others: `llm` on PyPI
is another project, and a wheel with a top-level `llm` would overwrite it."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.tiny_models import HARMONY_TURNS

ROOT = Path(__file__).parent.parent
TOP_LEVEL = {"llm", "voice", "bench"}
CODE_IMPORT = re.compile(r"(?:^|[\s;])(?:from|import)\s+([\w.]+(?:\s*,\s*[\w.]+)*)")
FRANCE = HARMONY_TURNS[1]


def _python_files() -> list[Path]:
    files = [p for d in ("llm", "voice", "bench", "tests") for p in (ROOT / d).rglob("*.py")]
    return [*files, ROOT / "mlx_harmony" / "__init__.py"]


def test_code_imports_its_packages_through_mlx_harmony() -> None:
    """From a checkout `llm`, `voice` and `bench` are importable as top-level folders too;
    a module imported that way would exist twice (two classes of each error, two engine
    registries) and would not exist at all once installed."""
    wrong = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                # Code run in a subprocess (`python -c`), or a module run with `-m`.
                found = [m.group(1) for m in CODE_IMPORT.finditer(node.value)]
                # (Dotted only: a bare `import llm` there is PyPI's, in the wheel's test.)
                names = [n.strip() for f in found for n in f.split(",") if "." in n]
            elif isinstance(node, ast.List | ast.Tuple):
                pairs = zip(node.elts, node.elts[1:], strict=False)
                names = [b.value for a, b in pairs
                         if isinstance(a, ast.Constant) and a.value == "-m"
                         and isinstance(b, ast.Constant) and isinstance(b.value, str)]  # fmt: skip
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] in TOP_LEVEL]  # fmt: skip
    assert not wrong, wrong


def test_the_shipped_overrides_are_the_projects() -> None:
    """`uv tool install . --overrides overrides.txt` resolves what `uv sync` resolves."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = [
        line.strip()
        for line in (ROOT / "overrides.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert shipped == config["tool"]["uv"]["override-dependencies"]


@pytest.mark.heavy
def test_the_wheel_installs_beside_llm_and_answers(
    gpt_oss_path: Path, vocab_dir: Path, tmp_path: Path
) -> None:
    """The wheel holds `mlx_harmony` alone; installed into a clean environment together
    with PyPI's `llm`, both import, and its commands run: `--help`, and an answer from the
    tiny model, from outside the repository."""
    uv = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    env = {**os.environ, "VIRTUAL_ENV": str(tmp_path / "env")}
    env.pop("PYTHONPATH", None)

    def run(*args: str) -> str:
        out = subprocess.run(
            args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
        )
        assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-2000:])
        return out.stdout

    run(uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(ROOT))
    (wheel,) = (tmp_path / "dist").glob("mlx_harmony-*.whl")
    listing = run(sys.executable, "-m", "zipfile", "-l", str(wheel))
    tops = {line.split()[0].split("/")[0] for line in listing.splitlines()[1:] if line}
    assert tops == {"mlx_harmony", "-".join(wheel.name.split("-")[:2]) + ".dist-info"}
    run(uv, "venv", "--quiet", "--python", sys.executable, str(tmp_path / "env"))
    run(uv, "pip", "install", "--quiet", "--overrides", str(ROOT / "overrides.txt"),
        str(wheel), "llm")  # fmt: skip
    bin_dir = tmp_path / "env" / "bin"
    both = run(
        str(bin_dir / "python"), "-c",
        "import llm, mlx_harmony.llm.engine as e; print(llm.__file__); print(e.__file__)",
    )  # fmt: skip
    theirs, ours = both.splitlines()
    assert "site-packages/llm/" in theirs and "site-packages/mlx_harmony/llm/" in ours
    assert "usage: mlx-harmony-generate" in run(str(bin_dir / "mlx-harmony-generate"), "--help")
    answer = run(
        str(bin_dir / "mlx-harmony-generate"), FRANCE.user, "--model", str(gpt_oss_path),
        "--temperature", "0",
    )  # fmt: skip
    assert answer == FRANCE.final + "\n"


HELP_CHECK = """
import contextlib, importlib, io, sys, tomllib
scripts = tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"]
heavy = {HEAVY}
for name, target in scripts.items():
    module, function = target.split(":")
    sys.argv = [name, "--help"]
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            getattr(importlib.import_module(module), function)()
        except SystemExit:
            pass
    print(name, sorted(heavy & set(sys.modules)))
"""


@pytest.mark.heavy
def test_every_commands_help_answers_without_the_models_code() -> None:
    """`--help` of every console script imports neither MLX nor the language, speech or
    turn models, the web server or the audio library: seconds of imports (0.3-0.5 s left
    on the 2-core dev machine with its bytecode compiled)."""
    heavy = {"mlx.core", "mlx_lm", "transformers", "moshi_mlx", "fastapi", "uvicorn",
             "onnxruntime", "sounddevice", "httpx"}  # fmt: skip
    code = HELP_CHECK.replace("{HEAVY}", repr(heavy))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120)  # fmt: skip
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert out.stdout.splitlines() == [f"{name} []" for name in scripts]
