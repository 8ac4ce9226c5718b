"""Streaming text to speech with Kyutai's Pocket TTS (mlx-audio), in any voice.

Pocket TTS (100M parameters) is the second `tts.backend`: a frame costs it a quarter of
TTS 1.6B's time at 8 codebooks (H200), so it keeps up on machines where TTS 1.6B does not,
and it clones a voice from a few seconds of audio, which TTS 1.6B cannot (its voice
encoder is not released).

Its text is a prefix: a sentence's tokens go into the model before any of its audio, so
the text cannot be fed word by word as TTS 1.6B's is. The answer is spoken in chunks as
the model writes it: the first chunk ends at the first clause (a comma after a few words)
or after `FIRST_CHUNK_MAX_WORDS` words, so that speech starts early, the next ones are
the complete sentences written by the time the previous chunk has been spoken, at most
`MAX_CHUNK_WORDS` words (the model's own limit is 50 tokens). Each chunk is mlx-audio's
own per-chunk generator, stepped one 80 ms frame at a time (`generate_audio_stream` runs
them back to back for a whole text, which an answer being written is not).

A voice is a name (the model folder's `embeddings/`, or Kyutai's catalog on the hub), an
embedding file, or an audio file whose voice is cloned: encoded once with the model's Mimi
encoder and kept in `tts.voice_cache` (keyed by the audio's and the model's contents).
"""

from __future__ import annotations

import hashlib
import os
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.voice.config import TtsSection
from mlx_harmony.voice.synthesis import SteppedHere, spoken_frames
from mlx_harmony.voice.tts_speed import TtsSpeed

# Spoken to nobody at start-up, to time this machine's frames.
CALIBRATION_TEXT = "One moment please, I am checking how fast I can speak on this machine today."
# A chunk ends at a sentence's end followed by a space; the first one of an answer also at
# a clause's, once it has this many words (speech starts sooner, at some cost in prosody).
SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")
CLAUSE_END = re.compile(r"[,;:][\"')\]]*\s")
FIRST_CHUNK_WORDS = 4
# Nor does the first chunk wait for more words than this (cut at a word): a long first
# sentence written slowly would keep the answer silent for seconds.
FIRST_CHUNK_MAX_WORDS = 12
MAX_CHUNK_WORDS = 30  # about 50 tokens, the model's chunk limit; cut at a word without an end
# Speech is about 2.5 words a second: 5 frames of 80 ms a word errs towards longer, which
# sizes the playout buffer (`voice.playout`) on the safe side.
FRAMES_PER_WORD = 5
# A cloned voice: at least this much audio, and no more than this is used (every chunk of
# every answer attends over the voice's frames: a longer prompt is slower, not better).
MIN_VOICE_SECONDS = 1.0
MAX_VOICE_SECONDS = 15.0
QUANTIZE_GROUP = 32
# What a Pocket TTS model folder holds (as mlx-audio's converter writes it).
MODEL_FILES = [
    "*.json",
    "*.safetensors",
    "*.model",
    "voices/*",
    "embeddings/*",
]  # the group size mlx-audio's converter uses for Pocket TTS


def model_voices(folder: Path) -> dict[str, Path]:
    """Voice embeddings shipped in a model folder, by lowercase name (as mlx-audio finds
    them: `voices/` and `embeddings/`)."""
    return {
        p.stem.lower(): p
        for sub in ("voices", "embeddings")
        for p in sorted((folder / sub).glob("*.safetensors"))
    }


def catalog_voices() -> list[str]:
    """Kyutai's published Pocket TTS voices (fetched from the hub when first used)."""
    from mlx_audio.tts.models.pocket_tts.utils import PREDEFINED_VOICES

    return list(PREDEFINED_VOICES)


def list_voices(model_ref: str) -> list[str]:
    """The voice names `tts.voice` takes with this model (besides files); a hub model's own
    are listed where it is downloaded."""
    folder = model_folder(model_ref, download=False)
    names = list(model_voices(folder)) if folder is not None else []
    return sorted(set(names)) + [n for n in catalog_voices() if n not in names]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _save_atomically(path: Path, arrays: dict[str, mx.array]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".safetensors")
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@dataclass
class _Chunk:
    """A piece of the answer spoken as one: its words, and its frames so far."""

    words: list[str]
    first_frame: int
    frames: int = 0
    finished: bool = False


class PocketSynthesizer:
    """Pocket TTS with one voice, speaking answers as `PocketSpeech` sessions."""

    def __init__(self, model: Any, voice_state: dict[str, Any], prompt_frames: int) -> None:
        self.model = model
        self.voice_state = voice_state
        self.prompt_frames = prompt_frames
        self.sample_rate = int(model.sample_rate)
        self.frame_samples = int(model.mimi.frame_size)
        self.speed: TtsSpeed | None = None

    @classmethod
    def load(
        cls,
        ref: str,
        voice: str,
        voice_cache: Path,
        quantize: int | None = None,
        temperature: float | None = None,
    ) -> PocketSynthesizer:
        folder = model_folder(ref)
        assert folder is not None
        model = load_model(folder)
        if temperature is not None:
            model.temp = temperature
        if quantize is not None:
            # The flow transformer only: Mimi, which encodes a cloned voice and decodes
            # every frame, keeps its weights (and a cloned voice's file stays valid).
            nn.quantize(
                model.flow_lm,
                group_size=QUANTIZE_GROUP,
                bits=quantize,
                class_predicate=lambda _, m: (
                    isinstance(m, nn.Linear) and m.weight.shape[-1] % QUANTIZE_GROUP == 0
                ),
            )
        state, frames = voice_state(model, folder, voice, voice_cache)
        return cls(model, state, frames)

    @classmethod
    def from_config(cls, t: TtsSection) -> PocketSynthesizer:
        cache = t.voice_cache or Path.home() / ".cache" / "mlx-harmony" / "cloned-voices"
        return cls.load(t.model, t.voice, Path(cache).expanduser(), t.quantize, t.temperature)

    @property
    def frame_seconds(self) -> float:
        return self.frame_samples / self.sample_rate

    def calibrate(self, auto: bool, floor: int, margin: float) -> TtsSpeed:
        """Time this machine's frames (the first two of a session, which compile and
        prefill, are not counted). There is nothing to choose: the rate is reported, and
        the playout buffer (`voice.playout`) keeps a slower machine from gaps."""
        del auto, floor  # Pocket TTS has no codebooks to cut
        frames: list[float] = []
        start = time.perf_counter()
        for i, _ in enumerate(self.speak(CALIBRATION_TEXT)):
            now = time.perf_counter()
            if i >= 2:
                frames.append(now - start)
            start = now
            if len(frames) >= 8:
                break
        if not frames:
            raise RuntimeError("the TTS gave no audio for its calibration text")
        self.speed = TtsSpeed(
            codebooks=None,
            of=None,
            frame_seconds=statistics.median(frames),
            audio_seconds=self.frame_seconds,
            chosen=False,
            margin=margin,
        )
        return self.speed

    def adapt(self, observed_rate: float) -> TtsSpeed | None:
        """Nothing to cut where answers ran slower than measured (the playout buffer
        learns the pace instead)."""
        return None

    def warmup(self) -> None:
        for _ in self.speak("ok"):
            pass

    def session(self, batch: bool = True) -> PocketSpeech:
        del batch  # TTS 1.6B's batched text-only delay; Pocket TTS has no delay
        return PocketSpeech(self)

    def speak(self, text: str) -> Iterator[np.ndarray]:
        return spoken_frames(self.session(), text)


class PocketSpeech(SteppedHere):
    """One answer's speech: its text pushed as it is written, frames stepped out of it."""

    def __init__(self, synth: PocketSynthesizer) -> None:
        self.synth = synth
        self.closed = False
        self._text = ""  # pushed, not yet in a chunk
        self._chunks: list[_Chunk] = []
        self._frames: Iterator[mx.array] | None = None  # the chunk being spoken
        self.frames = 0
        self.last_steps = 0  # model steps the last `step()` ran

    def push(self, text: str) -> None:
        self._text += text

    def close(self) -> None:
        self.closed = True

    @property
    def ready(self) -> bool:
        """A step would give audio now, not wait for more of the answer's text."""
        return self._frames is not None or self._cut() is not None

    @property
    def done(self) -> bool:
        return self.closed and self._frames is None and not self._text.strip()

    def step(self) -> np.ndarray | None:
        """The next 80 ms of audio; a chunk's first frame also prefills its text."""
        self.last_steps = 0
        while True:
            if self._frames is None and not self._start():
                return None
            assert self._frames is not None
            self.last_steps += 1
            try:
                audio = next(self._frames)
            except StopIteration:
                self._chunks[-1].finished = True
                self._frames = None
                continue
            self._chunks[-1].frames += 1
            self.frames += 1
            return np.clip(np.array(audio, dtype=np.float32), -1.0, 1.0)

    def _cut(self) -> int | None:
        """Where the next chunk ends in the pending text, if one is complete."""
        text = self._text
        if not text.strip():
            return None
        ends = [m.end() for m in SENTENCE_END.finditer(text)]
        if self.closed:
            ends.append(len(text))  # the last words end where the answer does
        if not self._chunks:
            ends += [
                m.end()
                for m in CLAUSE_END.finditer(text)
                if len(text[: m.end()].split()) >= FIRST_CHUNK_WORDS
            ]
        most = MAX_CHUNK_WORDS if self._chunks else FIRST_CHUNK_MAX_WORDS
        fitting = [e for e in ends if len(text[:e].split()) <= most]
        if fitting:
            return max(fitting) if self._chunks else min(fitting)
        if ends or len(text.split()) > most:
            # A sentence longer than a chunk: cut it at a word.
            words = re.finditer(r"\S+\s", text)
            return [m.end() for m in words][most - 1]
        return None

    def _start(self) -> bool:
        from mlx_audio.tts.models.pocket_tts.pocket_tts import prepare_text_prompt

        cut = self._cut()
        if cut is None:
            return False
        chunk, self._text = self._text[:cut].strip(), self._text[cut:]
        model, synth = self.synth.model, self.synth
        prepared, frames_after_eos = prepare_text_prompt(chunk)
        # Back to the voice alone: every chunk is spoken after the voice, as upstream.
        model._slice_flow_cache(synth.voice_state, synth.prompt_frames)
        self._frames = iter(
            model._generate_audio_stream_short_text(
                model_state=synth.voice_state,
                text_to_generate=prepared,
                frames_after_eos=frames_after_eos + 2,
            )
        )
        self._chunks.append(_Chunk(chunk.split(), self.frames))
        return True

    def frames_left(self) -> int:
        """About how many more frames the text pushed so far makes (a word a
        `FRAMES_PER_WORD`; a chunk spoken longer than that is taken to end soon)."""
        left = self.frames_for_words(len(self._text.split()))
        if self._frames is not None:
            chunk = self._chunks[-1]
            left += max(self.frames_for_words(len(chunk.words)) - chunk.frames, 2)
        return left

    def frames_for_words(self, words: int) -> int:
        return words * FRAMES_PER_WORD

    def heard(self, frames_played: int) -> str:
        """The words whose audio was among the first `frames_played` frames: a chunk's
        words are taken as spread evenly over its frames."""
        heard: list[str] = []
        for chunk in self._chunks:
            played = frames_played - chunk.first_frame
            if played <= 0:
                break
            total = chunk.frames if chunk.finished else None
            if total is not None and played >= total:
                heard += chunk.words
                continue
            span = total or max(chunk.frames, self.frames_for_words(len(chunk.words)))
            heard += chunk.words[: len(chunk.words) * played // max(span, 1)]
            break
        return " ".join(heard)


def model_folder(ref: str, download: bool = True) -> Path | None:
    """The model's local folder: `ref` itself, or the hub repo's snapshot (downloaded
    unless `download` is off: None where it is not in the cache)."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists() or ref.count("/") != 1:
        raise ConfigError(
            f"tts.model: {ref}: not a model folder or a Hugging Face repo id (owner/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(ref, allow_patterns=MODEL_FILES, local_files_only=not download)
        )
    except LocalEntryNotFoundError:
        if not download:
            return None
        raise ConfigError(
            f"tts.model: {ref} is not in the local Hugging Face cache and cannot be "
            "downloaded (offline?); download it once or give a local folder"
        ) from None
    except HfHubHTTPError as e:
        raise ConfigError(f"tts.model: {ref}: cannot download it: {_first_line(e)}") from None


def load_model(folder: Path) -> Any:
    """Pocket TTS from its folder, through mlx-audio's loader."""
    from mlx_audio.tts.utils import load

    try:
        model = load(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"tts.model: {folder}: cannot load Pocket TTS: {_first_line(e)}"
        ) from None
    if getattr(model, "model_type", None) != "pocket_tts":
        raise ConfigError(f"tts.model: {folder}: not a Pocket TTS model (tts.backend is pocket)")
    return model


def voice_state(model: Any, folder: Path, voice: str, cache: Path) -> tuple[dict[str, Any], int]:
    """The model's state after the voice's prompt, and the prompt's length in frames."""
    prompt = _voice_prompt(model, folder, voice, cache)
    try:
        state = model.get_state_for_audio_prompt(prompt)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"tts.voice: {voice}: {_first_line(e)}") from None
    frames = model._get_flow_cache_num_frames(state)
    # Evaluated now, on the loading thread: left lazy, the arrays would belong to its
    # streams and a server's model worker could not speak with them.
    mx.eval([[c.keys, c.values] for c in state["flow_cache"] if c.keys is not None])
    return state, frames


def _voice_prompt(model: Any, folder: Path, voice: str, cache: Path) -> str:
    """What mlx-audio's `get_state_for_audio_prompt` takes for `voice`: an embedding file
    or a catalog name."""
    path = Path(voice).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            return str(path)
        return str(clone_voice(model, folder, path, cache))
    shipped = model_voices(folder)
    if voice.lower() in shipped:
        return str(shipped[voice.lower()])
    if voice.lower() in catalog_voices():
        return voice.lower()
    raise ConfigError(
        f"tts.voice: {voice}: neither a file nor a voice of {folder} "
        "(mlx-harmony-voice --list-voices lists them)"
    )


def clone_voice(model: Any, folder: Path, audio: Path, cache: Path) -> Path:
    """`audio`'s voice as an embedding file in `cache`, encoded once per audio file and
    model (the file's name holds a digest of both)."""
    if model.mimi.encoder is None:
        raise ConfigError(
            f"tts.voice: {audio}: {folder} cannot clone voices (published without the voice "
            "encoder): use one of its voices or the kyutai/pocket-tts weights"
        )
    # The embedding depends on the audio and on the weights that encode it, nothing else.
    encoding = [
        v
        for k, v in tree_flatten(model.mimi.parameters())
        if k.startswith(("encoder", "downsample"))
    ]
    weights = [
        np.array(w, dtype=np.float32).tobytes() for w in [model.speaker_proj_weight, *encoding]
    ]
    key = _digest(audio.read_bytes(), *weights)
    out = cache / f"{audio.stem}.{key}.safetensors"
    if out.is_file():
        return out
    from mlx_audio.utils import load_audio

    try:
        pcm = load_audio(str(audio), sample_rate=model.sample_rate)
    except Exception as e:  # miniaudio's decoders raise their own types
        raise ConfigError(f"tts.voice: {audio}: not readable audio ({_first_line(e)})") from None
    seconds = pcm.shape[-1] / model.sample_rate
    if seconds < MIN_VOICE_SECONDS:
        raise ConfigError(
            f"tts.voice: {audio}: {seconds:.1f} s of audio; a voice is cloned from a few "
            f"seconds of speech (at least {MIN_VOICE_SECONDS:g} s)"
        )
    pcm = pcm.reshape(-1)[: int(MAX_VOICE_SECONDS * model.sample_rate)]
    prompt = model._encode_audio(pcm[None, None, :].astype(mx.float32))
    try:
        _save_atomically(out, {"audio_prompt": prompt})
    except OSError as e:
        raise ConfigError(f"tts.voice_cache: {cache}: cannot keep the cloned voice: {e}") from None
    return out
