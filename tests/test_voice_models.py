"""Kyutai STT/TTS through moshi-mlx, loaded from tiny folders in the published layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.voice import tts as tts_module
from mlx_harmony.voice.moshi_internals import backbone_offset
from mlx_harmony.voice.stt import FRAME, Transcriber
from mlx_harmony.voice.tts import Synthesizer


def test_speech_is_synthesized_frame_by_frame_on_demand(synthesizer: Synthesizer) -> None:
    frames = synthesizer.speak("hello there how are you")
    first = next(frames)  # the first 80 ms exist before the rest is generated
    assert first.shape == (FRAME,) and first.dtype == np.float32
    rest = list(frames)
    audio = np.concatenate([first, *rest])
    assert len(rest) > 5
    assert np.sqrt(np.mean(audio**2)) > 1e-3  # sound, not silence
    assert np.abs(audio).max() <= 1.0


def test_more_words_make_more_speech(synthesizer: Synthesizer) -> None:
    short = sum(1 for _ in synthesizer.speak("hello"))
    long = sum(1 for _ in synthesizer.speak("hello there how are you today my friend"))
    assert long > short


def test_a_stopped_utterance_leaves_the_next_one_intact(synthesizer: Synthesizer) -> None:
    whole = np.concatenate(list(synthesizer.speak("one two three")))
    stopped = synthesizer.speak("what is the weather like in tokyo")
    next(stopped)
    stopped.close()  # barge-in
    again = np.concatenate(list(synthesizer.speak("one two three")))
    assert len(again) == len(whole)


def _drain(session) -> np.ndarray:
    frames = []
    while session.ready:
        frame = session.step()
        if frame is not None:
            frames.append(frame)
    return np.concatenate(frames) if frames else np.zeros(0, dtype=np.float32)


def test_words_pushed_as_they_come_sound_as_the_whole_text(synthesizer: Synthesizer) -> None:
    """One session per answer, fed piece by piece as a model writes: the same tokens, so
    the same audio, as the text in one piece (greedy); it waits for words rather than
    ending early, and never steps past the text it has."""
    text = "The capital of France is Paris. It is also the largest city in the country."
    whole = np.concatenate(list(synthesizer.speak(text)))
    session = synthesizer.session()
    session.push("The")
    assert not session.ready  # no step before the first word, which nothing ends yet
    pieces, waited = [], 0
    for piece in [" cap", "ital of", " France", " is Par", "is. It is also", " the",
                  " largest city in", " the country."]:  # fmt: skip
        session.push(piece)
        pieces.append(_drain(session))
        waited += not session.ready and not session.done  # out of words: it waits
    session.close()
    pieces.append(_drain(session))
    assert session.done and waited > 0
    assert np.array_equal(np.concatenate(pieces), whole)


def test_a_session_knows_which_words_were_heard(synthesizer: Synthesizer) -> None:
    session = synthesizer.session()
    session.push("one two three four five six seven eight nine ten")
    session.close()
    frames = 0
    while not session.done:
        frames += session.step() is not None
    assert session.heard(0) == ""
    assert session.heard(frames) == "one two three four five six seven eight nine ten"
    partly = session.heard(frames // 2)
    assert partly and "one two three four five six seven eight nine ten".startswith(partly)
    assert partly != session.heard(frames)


def test_streaming_stt_emits_text_while_audio_arrives(
    transcriber: Transcriber, synthesizer: Synthesizer
) -> None:
    speech = np.concatenate(list(synthesizer.speak("hello there how are you today")))
    pieces: list[str] = []
    transcriber.on_piece = pieces.append
    try:
        transcriber.start()
        during = ""
        for i in range(0, len(speech), FRAME):
            during += transcriber.feed(speech[i : i + FRAME])
        fed = transcriber.frames_fed
        text = transcriber.finish()
    finally:
        transcriber.on_piece = None
    assert fed == len(speech) // FRAME + transcriber.prefix_frames
    assert during, "pieces come out while the audio is still being fed"
    assert text == "".join(pieces).strip()
    assert text.startswith(during.strip()[:5])


def test_finish_flushes_exactly_the_model_delay(transcriber: Transcriber) -> None:
    transcriber.start()
    transcriber.feed(np.zeros(FRAME * 3 + 100, dtype=np.float32))
    before = transcriber.frames_fed
    transcriber.finish()
    # The partial frame, then the delay (0.5 s = 7 frames at 12.5 Hz) and a small margin.
    assert transcriber.frames_fed - before == 1 + 7 + 2


def test_silence_already_heard_is_not_flushed_again(
    transcriber: Transcriber, synthesizer: Synthesizer
) -> None:
    """The silence that ended an utterance has already carried the model's delay that
    far: finishing after it steps only the rest, and the transcript is the one a full
    flush gives (the same audio, the same number of frames)."""
    speech = np.concatenate(list(synthesizer.speak("hello there how are you today")))
    speech = speech[: len(speech) - 700]  # not on a frame boundary
    silence = np.zeros(FRAME * 5, dtype=np.float32)

    def utterance(audio: np.ndarray, silence_s: float) -> tuple[str, int, int]:
        transcriber.start()
        transcriber.feed(audio)
        before = transcriber.frames_fed
        text = transcriber.finish(silence_s)
        return text, before, transcriber.frames_fed

    full, _, total = utterance(speech, 0.0)
    early, before, early_total = utterance(np.concatenate([speech, silence]), 0.4)
    assert early_total == total and early_total - before == 5 and early == full
    # 700 ms of silence heard: one frame is left of the delay and margin (10 frames).
    _, before, after = utterance(np.concatenate([speech, np.zeros(FRAME * 9, np.float32)]), 0.72)
    assert after - before == 1
    # More silence than was fed (the STT was not given it) is not counted.
    _, before, after = utterance(np.zeros(FRAME * 2, np.float32), 3.0)
    assert after - before == 10 - 2


def test_an_utterance_longer_than_the_budget_is_cut_not_crashed(voice_models: Path) -> None:
    stt = Transcriber.load(str(voice_models / "stt"), max_seconds=1)
    stt.start()
    stt.feed(np.zeros(FRAME * 40, dtype=np.float32))
    assert stt.room == 0
    stt.finish()


def test_missing_files_are_named(voice_models: Path, tmp_path: Path) -> None:
    broken = tmp_path / "stt"
    shutil.copytree(voice_models / "stt", broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"stt: missing model\.safetensors"):
        Transcriber.load(str(broken))


def test_weights_that_do_not_match_the_config_are_refused(
    voice_models: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "stt"
    shutil.copytree(voice_models / "stt", broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_layers"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model\.safetensors: weights do not match"):
        Transcriber.load(str(broken))


def test_not_a_folder_nor_a_repo_id() -> None:
    with pytest.raises(ConfigError, match="not a model folder or a Hugging Face repo id"):
        Transcriber.load("no/such/folder/here")


def test_an_uncached_repo_offline_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        Transcriber.load("kyutai/stt-1b-en_fr-mlx")


def test_voice_by_name_path_or_missing(voice_models: Path) -> None:
    tts = voice_models / "tts"
    voice = next((tts / "voices").iterdir())
    by_path = Synthesizer.load(str(tts), str(voice), "unused/repo")
    assert sum(1 for _ in by_path.speak("ok")) > 0
    with pytest.raises(ConfigError, match=r"missing nobody\.0badcafe@7\.safetensors"):
        Synthesizer.load(str(tts), "nobody", str(tts / "voices"))


def test_cfg_value_must_be_one_the_model_was_distilled_for(voice_models: Path) -> None:
    tts = voice_models / "tts"
    with pytest.raises(ConfigError, match=r"tts\.cfg_coef: 2\.2 is not one of 1, 1\.5, 2"):
        Synthesizer.load(str(tts), "tiny-voice", str(tts / "voices"), cfg_coef=2.2)


def test_quantized_models_still_run(voice_models: Path) -> None:
    import mlx.nn as nn

    stt = Transcriber.load(str(voice_models / "stt"), quantize=8, max_seconds=5)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in stt.lm.named_modules())
    stt.start()
    stt.feed(np.zeros(FRAME * 2, dtype=np.float32))
    stt.finish()


@pytest.fixture
def tts_folder(voice_models: Path) -> Path:
    return voice_models / "tts"


def load_tts(folder: Path, **kwargs) -> Synthesizer:
    kwargs.setdefault("temperature", 0.0)
    return Synthesizer.load(str(folder), "tiny-voice", str(folder / "voices"), **kwargs)


def test_skipping_the_depformer_in_the_text_only_delay_changes_nothing(tts_folder: Path) -> None:
    """The first steps' audio is replaced by "zero" anyway: greedy, the session with the
    skip speaks exactly as one without it, and its whole depformer ran fewer times."""
    text = "The capital of France is Paris. It is also the largest city."
    # Not compiled: the Python depformer runs (and is counted) at every frame.
    plain = load_tts(tts_folder, skip_delay_depformer=False, compile_depformer=False)
    skipping = load_tts(tts_folder, compile_depformer=False)
    runs = {"plain": 0, "skipping": 0}
    for name, tts in (("plain", plain), ("skipping", skipping)):
        real = tts.lm.depformer.sample

        def counted(*args, name=name, real=real, **kwargs):
            runs[name] += 1
            return real(*args, **kwargs)

        tts.lm.depformer.sample = counted
    a = np.concatenate(list(plain.speak(text)))
    b = np.concatenate(list(skipping.speak(text)))
    assert np.array_equal(a, b)
    # Not at all in the text-only delay, and only the first codebook's pass until the
    # others' acoustic delay has elapsed.
    delay = skipping.model.delay_steps + max(skipping.lm.delays)
    assert runs["plain"] - runs["skipping"] == delay > skipping.model.delay_steps


def test_the_compiled_depformer_speaks_exactly_as_the_plain_one(tts_folder: Path) -> None:
    """Greedy, the frame compiled as one function emits the same audio, and its Python
    code runs only to be traced, not at every frame."""
    text = "The capital of France is Paris. It is also the largest city."
    plain = load_tts(tts_folder, compile_depformer=False)
    compiled = load_tts(tts_folder)
    traced = 0
    real = compiled.lm.depformer.sample

    def counted(*args, **kwargs):
        nonlocal traced
        traced += 1
        return real(*args, **kwargs)

    compiled.lm.depformer.sample = counted
    a = np.concatenate(list(plain.speak(text)))
    b = np.concatenate(list(compiled.speak(text)))
    assert np.array_equal(a, b)
    frames = len(b) // compiled.frame_samples
    assert frames > 10 and traced <= 2


@pytest.fixture
def long_delay_tts(tts_folder: Path, tmp_path: Path) -> Path:
    """The tiny TTS with the published model's text-only delay (1.28 s: 16 steps)."""
    folder = tmp_path / "tts"
    shutil.copytree(tts_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["tts_config"]["audio_delay"] = 1.28
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _speak_counting(session, pieces: list[str]) -> tuple[np.ndarray, list[int]]:
    """Push the pieces one by one, stepping what each allows; the audio, and how many
    model steps each `step()` call ran until the first audio."""
    frames, calls = [], []
    for piece in [*pieces, None]:
        if piece is None:
            session.close()
        else:
            session.push(piece)
        while session.ready:
            frame = session.step()
            if not frames:
                calls.append(session.last_steps)
            if frame is not None:
                frames.append(frame)
    return np.concatenate(frames), calls


def test_the_text_only_delay_runs_batched_and_speaks_exactly_as_stepped(
    long_delay_tts: Path,
) -> None:
    """The delay's steps whose text is known run as few backbone calls, and the speech is
    exactly what stepping one at a time gives (at a temperature, from the same seed: each
    step's token is still drawn from its own logits, in order), whether the text comes at
    once or word by word, and where the model's choice was guessed wrong."""
    text = "The capital of France is Paris. It is also the largest city in the country."
    pieces = ["The cap", "ital of", " France", " is Par", "is. It is also", " the",
              " largest city in", " the country."]  # fmt: skip
    stepped = load_tts(long_delay_tts, batch_delay=False, temperature=0.6)
    batched = load_tts(long_delay_tts, temperature=0.6)
    delay = batched.model.delay_steps
    assert delay == 16
    for chunks in ([text], pieces):
        mx.random.seed(7)
        want, one_by_one = _speak_counting(stepped.session(), chunks)
        mx.random.seed(7)
        got, calls = _speak_counting(batched.session(), chunks)
        assert np.array_equal(got, want)
        assert set(one_by_one) == {1}
        assert sum(calls) == sum(one_by_one) > delay
        assert len(calls) <= len(one_by_one) - delay // 2  # the delay in a few calls
    # The whole text at once: the first call is cut short where the model did not start
    # its next word when guessed (the steps after it run again), and the delay takes a
    # few calls, not 16.
    mx.random.seed(7)
    _, calls = _speak_counting(batched.session(), [text])
    assert 1 < calls[0] < delay and len(calls) <= 4


def test_fewer_codebooks_are_generated_when_asked(tts_folder: Path) -> None:
    full = load_tts(tts_folder)
    have = full.lm.dep_q
    fewer = load_tts(tts_folder, codebooks=have // 2)
    assert fewer.lm.dep_q == have // 2 and len(fewer.lm.depformer.slices) == have // 2
    session = fewer.session()
    session.push("hello there how are you")
    session.close()
    audio = _drain(session)
    assert len(audio) and np.sqrt(np.mean(audio**2)) > 1e-4  # Mimi decodes what it gets
    assert session.gen.last_audio_tokens().shape[1] == have // 2
    assert load_tts(tts_folder, codebooks=have + 1).lm.dep_q == have  # at most all of them


def test_an_stt_with_pause_heads_reports_a_pause_probability_per_frame(
    transcriber: Transcriber,
) -> None:
    assert transcriber.predicts_pauses  # the tiny STT has the four extra heads
    transcriber.start()
    assert transcriber.pause is None
    probabilities = []
    for _ in range(3):
        transcriber.feed(np.zeros(FRAME, dtype=np.float32))
        assert transcriber.pause is not None
        probabilities.append(transcriber.pause)
    transcriber.finish()
    assert all(0.0 <= p <= 1.0 for p in probabilities)


def test_an_stt_in_pytorch_names_keeps_its_pause_heads(voice_models: Path, tmp_path: Path) -> None:
    """The -candle repository's layout (the LM in PyTorch names, with the pause heads that
    the -mlx weights lack) loads through the same code, heads and all, and hears the same."""
    import json
    import shutil

    import mlx.core as mx
    from moshi_mlx import models

    from tests.support.tiny_voice import lm_to_pytorch

    src, dst = voice_models / "stt", tmp_path / "stt-candle"
    shutil.copytree(src, dst)
    raw = json.loads((src / "config.json").read_text())
    cfg = models.LmConfig.from_config_dict(raw)
    params = dict(mx.load(str(src / raw["moshi_name"])).items())
    mx.save_safetensors(str(dst / raw["moshi_name"]), lm_to_pytorch(params, cfg))
    heads = [k for k in params if k.startswith("extra_heads.")]
    assert heads  # what the test is about

    def transcript(folder: Path) -> tuple[bool, str, float | None]:
        stt = Transcriber.load(str(folder))
        stt.start()
        for _ in range(6):
            stt.feed(np.zeros(FRAME, dtype=np.float32))
        pause = stt.pause
        return stt.predicts_pauses, stt.finish(), pause

    (heads_c, text_c, pause_c), (_, text_m, pause_m) = transcript(dst), transcript(src)
    assert heads_c and text_c == text_m and pause_c == pytest.approx(pause_m)


def test_a_peek_gives_the_transcript_and_leaves_the_stream_as_it_was(
    voice_models: Path, synthesizer: Synthesizer
) -> None:
    """`peek` at a pause gives what `finish` would, and the utterance then goes on as a
    stream that was never asked: the same codec codes, text tokens, model keys."""
    first = np.concatenate(list(synthesizer.speak("hello there how are you")))
    # Peeked right at the end of the speech: the flush's silence is not what the stream
    # hears next, so the codec's state after it differs from the one to go back to.
    pause = np.zeros(0, dtype=np.float32)
    second = np.concatenate(list(synthesizer.speak("one two three four five")))
    runs = []
    for peeking in (False, True):
        stt = Transcriber.load(str(voice_models / "stt"))
        stt.start()
        stt.feed(np.concatenate([first, pause]))
        peeked = stt.peek() if peeking else None
        stt.feed(second)
        assert stt._gen is not None
        sequence = np.array(stt._gen.gen_sequence[:, :, : stt._gen.step_idx])
        # The model's keys, and the codec encoder's (continuous: the tiny codec's few
        # codes would hide a difference in its streams).
        keys = [
            np.array(c.keys[..., : c.offset, :].astype(mx.float32))
            for c in (stt.lm.transformer_cache[0].self_attn, stt.mimi.encoder_cache[0].self_attn)
        ]
        runs.append((peeked, sequence, keys, stt.finish()))
    (_, sequence, keys, text), (peeked, p_sequence, p_keys, p_text) = runs
    assert len(np.unique(sequence[0, 1:])) > 1  # the codec's codes vary with the speech
    assert np.array_equal(p_sequence, sequence) and p_text == text
    for p_k, k in zip(p_keys, keys, strict=True):
        assert np.array_equal(p_k, k)

    stt = Transcriber.load(str(voice_models / "stt"))
    stt.start()
    stt.feed(np.concatenate([first, pause]))
    assert peeked == stt.finish()


def test_words_written_one_by_one_cost_the_delay_no_more_calls_than_the_whole_text(
    long_delay_tts: Path,
) -> None:
    """In the text-only delay the session waits until the words written reach its end
    (the first audio needs them anyway) and runs it as one batched call, as for the whole
    text at once, instead of one call per word, each of which would hold up the language
    model's next token; the speech is the same."""
    text = "The capital of France is Paris. It is also the largest city in the country."
    words = [w + " " for w in text.split()]
    tts = load_tts(long_delay_tts)
    delay = tts.model.delay_steps

    def delay_calls(chunks: list[str]) -> tuple[np.ndarray, int]:
        session = tts.session()
        audio, calls = _speak_counting(session, chunks)
        steps, n = 0, 0
        for c in calls:
            if steps >= delay:
                break
            steps, n = steps + c, n + 1
        return audio, n

    whole, at_once = delay_calls([text])
    spoken, one_by_one = delay_calls(words)
    assert np.array_equal(spoken, whole)
    assert one_by_one == at_once < delay // 2


def test_the_warm_up_meets_every_batched_delay_shape_an_answer_meets(
    long_delay_tts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cuDNN attention (MLX on CUDA, where the user turned it on) builds a graph per query
    and key length at first use (about 45 ms a shape on an H200, paid by the first
    answer's first sound): with `warm_batch_shapes` (the default there) the warm-up runs
    the batched delay at every shape an answer's can take, wherever the sampled model
    overrules the guessed steps."""
    shapes: list[tuple[int, int]] = []
    real = tts_module.backbone_text_logits

    def recorded(lm, text, *args):
        shapes.append((backbone_offset(lm), text.shape[1]))
        return real(lm, text, *args)

    monkeypatch.setattr(tts_module, "backbone_text_logits", recorded)
    tts = load_tts(long_delay_tts, temperature=0.6, warm_batch_shapes=True)
    tts.warmup()
    warmed = set(shapes)
    shapes.clear()
    text = "Sure. The capital of France is Paris, which is also its largest city by far."
    for seed in range(4):
        mx.random.seed(seed)
        _speak_counting(tts.session(), [w + " " for w in text.split()])
    met = set(shapes)
    assert len(met) > 1  # guesses were overruled: not only the whole delay in one call
    assert met <= warmed
