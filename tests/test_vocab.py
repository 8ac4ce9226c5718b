"""The Harmony vocabulary works offline, from the bpe-openai wheel or a named folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_harmony.llm.vocab import VOCAB_FILE, VOCAB_SHA256

ROOT = Path(__file__).parent.parent


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "from mlx_harmony.llm.vocab import harmony_encoding; print(harmony_encoding().encode('hi'))"
    )
    full = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**full, **env},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_vocab_unpacked_from_the_wheel_is_the_official_file(vocab_dir: Path) -> None:
    data = (vocab_dir / VOCAB_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(vocab_dir)


@pytest.mark.heavy
def test_fresh_cache_works_without_network(tmp_path: Path) -> None:
    # No proxy reachable, an empty cache: the only way is the bundled file.
    out = _run({"XDG_CACHE_HOME": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mlx-harmony" / "encodings" / VOCAB_FILE).is_file()


@pytest.mark.heavy
def test_named_folder_without_the_file_is_one_clear_line(tmp_path: Path) -> None:
    out = _run({"TIKTOKEN_ENCODINGS_BASE": str(tmp_path)})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert f"TIKTOKEN_ENCODINGS_BASE={tmp_path}: no {VOCAB_FILE}" in last
    assert "bpe-openai" in last
