"""The o200k_base vocabulary that openai-harmony needs, found or provided offline.

openai-harmony downloads `o200k_base.tiktoken` on first use unless
`TIKTOKEN_ENCODINGS_BASE` names a folder that holds it. The `bpe-openai` wheel ships the
official file (gzipped), so a machine without internet can still render Harmony: we
unpack it once into a cache folder, check its hash, and point the variable there.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from functools import cache
from pathlib import Path

from openai_harmony import HarmonyEncoding, HarmonyEncodingName, load_harmony_encoding

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.files import atomic_write_bytes

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
ENV_VAR = "TIKTOKEN_ENCODINGS_BASE"

FIX_HINT = (
    f"set {ENV_VAR} to a folder holding {VOCAB_FILE} "
    f"(e.g. gunzip bpe_openai/data/{VOCAB_FILE}.gz from `pip install bpe-openai`)"
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-harmony" / "encodings"


def _bundled_vocab() -> bytes | None:
    # find_spec locates the package without importing it (and its 70 MB extension).
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or spec.origin is None:
        return None
    try:
        packed = (Path(spec.origin).parent / "data" / f"{VOCAB_FILE}.gz").read_bytes()
    except FileNotFoundError:
        return None
    data = gzip.decompress(packed)
    return data if hashlib.sha256(data).hexdigest() == VOCAB_SHA256 else None


def ensure_vocab() -> Path | None:
    """Make sure openai-harmony can load o200k_base without a network; return its folder.

    A folder the user named in the environment is used as it is, but checked first so
    that a typo gives our one-line error rather than a download attempt. Returns None
    when no local copy exists and openai-harmony will have to download it.
    """
    named = os.environ.get(ENV_VAR)
    if named:
        folder = Path(named).expanduser()
        if not (folder / VOCAB_FILE).is_file():
            raise ConfigError(f"{ENV_VAR}={named}: no {VOCAB_FILE} in that folder; {FIX_HINT}")
        return folder
    folder = cache_dir()
    target = folder / VOCAB_FILE
    if not target.is_file():
        data = _bundled_vocab()
        if data is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
    os.environ[ENV_VAR] = str(folder)
    return folder


@cache
def harmony_encoding() -> HarmonyEncoding:
    ensure_vocab()
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as exc:  # openai-harmony raises a bare HarmonyError (no subclass)
        raise ConfigError(f"cannot load the Harmony vocabulary ({exc}); {FIX_HINT}") from exc
