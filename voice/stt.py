"""Streaming speech to text with Kyutai's delayed-streams STT models (moshi-mlx).

Audio goes in 80 ms frames (1,920 samples at 24 kHz) while the user speaks; each frame is
one Mimi `encode_step` and one `LmGen` step, which may emit a text piece. The model
transcribes with a fixed delay (`stt_config.audio_delay_seconds`), so when the user stops,
`finish()` feeds that many frames of silence and the transcript is complete: no second
pass over the utterance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import numpy as np
from moshi_mlx import models
from moshi_mlx.utils.sampling import Sampler

from mlx_harmony.voice.checkpoints import Checkpoint, load_checkpoint
from mlx_harmony.voice.moshi_internals import StreamPosition

FRAME = 1_920  # one Mimi frame: 80 ms at 24 kHz
# Text tokens that carry no text: 0 is the end-of-padding marker and 3 padding
# (the ids Kyutai's own inference scripts skip).
SILENT_TOKENS = (0, 3)
# Frames of silence fed past the model's delay, so the last word's pieces come out even
# when it ends right on a frame boundary.
FLUSH_MARGIN_FRAMES = 3
# Of the STT's extra heads (pauses of about 0.5, 1, 2 and 3 s ahead), the one Kyutai's own
# tools read for the end of a turn, and its output that means "a pause comes".
PAUSE_HEAD = 2


class Transcriber:
    """One utterance at a time: `start()`, `feed()` audio as it arrives, `finish()`."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        temperature: float = 0.0,
        max_seconds: float = 60.0,
        on_piece: Callable[[str], None] | None = None,
    ) -> None:
        self.lm, self.mimi, self.tokenizer = checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer
        stt_config = checkpoint.raw_config.get("stt_config") or {}
        frame_rate = self.mimi.frame_rate
        self.delay_frames = math.ceil(stt_config.get("audio_delay_seconds", 0.0) * frame_rate)
        self.prefix_frames = math.ceil(
            stt_config.get("audio_silence_prefix_seconds", 0.0) * frame_rate
        )
        self.codebooks = checkpoint.lm.cfg.other_codebooks
        self.temperature = temperature
        self.on_piece = on_piece
        self.max_steps = (
            self.prefix_frames
            + math.ceil(max_seconds * frame_rate)
            + self.delay_frames
            + FLUSH_MARGIN_FRAMES
            + 2
        )
        self._pending = np.zeros(0, dtype=np.float32)
        self._pieces: list[str] = []
        self._gen: models.LmGen | None = None
        # The published -mlx weights have no extra heads; the -candle ones do.
        self.predicts_pauses = len(self.lm.extra_heads) > PAUSE_HEAD
        self.pause: float | None = None  # the last frame's pause probability
        self.frames_fed = 0

    @classmethod
    def load(cls, ref: str, quantize: int | None = None, **kwargs) -> Transcriber:
        return cls(load_checkpoint(ref, generating_audio=False, quantize=quantize), **kwargs)

    def warmup(self) -> None:
        """Run the model once, so that the first real frame is not slowed by compilation."""
        self.start()
        self.feed(np.zeros(FRAME * 2, dtype=np.float32))
        self._gen = None

    def start(self) -> None:
        self.pause = None
        for cache in self.lm.transformer_cache:
            cache.reset()
        self.mimi.reset_all()
        sampler = Sampler(temp=self.temperature, top_k=25)
        self._gen = models.LmGen(
            model=self.lm,
            max_steps=self.max_steps,
            text_sampler=sampler,
            audio_sampler=Sampler(temp=self.temperature),
        )
        self._pending = np.zeros(0, dtype=np.float32)
        self._pieces = []
        self.frames_fed = 0
        for _ in range(self.prefix_frames):
            self._step(np.zeros(FRAME, dtype=np.float32))

    @property
    def text(self) -> str:
        """The utterance's transcript so far."""
        return "".join(self._pieces).strip()

    @property
    def active(self) -> bool:
        return self._gen is not None

    @property
    def room(self) -> int:
        """Frames that can still be fed before `finish()` must be called."""
        if self._gen is None:
            return 0
        return self.max_steps - self._gen.step_idx - self.delay_frames - FLUSH_MARGIN_FRAMES

    def feed(self, pcm: np.ndarray) -> str:
        """Add 24 kHz mono samples; return the text pieces this audio completed."""
        if self._gen is None:
            raise RuntimeError("feed() before start()")
        pcm = np.concatenate([self._pending, pcm.astype(np.float32, copy=False)])
        out = []
        while len(pcm) >= FRAME and self.room > 0:
            out.append(self._step(pcm[:FRAME]))
            pcm = pcm[FRAME:]
        self._pending = pcm if self.room > 0 else np.zeros(0, dtype=np.float32)
        return "".join(out)

    def finish(self, silence_s: float = 0.0) -> str:
        """Flush the model's delay with silence; return the whole utterance's transcript.

        `silence_s`: how much of the audio given last was silence (the silence that ended
        the utterance). The delay has already run over the frames it filled, so only the
        rest is flushed: after 700 ms of silence almost nothing, and each frame not fed
        is a model step less between the end of speech and the answer."""
        text = self._flush(silence_s)
        self._gen = None
        return text

    def peek(self, silence_s: float = 0.0) -> str:
        """The transcript `finish(silence_s)` would give now, the utterance going on as if
        it had not been asked: a speculative start takes the words at a pause, and if the
        user speaks on, the same stream (its context, its pause predictions) hears the
        rest. The flush's steps are undone by putting back the position of every stream
        in the model and the codec (`StreamPosition`)."""
        assert self._gen is not None
        position = StreamPosition.of(self._gen, self.lm, self.mimi)
        pieces, pending, pause, fed = list(self._pieces), self._pending, self.pause, self.frames_fed
        text = self._flush(silence_s)
        position.restore()
        self._pieces, self._pending, self.pause, self.frames_fed = pieces, pending, pause, fed
        return text

    def stop(self) -> None:
        """End the utterance without flushing: its words are not wanted (or were taken)."""
        self._gen = None

    def _flush(self, silence_s: float) -> str:
        if self._gen is None:
            raise RuntimeError("finish() before start()")
        silent_fed = max(0, round(silence_s * self.mimi.sample_rate) - len(self._pending))
        already = min(math.ceil(silent_fed / FRAME), self.frames_fed - self.prefix_frames)
        flush = max(0, self.delay_frames + FLUSH_MARGIN_FRAMES - already)
        if flush:
            tail = np.zeros(FRAME, dtype=np.float32)
            tail[: len(self._pending)] = self._pending
            self._step(tail)
        for _ in range(flush - 1):
            self._step(np.zeros(FRAME, dtype=np.float32))
        return "".join(self._pieces).strip()

    def _is_text(self, tid: int) -> bool:
        tok = self.tokenizer
        return tid < tok.vocab_size() and not tok.is_control(tid) and not tok.is_unknown(tid)  # type: ignore[attr-defined]

    def _step(self, frame: np.ndarray) -> str:
        assert self._gen is not None
        codes = self.mimi.encode_step(mx.array(frame)[None, None])  # (1, codebooks, 1)
        if self.predicts_pauses:
            token, heads = self._gen.step_with_extra_heads(codes[:, : self.codebooks, 0])
            self.pause = float(heads[PAUSE_HEAD].reshape(-1, heads[PAUSE_HEAD].shape[-1])[-1, 0])
        else:
            token = self._gen.step(codes[:, : self.codebooks, 0])
        self.frames_fed += 1
        tid = int(token[0].item())
        if tid in SILENT_TOKENS or not self._is_text(tid):
            return ""
        piece = self.tokenizer.id_to_piece(tid).replace("▁", " ")  # type: ignore[attr-defined]
        self._pieces.append(piece)
        if self.on_piece is not None:
            self.on_piece(piece)
        return piece
