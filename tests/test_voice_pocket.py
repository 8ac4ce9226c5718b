"""Pocket TTS, the second `tts.backend`: a tiny model in mlx-audio's published layout,
loaded through mlx-audio's loader; answers spoken chunk by chunk as they are written,
interrupted, and in a voice cloned from a WAV file (`voice.pocket_tts`)."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.voice.pocket_tts import PocketSpeech, PocketSynthesizer
from tests.support.tiny_pocket import VOICE

FRAME = 1920  # 80 ms at 24 kHz, as the published model
ANSWER = "The capital of France is Paris. It is also the largest city in the country."


def write_wav(path: Path, seconds: float, pitch: float, rate: int = 16_000) -> Path:
    """A voice-like test signal (a tone with harmonics and noise) as 16-bit PCM."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(int(pitch))
    x = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in (1, 2, 3)) * 0.2
    x = x + rng.normal(0, 0.02, t.shape)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


def spoken(speech: PocketSpeech) -> list[np.ndarray]:
    frames = []
    while not speech.done:
        frame = speech.step()
        if frame is not None:
            frames.append(frame)
    return frames


def test_speech_comes_in_80_ms_frames_and_grows_with_the_text(pocket_synthesizer) -> None:
    tts = pocket_synthesizer
    assert (tts.sample_rate, tts.frame_samples) == (24_000, FRAME)
    short = list(tts.speak("Hello there."))
    long = list(tts.speak("Hello there, how are you today? I am fine, thanks for asking."))
    assert all(f.shape == (FRAME,) and f.dtype == np.float32 for f in short + long)
    assert all(np.abs(f).max() <= 1.0 for f in long)
    assert len(long) > len(short) > 0


def test_an_answer_is_spoken_before_it_is_written_to_the_end(pocket_synthesizer) -> None:
    """The text is a prefix of each chunk: nothing can be said of a clause not finished,
    but the first sentence plays while the rest is still being written."""
    speech = pocket_synthesizer.session()
    first, rest = ANSWER.split(" ", 6)[:6], ANSWER.split(" ", 6)[6]
    assert first[-1] == "Paris."
    for word in first:
        assert not speech.ready  # no clause ended yet: a step would have nothing to say
        speech.push(word + " ")
    # The sentence ended: its speech can start, the answer still being written.
    assert speech.ready and not speech.done
    frames = [speech.step() for _ in range(3)]
    assert all(f is not None for f in frames)
    speech.push(rest)
    speech.close()
    frames += spoken(speech)
    # Written word by word or given whole, the answer is cut into the same chunks.
    whole = np.concatenate(list(pocket_synthesizer.speak(ANSWER)))
    assert np.array_equal(np.concatenate(frames), whole)


def test_the_first_chunk_ends_at_a_clause_to_start_sooner(pocket_synthesizer) -> None:
    speech = pocket_synthesizer.session()
    speech.push("Well, ")
    assert not speech.ready  # too short a clause to be said alone
    speech.push("if you ask me, the answer ")
    assert speech.ready
    speech.step()
    speech.push("is yes, of course, ")
    assert speech.step() is not None  # the first clause is still being spoken
    speech.close()
    spoken(speech)
    assert [c.words for c in speech._chunks] == [
        ["Well,", "if", "you", "ask", "me,"],
        ["the", "answer", "is", "yes,", "of", "course,"],
    ]


def test_a_stopped_answer_leaves_the_next_one_as_from_a_fresh_start(
    pocket_model: Path, pocket_synthesizer, tmp_path: Path
) -> None:
    """Barge-in drops a session mid-chunk: the voice's state is restored for the next."""
    interrupted = pocket_synthesizer.session()
    interrupted.push(ANSWER)
    interrupted.close()
    for _ in range(5):
        interrupted.step()
    after = list(pocket_synthesizer.speak("Hello there."))
    fresh = PocketSynthesizer.load(str(pocket_model), VOICE, tmp_path, temperature=0.0)
    assert np.array_equal(np.concatenate(after), np.concatenate(list(fresh.speak("Hello there."))))


def test_what_was_heard_of_a_cut_off_answer(pocket_synthesizer) -> None:
    speech = pocket_synthesizer.session()
    speech.push(ANSWER)
    speech.close()
    frames = spoken(speech)
    first, second = speech._chunks
    assert speech.heard(0) == ""
    assert speech.heard(first.frames) == "The capital of France is Paris."
    assert speech.heard(len(frames)) == ANSWER
    half = speech.heard(first.frames + second.frames // 2).split()
    assert 6 < len(half) < len(ANSWER.split())


def test_frames_left_covers_what_is_still_to_say(pocket_synthesizer) -> None:
    speech = pocket_synthesizer.session()
    speech.push("Hello there, how are you today? ")
    before = speech.frames_left()
    speech.push("I am fine, thanks for asking, and you? ")
    assert speech.frames_left() > before
    speech.step()
    assert speech.frames_left() > 0


def test_a_voice_is_cloned_from_a_wav_once_and_kept(pocket_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cloned-voices"
    alto, bass = write_wav(tmp_path / "alto.wav", 3, 220), write_wav(tmp_path / "bass.wav", 3, 98)
    a = PocketSynthesizer.load(str(pocket_model), str(alto), cache, temperature=0.0)
    (kept,) = cache.iterdir()
    assert kept.name.startswith("alto.") and kept.suffix == ".safetensors"
    stamp = kept.stat().st_mtime_ns
    again = PocketSynthesizer.load(str(pocket_model), str(alto), cache, temperature=0.0)
    assert [p.name for p in cache.iterdir()] == [kept.name]
    assert kept.stat().st_mtime_ns == stamp  # read back, not encoded again
    b = PocketSynthesizer.load(str(pocket_model), str(bass), cache, temperature=0.0)
    assert len(list(cache.iterdir())) == 2
    said = {name: np.concatenate(list(t.speak("Hello there."))) for name, t in
            (("a", a), ("again", again), ("b", b))}  # fmt: skip
    assert np.array_equal(said["a"], said["again"])
    assert not np.array_equal(said["a"], said["b"])  # another voice speaks otherwise


def test_a_voice_embedding_file_is_a_voice(pocket_model: Path, tmp_path: Path) -> None:
    shipped = pocket_model / "embeddings" / f"{VOICE}.safetensors"
    by_file = PocketSynthesizer.load(str(pocket_model), str(shipped), tmp_path, temperature=0.0)
    by_name = PocketSynthesizer.load(str(pocket_model), VOICE.upper(), tmp_path, temperature=0.0)
    assert np.array_equal(
        np.concatenate(list(by_file.speak("Hi there."))),
        np.concatenate(list(by_name.speak("Hi there."))),
    )


@pytest.mark.parametrize(
    ("voice", "said"),
    [
        ("nobody", "tts.voice: nobody: neither a file nor a voice of"),
        ("short.wav", "s of audio; a voice is cloned from a few seconds of speech"),
        ("notes.wav", "not readable audio"),
    ],
)
def test_a_bad_voice_is_one_clear_line(
    pocket_model: Path, tmp_path: Path, voice: str, said: str
) -> None:
    write_wav(tmp_path / "short.wav", 0.4, 200)
    (tmp_path / "notes.wav").write_text("not audio at all")
    path = tmp_path / voice
    with pytest.raises(ConfigError) as e:
        PocketSynthesizer.load(
            str(pocket_model), str(path) if path.exists() else voice, tmp_path / "c"
        )
    assert said in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()  # nothing half-written


def test_weights_without_the_voice_encoder_say_so(pocket_model: Path, tmp_path: Path) -> None:
    """Kyutai publishes weights without voice cloning too: their voices still work."""
    folder = tmp_path / "no-cloning"
    shutil.copytree(pocket_model, folder)
    weights = mx.load(str(folder / "model.safetensors"))
    kept = {
        k: v for k, v in weights.items() if not k.startswith(("mimi.encoder", "mimi.downsample"))
    }
    mx.save_safetensors(str(folder / "model.safetensors"), kept)
    PocketSynthesizer.load(str(folder), VOICE, tmp_path / "c")
    with pytest.raises(ConfigError, match="cannot clone voices"):
        PocketSynthesizer.load(str(folder), str(write_wav(tmp_path / "v.wav", 2, 150)), tmp_path)


def test_not_a_pocket_model_is_one_clear_line(voice_models: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tts.model: .*(Pocket TTS|not a)"):
        PocketSynthesizer.load(str(voice_models / "tts"), VOICE, tmp_path)
    with pytest.raises(ConfigError, match="not a model folder or a Hugging Face repo id"):
        PocketSynthesizer.load(str(tmp_path / "missing" / "a" / "b"), VOICE, tmp_path)


def test_quantized_it_still_speaks(pocket_model: Path, tmp_path: Path) -> None:
    """`tts.quantize` packs the flow transformer's layers (the Mimi decoder stays)."""
    import mlx.nn as nn

    tts = PocketSynthesizer.load(str(pocket_model), VOICE, tmp_path, quantize=8)
    packed = [m for _, m in tts.model.flow_lm.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert packed and not any(
        isinstance(m, nn.QuantizedLinear) for _, m in tts.model.mimi.named_modules()
    )
    frames = list(tts.speak("Hello there."))
    assert frames and all(f.shape == (FRAME,) for f in frames)


def test_calibration_reports_the_rate_without_codebooks(pocket_model: Path, tmp_path) -> None:
    tts = PocketSynthesizer.load(str(pocket_model), VOICE, tmp_path)
    speed = tts.calibrate(True, 8, 1.2)
    assert speed.codebooks is None and speed.frame_seconds > 0
    assert speed.describe().startswith("Pocket TTS, ")
    assert tts.adapt(0.5) is None


def test_a_spoken_question_is_answered_in_the_pocket_voice(
    clocked_assistant, pocket_synthesizer, speech
) -> None:
    """The daemon speaks with Pocket TTS as with TTS 1.6B: the whole answer, aloud."""
    c = clocked_assistant(tts=pocket_synthesizer)
    c.say(speech("What is the capital of France?", lead_silence=0.3))
    c.run_until(lambda: c.rec.timings and not c.speaker.busy)
    (t,) = c.rec.timings
    assert "".join(c.rec.texts("answer")) == ANSWER
    assert t.first_audio_ms is not None and not t.interrupted
    # Two sentences of about 5 frames a word: the tiny model speaks until its length limit.
    assert c.speaker.played_samples >= len(ANSWER.split()) * 5 * FRAME


def test_list_voices_shows_both_backends(pocket_model: Path, tmp_path: Path) -> None:
    from mlx_harmony.voice.cli import main
    from tests.support.in_process import run_command

    config = tmp_path / "voice.json"
    config.write_text(json.dumps({"tts": {"backend": "pocket", "model": str(pocket_model)}}))
    r = run_command(main, "mlx-harmony-voice", "--config", str(config), "--list-voices")
    assert r.returncode == 0, r.stderr
    pocket, kyutai = r.stdout.split("\n\n")
    assert pocket.startswith("pocket (configured): Pocket TTS")
    assert f"  {VOICE.lower()}\n" in pocket and "  alba\n" in pocket
    assert "a WAV file" in pocket
    assert kyutai.startswith("kyutai: Kyutai TTS kyutai/tts-1.6b-en_fr")
