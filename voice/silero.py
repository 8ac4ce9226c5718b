"""The Silero VAD model, run with numpy from the weights its wheel ships.

The `silero-vad` package runs its model through PyTorch or ONNX Runtime, neither of which
this project otherwise needs; its wheel also ships the 16 kHz model as safetensors
(`silero_vad_16k.safetensors`, the layout of its `tinygrad_model.py`). The network is a
fixed STFT convolution, four small convolutions, one LSTM cell and a sigmoid head: a few
matrix products per 32 ms window, which numpy runs in well under a millisecond.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from mlx_harmony.llm.errors import ConfigError

RATE = 16_000
WINDOW = 512  # samples per decision at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the model sees again
REFLECT = 64


def _conv1d(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pad: int
) -> np.ndarray:
    """x: (C_in, L), w: (C_out, C_in, K) in PyTorch layout."""
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad)))
    k = w.shape[2]
    n = (x.shape[1] - k) // stride + 1
    cols = np.stack([x[:, i * stride : i * stride + k] for i in range(n)], axis=0)  # (n, C_in, K)
    y = np.einsum("nck,ock->on", cols, w)
    return y + b[:, None] if b is not None else y


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SileroVad:
    """Speech probability per 512-sample window of 16 kHz audio; keeps its own state."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.w = {k: v.astype(np.float32) for k, v in weights.items()}
        self.reset()

    @classmethod
    def load(cls) -> SileroVad:
        # find_spec locates the package without importing it (its __init__ imports torch).
        spec = find_spec("silero_vad")
        try:
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError("silero-vad is not installed")
            folder = Path(next(iter(spec.submodule_search_locations)))
            return cls(load_file(str(folder / "data" / "silero_vad_16k.safetensors")))
        except FileNotFoundError as e:
            raise ConfigError(
                f"endpointing.detector 'silero' needs the silero-vad package's weights ({e})"
            ) from None

    def reset(self) -> None:
        self.h = np.zeros(128, dtype=np.float32)
        self.c = np.zeros(128, dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)

    def __call__(self, window: np.ndarray) -> float:
        w = self.w
        x = np.concatenate([self.context, window.astype(np.float32)])
        self.context = x[-CONTEXT:]
        x = np.pad(x, (0, REFLECT), mode="reflect")[None]  # (1, 640)
        spec = _conv1d(x, w["stft_conv.weight"], None, stride=128, pad=0)
        cutoff = spec.shape[0] // 2
        x = np.sqrt(spec[:cutoff] ** 2 + spec[cutoff:] ** 2)
        x = np.maximum(_conv1d(x, w["conv1.weight"], w["conv1.bias"], 1, 1), 0)
        x = np.maximum(_conv1d(x, w["conv2.weight"], w["conv2.bias"], 2, 1), 0)
        x = np.maximum(_conv1d(x, w["conv3.weight"], w["conv3.bias"], 2, 1), 0)
        x = np.maximum(_conv1d(x, w["conv4.weight"], w["conv4.bias"], 1, 1), 0)[:, 0]
        gates = (
            w["lstm_cell.weight_ih"] @ x
            + w["lstm_cell.bias_ih"]
            + w["lstm_cell.weight_hh"] @ self.h
            + w["lstm_cell.bias_hh"]
        )
        i, f, g, o = np.split(gates, 4)  # PyTorch's LSTMCell gate order
        self.c = _sigmoid(f) * self.c + _sigmoid(i) * np.tanh(g)
        self.h = _sigmoid(o) * np.tanh(self.c)
        out = _conv1d(
            np.maximum(self.h, 0)[:, None], w["final_conv.weight"], w["final_conv.bias"], 1, 0
        )
        return float(_sigmoid(out).mean())


class SileroDetector:
    """A block detector: resamples to 16 kHz, speech if any window in the block is."""

    def __init__(self, vad: SileroVad, sample_rate: int, threshold: float) -> None:
        self.vad, self.rate, self.threshold = vad, sample_rate, threshold
        self._buf = np.zeros(0, dtype=np.float32)
        self.last = 0.0

    @classmethod
    def load(cls, sample_rate: int, threshold: float) -> SileroDetector:
        return cls(SileroVad.load(), sample_rate, threshold)

    def probability(self, block: np.ndarray) -> float:
        if self.rate != RATE:
            n = round(len(block) * RATE / self.rate)
            # Linear interpolation is enough for a speech/no-speech decision.
            block = np.interp(
                np.arange(n) * (self.rate / RATE), np.arange(len(block)), block
            ).astype(np.float32)
        self._buf = np.concatenate([self._buf, block])
        probs = []
        while len(self._buf) >= WINDOW:
            probs.append(self.vad(self._buf[:WINDOW]))
            self._buf = self._buf[WINDOW:]
        if probs:
            self.last = max(probs)
        return self.last

    def __call__(self, block: np.ndarray) -> bool:
        return self.probability(block) > self.threshold
