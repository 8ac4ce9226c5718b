"""Smart Turn v3.2: the probability that the speaker has finished, heard in their voice.

Pipecat's open model (BSD-2-Clause; a Whisper-tiny encoder and a classifier, 8M weights,
23 languages) takes the last 8 s of 16 kHz audio as Whisper's 80-bin log-mel features and
gives one probability. It runs here with ONNX Runtime on the CPU (≈15 ms a call), never on
the MLX device, so it cannot slow the STT, the chat model or the TTS down.

The features are computed here with numpy rather than with `transformers`' Whisper feature
extractor (which would pull its heavy import into the daemon): the same definition —
centred 400-sample Hann STFT with a 160-sample hop, Slaney mel filters, log10, a floor 8
below the maximum, scaled to about [-1, 1] — checked against a reference computed once with
`transformers` (`tests/data/whisper_mel_reference.npz`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from mlx_harmony.llm.errors import ConfigError

RATE = 16_000
SECONDS = 8
N_FFT = 400
HOP = 160
MELS = 80

# The published file, wherever it comes from (pipecat's wheel or the hub), checked by hash.
MODEL_NAME = "smart-turn-v3.2"
MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
MODEL_REPO = "pipecat-ai/smart-turn-v3"
MODEL_REVISION = "f766f81d3cfdf7737ac64aad813d91bbfd56bf93"
MODEL_SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    log = 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    log = 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0))
    return np.where(mel >= 15.0, log, linear)


@cache
def mel_filters() -> np.ndarray:
    """(MELS, N_FFT // 2 + 1) triangular filters, each normalised to unit area (Slaney)."""
    bins = np.linspace(0.0, RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(RATE / 2), MELS + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return triangles * (2.0 / (upper - lower))


@cache
def _window() -> np.ndarray:
    return np.hanning(N_FFT + 1)[:-1]  # periodic, as torch.hann_window


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper's log-mel features of exactly `SECONDS` of 16 kHz audio: (MELS, 800)."""
    x = np.asarray(audio, dtype=np.float32)
    n = RATE * SECONDS
    x = np.pad(x, (0, n - len(x))) if len(x) < n else x[:n]
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)  # the extractor's do_normalize
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * _window(), axis=-1)) ** 2
    mel = np.log10(np.maximum(mel_filters() @ power.T, 1e-10))[:, :-1]
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


def last_seconds(audio: np.ndarray) -> np.ndarray:
    """The model's window: the last `SECONDS` of the utterance, zeros before a shorter one."""
    n = RATE * SECONDS
    audio = np.asarray(audio, dtype=np.float32)
    return audio[-n:] if len(audio) >= n else np.pad(audio, (n - len(audio), 0))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bundled() -> Path | None:
    """Pipecat's wheel ships the file; found without importing pipecat (a large import)."""
    spec = find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "audio" / "turn" / "smart_turn" / "data" / MODEL_FILE
        if path.is_file() and _sha256(path) == MODEL_SHA256:
            return path
    return None


def _from_hub() -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = Path(hf_hub_download(MODEL_REPO, MODEL_FILE, revision=MODEL_REVISION))
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"{MODEL_REPO}: {MODEL_FILE} is not in the Hugging Face cache and cannot be "
            "downloaded (offline?)"
        ) from None
    except HfHubHTTPError as e:
        raise ConfigError(f"{MODEL_REPO}: cannot download {MODEL_FILE}: {e}") from None
    if _sha256(path) != MODEL_SHA256:
        raise ConfigError(f"{path}: not the published {MODEL_FILE} (its hash differs)")
    return path


def model_path(ref: str) -> Path:
    """`ref`: `smart-turn-v3.2` (pipecat's bundled copy if installed, else the hub, cached)
    or the path of an ONNX file of the same shape (a fine-tune)."""
    if ref == MODEL_NAME:
        return _bundled() or _from_hub()
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ConfigError(f"endpointing.turn_model: {ref}: no such file")
    return path


@dataclass
class SmartTurn:
    """One ONNX Runtime session; `probability` is safe to call from one worker thread."""

    session: object
    path: Path

    @classmethod
    def load(cls, ref: str = MODEL_NAME, threads: int = 1) -> SmartTurn:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("endpointing.turn_model needs the onnxruntime package") from None
        path = model_path(ref)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # its warnings about unused initialisers are noise
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own untyped errors on a bad file
            raise ConfigError(f"{path}: not a turn model ONNX Runtime can load ({e})") from None
        return cls(session, path)

    def probability(self, audio: np.ndarray) -> float:
        """That the utterance in `audio` (16 kHz, its end the latest sample) is complete."""
        features = log_mel(last_seconds(audio))[None]
        (out,) = self.session.run(None, {"input_features": features})  # type: ignore[attr-defined]
        return float(np.asarray(out).reshape(-1)[0])
