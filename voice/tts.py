"""Streaming text to speech with Kyutai's delayed-streams TTS (moshi-mlx).

`Synthesizer.session()` takes an answer's text as it is written and gives 80 ms PCM frames
one `step()` at a time, so synthesis interleaves with the language model and stops the
moment the caller stops stepping (barge-in); `speak(text)` does the same for a whole text.
moshi-mlx's `TTSModel.generate` runs a whole script to the end in one call; the session's
loop is its loop, one step at a time, built from the same parts (`TTSModel`'s state
machine, script preparation and conditioning, `LmGen`, Mimi).
"""

from __future__ import annotations

import copy
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import mlx.core as mx
import numpy as np
from moshi_mlx import models
from moshi_mlx.models.tts import TTSModel
from moshi_mlx.modules.conditioner import ConditionTensor
from moshi_mlx.utils.sampling import Sampler

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.mlx_env import cudnn_attention
from mlx_harmony.voice.checkpoints import (
    Checkpoint,
    fetch,
    is_quantized,
    load_checkpoint,
    quantize_lm,
)
from mlx_harmony.voice.config import TtsSection
from mlx_harmony.voice.depformer_fused import FusedDepformer, fused_depformer
from mlx_harmony.voice.depformer_fused import compiled as compiled_fused
from mlx_harmony.voice.moshi_internals import (
    SteppedLm,
    backbone_offset,
    backbone_room,
    backbone_text_logits,
    compiled_depformer,
    keep_codebooks,
    rewind_backbone,
)
from mlx_harmony.voice.synthesis import SteppedHere, spoken_frames
from mlx_harmony.voice.tts_speed import (
    FrameCost,
    StepTimes,
    TtsSpeed,
    choose_codebooks,
    fit_codebooks,
    frame_cost,
)

# Spoken to nobody at start-up, to time this machine's frames (long enough for the
# measured frames after the text-only delay of every published model).
CALIBRATION_TEXT = "One moment please, I am checking how fast I can speak on this machine today."


def voice_file(voice: str, voice_repo: str, suffix: str) -> Path:
    """A voice embedding: a file path, or a name in the voice repo (folder or repo id)."""
    as_path = Path(voice).expanduser()
    if as_path.is_file():
        return as_path
    name = voice if voice.endswith(".safetensors") else voice + suffix
    return fetch(voice_repo, name)


# A voice file's name ends in the TTS model's signature: `<voice>.<sig>@<epoch>.safetensors`.
AUTO_BITS = 8  # what start-up tries where the fewest codebooks fall short (`calibrate`)
QUANTIZED_GAIN = 0.9  # kept where its frame is a tenth shorter: less is a measure's noise
VOICE_SUFFIX = re.compile(r"\.[0-9a-f]+@\d+\.safetensors$")


def list_voices(voice_repo: str) -> list[str]:
    """The voice names in a voice repo (a folder or a Hugging Face repo id), as
    `tts.voice` takes them."""
    folder = Path(voice_repo).expanduser()
    if folder.is_dir():
        files = [str(p.relative_to(folder)) for p in folder.rglob("*.safetensors")]
    else:
        from huggingface_hub import list_repo_files

        try:
            files = [f for f in list_repo_files(voice_repo) if f.endswith(".safetensors")]
        except Exception as e:  # offline, no such repo: any of the hub's many errors
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{voice_repo}: cannot list its voices: {first}") from None
    return sorted(VOICE_SUFFIX.sub("", f) for f in files)


class Synthesizer:
    def __init__(
        self,
        checkpoint: Checkpoint,
        voice: Path,
        temperature: float = 0.6,
        cfg_coef: float = 2.0,
        padding_between: int = 1,
        max_seconds: float = 60.0,
        codebooks: int | None = None,
        skip_delay_depformer: bool = True,
        compile_depformer: bool = True,
        batch_delay: bool = True,
        fused_depformer: Literal["auto", "kernels", "mlx", "off"] = "auto",
        warm_batch_shapes: bool | None = None,
    ) -> None:
        self.model_codebooks = checkpoint.lm.dep_q
        if codebooks is not None:
            keep_codebooks(checkpoint.lm, codebooks)
        self.skip_delay_depformer = skip_delay_depformer
        self.compile_depformer = compile_depformer
        # auto: the fused frame's CUDA kernels where MLX runs on an NVIDIA GPU; mlx: the
        # same frame as MLX operations (measured beside them in the bench).
        if fused_depformer == "auto":
            fused_depformer = "kernels" if mx.cuda.is_available() else "off"
        self.fused_depformer = fused_depformer
        self._fused: FusedDepformer | None = None
        self._unfused: str | None = None  # why the fused kernels are not used, if they failed
        # Batching the text-only delay relies on its steps running no depformer.
        self.batch_delay = batch_delay and skip_delay_depformer
        # Where MLX on CUDA runs attention over several positions through cuDNN (set by
        # the user: our commands turn it off, see `llm.mlx_env`), it builds a graph per
        # query and key length at first use (~45 ms each on an H200, paid by the first
        # answer): the warm-up then meets every batched-delay shape an answer can (see
        # `SpeechSession.warm_batches`). With MLX's own kernels, our default, the first
        # answer's calls took no longer than the later answers' spread (docs/performance.md).
        if warm_batch_shapes is None:
            warm_batch_shapes = mx.cuda.is_available() and cudnn_attention()
        self.warm_batch_shapes = warm_batch_shapes
        self.lm, self.mimi = checkpoint.lm, checkpoint.mimi
        self.speed: TtsSpeed | None = None  # measured by `calibrate`
        self.bits: int | None = None  # weights quantized by `calibrate` (not by the config)
        self.cost = FrameCost(0.0, 0.0)  # its line, from `calibrate`
        self._floor, self._margin = 2, 1.0
        self.model = TTSModel(
            checkpoint.lm,
            checkpoint.mimi,
            checkpoint.tokenizer,
            temp=temperature,
            raw_config=checkpoint.raw_config,
            max_gen_length=int(max_seconds * checkpoint.mimi.frame_rate),
        )
        self.text_sampler = Sampler(temp=self.model.temp)
        self.audio_sampler = Sampler(temp=self.model.temp)
        self._depformers: dict[int, Callable] = {}  # compiled per thread: see `depformer`
        self.padding_between = padding_between
        self.sample_rate = int(self.mimi.sample_rate)
        self.frame_samples = int(self.mimi.sample_rate / self.mimi.frame_rate)
        distilled = self.model.valid_cfg_conditionings
        if distilled and cfg_coef not in distilled:
            valid = ", ".join(f"{v:g}" for v in sorted(distilled))
            raise ConfigError(f"tts.cfg_coef: {cfg_coef:g} is not one of {valid}")
        # Models without CFG distillation would need a second, unconditioned batch row per
        # step; the published Kyutai TTS is distilled, so those run without guidance.
        voices = [voice] if self.model.multi_speaker else []
        try:
            attributes = self.model.make_condition_attributes(
                voices, cfg_coef if distilled else None
            )
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"{voice}: not a voice embedding for this model ({e!r})") from None
        self._condition(attributes)

    @classmethod
    def load(
        cls,
        ref: str,
        voice: str,
        voice_repo: str,
        quantize: int | None = None,
        **kwargs,
    ) -> Synthesizer:
        checkpoint = load_checkpoint(ref, generating_audio=True, quantize=quantize)
        model_id = checkpoint.raw_config.get("model_id") or {}
        suffix = f".{model_id.get('sig')}@{model_id.get('epoch')}.safetensors"
        return cls(checkpoint, voice_file(voice, voice_repo, suffix), **kwargs)

    @classmethod
    def from_config(cls, t: TtsSection) -> Synthesizer:
        """Loaded with every codebook where `tts.codebooks` is "auto" (`calibrate` cuts
        them to what this machine keeps up with)."""
        return cls.load(
            t.model,
            t.voice,
            t.voice_repo,
            quantize=t.quantize,
            **({} if t.temperature is None else {"temperature": t.temperature}),
            cfg_coef=t.cfg_coef,
            padding_between=t.padding_between,
            codebooks=None if t.codebooks == "auto" else t.codebooks,
            fused_depformer=t.fused_depformer,
        )

    @property
    def frame_seconds(self) -> float:
        return self.frame_samples / self.sample_rate

    def measure(self, frames: int = 8) -> StepTimes:
        """Time the steps of a session on `CALIBRATION_TEXT` until `frames` frames with
        every kept codebook are timed (the first such frame, which may compile the
        depformer for a new codebook count, is not counted). The delay is stepped one
        step at a time here: those steps time the backbone alone."""
        session = self.session(batch=False)
        session.push(CALIBRATION_TEXT)
        session.close()
        times = StepTimes(self.lm.dep_q, [], [], [])
        skipped = False
        while not session.done and len(times.full) < frames:
            start = time.perf_counter()
            pcm = session.step()
            took = time.perf_counter() - start
            if session.last_slices == 0:
                times.backbone.append(took)
            elif session.last_slices == self.lm.dep_q and pcm is not None:
                if not skipped:
                    skipped = True
                    continue
                times.full.append(took)
                times.decode.append(session.last_decode_seconds)
        if not times.full:
            raise RuntimeError("the TTS gave no audio for its calibration text")
        return times

    def calibrate(self, auto: bool, floor: int, margin: float) -> TtsSpeed:
        """Measure this machine's frame; with `auto`, cut the codebooks to the most whose
        frame is synthesized `margin` times faster than it plays (`fit_codebooks`)."""
        self._floor, self._margin = floor, margin
        times = self.measure()
        self.cost = frame_cost(times)
        if auto:
            self.cost, times = fit_codebooks(
                times, self.cost, self._cut, floor, margin, self.frame_seconds
            )
            fewest = min(max(floor, 2), self.model_codebooks)
            short = self.frame_seconds / times.frame < margin
            if short and self.lm.dep_q <= fewest and not is_quantized(self.lm):
                times = self._try_quantized(times)
        return self._timed(times, auto)

    def _try_quantized(self, times: StepTimes) -> StepTimes:
        """The fewest codebooks still fall short of the margin: the same in `AUTO_BITS`
        bits, kept only where its measured frame is clearly shorter (`QUANTIZED_GAIN`: it
        costs some sound). A machine whose frame is bound by reading the weights reads half
        as much; on an H200, bound by kernel launches, 8 bits measured slower
        (docs/performance.md), and there the exact layers are put back."""
        exact = self.lm.leaf_modules()
        quantize_lm(self.lm, AUTO_BITS)
        self._retrace()
        quantized = self.measure()
        if quantized.frame < QUANTIZED_GAIN * times.frame:
            self.bits, self.cost = AUTO_BITS, frame_cost(quantized)
            return quantized
        self.lm.update_modules(exact)
        self._retrace()
        return times

    def adapt(self, observed_rate: float) -> TtsSpeed | None:
        """Answers ran at `observed_rate` times real time, everything the loop does
        between frames included: where the codebooks were chosen for this machine, keep
        fewer, so that this pace regains the margin (None: nothing to cut)."""
        if self.speed is None or not self.speed.chosen:
            return None
        observed = self.frame_seconds / observed_rate
        extra = max(0.0, observed - self.cost.frame(self.lm.dep_q))
        loaded = FrameCost(self.cost.fixed + extra, self.cost.per_codebook)
        k = choose_codebooks(loaded, self.lm.dep_q, self._floor, self._margin, self.frame_seconds)
        if k >= self.lm.dep_q:
            return None
        return self._timed(self._cut(k), chosen=True)

    @property
    def depformer(self) -> Callable | None:
        """The compiled depformer frame for the calling thread. A compiled MLX function
        keeps the streams of the thread that traced it, which no other thread has: a
        server loads the voice on its main thread and speaks on its model worker's."""
        if not self.compile_depformer:
            return None
        thread = threading.get_ident()
        if thread not in self._depformers:
            if self.fused_depformer != "off" and self._fused is None:
                self._fused = self._build_fused()
            self._depformers[thread] = (
                compiled_depformer(self.lm, self.audio_sampler, self.model.cfg_coef)
                if self._fused is None
                else compiled_fused(self._fused)
            )
        return self._depformers[thread]

    def _build_fused(self) -> FusedDepformer | None:
        """The fused frame for this model, tried once on a dummy frame: kernels that fail
        to build on this machine (a GPU or CUDA toolkit NVRTC cannot compile for) leave
        the compiled MLX function in place, and the status line says why."""
        kernels = self.fused_depformer == "kernels"
        try:
            fused = fused_depformer(self.lm, self.audio_sampler, self.model.cfg_coef, kernels)
            if fused is not None:
                fused.check()
            return fused
        except RuntimeError as e:
            if not kernels:
                raise
            self.fused_depformer = "off"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self._unfused = f"compiled MLX operations (the fused CUDA kernels failed: {first})"
            return None

    def _cut(self, codebooks: int) -> StepTimes:
        """Keep `codebooks` codebooks and time a frame with them."""
        keep_codebooks(self.lm, codebooks)
        self._retrace()
        return self.measure()

    def _retrace(self) -> None:
        """After the model's layers changed: each compiled frame traced the old ones."""
        self._depformers.clear()
        self._fused = None

    def _timed(self, times: StepTimes, chosen: bool) -> TtsSpeed:
        self.speed = TtsSpeed(
            codebooks=self.lm.dep_q,
            of=self.model_codebooks,
            frame_seconds=times.frame,
            audio_seconds=self.frame_seconds,
            chosen=chosen,
            margin=self._margin,
            depformer=self._fused.ops.name if self._fused is not None else self._unfused,
            bits=self.bits,
        )
        return self.speed

    def _condition(self, attributes) -> None:
        # As in TTSModel.generate: summed text conditions and one cross-attention source.
        provider = self.lm.condition_provider
        assert provider is not None, "a TTS model has conditioners"
        summed = None
        for key, value in attributes.text.items():
            tensor = provider.condition_tensor(key, value).tensor.squeeze(0)
            summed = tensor if summed is None else summed + tensor
        self.ct = ConditionTensor(mx.stack([summed], axis=0)) if summed is not None else None
        self.cross = None
        for key, value in attributes.tensor.items():
            self.cross = provider.conditioners[key].condition(value)
        # Evaluated now: left lazy they would belong to this thread's streams, and another
        # thread (a server's model worker) could not step the model with them.
        mx.eval([t for t in (self.ct.tensor if self.ct else None, self.cross) if t is not None])

    def warmup(self) -> None:
        for _ in self.speak("ok"):
            pass
        if self.warm_batch_shapes and self.batch_delay:
            self.session().warm_batches()

    def session(self, batch: bool = True) -> SpeechSession:
        """One answer's speech: push its text as it arrives, step frames out of it
        (`batch`: the text-only delay's steps known ahead run as one, see `step`)."""
        return SpeechSession(self, batch=batch and self.batch_delay)

    def speak(self, text: str) -> Iterator[np.ndarray]:
        """Frames of `frame_samples` float32 samples for `text`, generated on demand."""
        return spoken_frames(self.session(), text)


class SpeechSession(SteppedHere):
    """Kyutai's TTS as the streaming-text model it is: words are pushed while the answer
    is being written and each `step()` runs one 80 ms frame, so the audio delay is paid
    once per answer and speech starts after the first words, not the first sentence.

    The model is only stepped when the words it may need next are there (a word in hand
    plus the lookahead stream's), or once the text is closed: waiting for text never
    makes it end the speech early. Pushing the text word by word gives the same tokens
    as pushing it at once.

    The first steps of a session only feed text (the audio is delayed behind it: 16 steps
    of Kyutai's TTS 1.6B, 1.28 s), and their text is mostly forced by the script (a word's
    tokens, its padding), so a run of them is known before the model runs. That run is
    one batched backbone call, verified as speculative decoding is: each step's token is
    still sampled from its own logits, in order, and where the model chose otherwise than
    guessed (start the next word or wait: the only choice it has) the steps after it are
    dropped. The tokens are the ones stepping gives; what is saved is the per-step cost a
    GPU pays in kernel launches, most of the delay's steps before the first audio.
    """

    def __init__(self, synth: Synthesizer, batch: bool = True) -> None:
        self.synth = synth
        model, lm = synth.model, synth.lm
        for cache in lm.transformer_cache:
            cache.reset()
        for cache in lm.depformer_cache:
            cache.reset()
        synth.mimi.reset_all()
        self.machine = model.machine
        self.state = self.machine.new_state([])
        self.offset = 0
        self.closed = False
        self.first_audio_step: int | None = None
        self._pending = ""  # text after the last complete word
        self._started = False
        self._batch = batch
        self._guess = self.machine.token_ids.new_word  # the model's next free choice
        self._planned: list[tuple[int, int | None]] | None = None  # until text or a step
        self.last_steps = 0  # model steps the last `step()` ran
        ids = self.machine.token_ids

        def on_audio(audio_tokens: mx.array) -> None:
            # Codebooks whose delay has not elapsed yet are fed as "zero" (as generate does).
            for q, delay in enumerate(lm.delays[: audio_tokens.shape[1]]):
                if self.offset < delay + model.delay_steps:
                    audio_tokens[:, q] = ids.zero

        def on_text(text_tokens: mx.array) -> None:
            token, _ = self.machine.process(self.offset, self.state, int(text_tokens[0, 0].item()))
            text_tokens[:] = mx.array([[token]], dtype=mx.int64)

        # A codebook's token is replaced by "zero" until its delay has elapsed (on_audio):
        # the depformer only needs to run up to the last codebook that is kept.
        starts = [model.delay_steps + d for d in lm.delays[: lm.dep_q]]

        def slices_needed() -> int:
            if not synth.skip_delay_depformer:
                return lm.dep_q
            return max((q + 1 for q, at in enumerate(starts) if self.offset >= at), default=0)

        self._slices_needed = slices_needed
        # The steps before the first codebook's delay has elapsed run no depformer.
        self._text_only_until = min(starts, default=0) if synth.skip_delay_depformer else 0
        self.last_slices = 0  # depformer passes of the last step
        self.last_decode_seconds = 0.0  # Mimi's share of the last step
        self._audio_from = max(starts, default=0) + 1
        stepped = (
            SteppedLm(lm, slices_needed, ids.zero, synth.depformer)
            if synth.skip_delay_depformer or synth.depformer is not None
            else lm
        )
        self.gen = models.LmGen(
            stepped,  # type: ignore[arg-type]
            max_steps=model.max_gen_length,
            text_sampler=synth.text_sampler,
            audio_sampler=synth.audio_sampler,
            cfg_coef=model.cfg_coef,
            on_text_hook=on_text,
            on_audio_hook=on_audio,
        )
        self._inputs = mx.full((1, lm.n_q - lm.dep_q), ids.zero, dtype=mx.int64)

    def push(self, text: str) -> None:
        """More of the answer's text (already speakable); complete words are queued."""
        self._pending += text
        cut = max(self._pending.rfind(" "), self._pending.rfind("\n"))
        if cut >= 0:
            self._queue(self._pending[:cut])
            self._pending = self._pending[cut + 1 :]

    def close(self) -> None:
        """No more text: the rest is spoken and the session ends."""
        self._queue(self._pending)
        self._pending = ""
        self.closed = True
        self._planned = None

    @property
    def ready(self) -> bool:
        """A step can be taken now without running ahead of the text, and, in the
        text-only delay, without falling short of its end (see `_short_of_delay`)."""
        return not self.done and self._has_text(self.state) and not self._short_of_delay()

    def _short_of_delay(self) -> bool:
        """Whether the text-only delay's known steps stop short of its end while more
        text may come. The first audio needs the text past the delay anyway, so stepping
        now gains nothing: it would run one batched call per word written (each holding
        up the language model's next token, on the same thread) where waiting for the
        words runs one."""
        if not self._batch or self.closed:
            return False
        end = self._delay_end()
        return self.offset < end and len(self._plan()) < end - self.offset

    def _delay_end(self) -> int:
        """The last text-only step batched, plus one (the delay's end, or the backbone's
        room or the session's length where those come first)."""
        until = min(self._text_only_until, backbone_room(self.synth.lm) - 1)
        return min(until, self.synth.model.max_gen_length)

    def _has_text(self, state) -> bool:
        # Not before the first word, though the script's first steps are forced padding:
        # stepped while the language model has yet to write its first token they would
        # delay that token, and they batch with the first word's steps anyway.
        if not self._started:
            return self.closed
        needed = 1 + self.machine.second_stream_ahead
        return (
            self.closed
            or len(state.entries) >= needed
            or bool(state.queued)
            or (state.forced_padding > 0)
        )

    @property
    def done(self) -> bool:
        model, end = self.synth.model, self.state.end_step
        if end is not None and self.offset >= end + model.delay_steps + model.final_padding:
            return True
        return self.offset >= model.max_gen_length or (self.closed and not self._started)

    def step(self) -> np.ndarray | None:
        """One model step, or in the text-only delay every step whose text is known; the
        80 ms of audio it completed, if any."""
        plan = self._plan() if self._batch else []
        self._planned = None
        if len(plan) > 1:
            self._run(plan)
            return None
        synth, ids = self.synth, self.machine.token_ids
        self.last_slices, self.last_steps = self._slices_needed(), 1
        self.gen.step(self._inputs, ct=synth.ct, cross_attention_src=synth.cross)
        self.offset += 1
        frame = self.gen.last_audio_tokens()
        if frame is None or not bool((frame != ids.zero).all()):
            return None
        if self.first_audio_step is None:
            self.first_audio_step = self.offset
        start = time.perf_counter()
        pcm = synth.mimi.decode_step(frame[:, :, None])
        pcm = np.clip(np.array(pcm[0, 0], dtype=np.float32), -1.0, 1.0)
        self.last_decode_seconds = time.perf_counter() - start
        return pcm

    def _plan(self) -> list[tuple[int, int | None]]:
        """The next text-only steps whose text input is known now, each as (the script's
        output for it, the choice guessed for the model there or None where the script
        forces it), on a copy of the state machine. Kept until text is pushed or a step
        is taken: `ready` asks before each step takes it."""
        if self._planned is None:
            self._planned = self._planning()
        return self._planned

    def _planning(self) -> list[tuple[int, int | None]]:
        pad = self.machine.token_ids.pad
        until = self._delay_end()
        if self.offset >= until:
            return []
        state, plan = copy.deepcopy(self.state), []
        for step in range(self.offset, until):
            if not self._has_text(state):
                break
            free = not state.queued and state.forced_padding <= 0 and state.remaining_padding > 0
            guess = self._guess if free else pad
            output, _ = self.machine.process(step, state, guess)
            plan.append((output, guess if free else None))
        return plan

    def _run(self, plan: list[tuple[int, int | None]]) -> None:
        """The planned steps as one backbone call; kept up to the first where the model's
        sampled choice differs from the guess (that step counts: its input was right)."""
        synth, gen, ids = self.synth, self.gen, self.machine.token_ids
        lm, start = synth.lm, self.offset
        assert backbone_offset(lm) == start == gen.step_idx
        first = lm.cfg.text_out_vocab_size if start == 0 else int(gen.gen_sequence[0, 0, start - 1])
        text = mx.array([[first] + [output for output, _ in plan[:-1]]], dtype=mx.int32)
        # Every audio token of the text-only steps is "zero"; before any was generated
        # the model is fed the padding token (as `LmGen` feeds them).
        audio = [
            mx.array(
                [[ids.zero if s - 1 - d >= 0 else gen.audio_padding_token
                  for s in range(start, start + len(plan))]], dtype=mx.int32
            )
            for d in gen.audio_delays
        ]  # fmt: skip
        logits = backbone_text_logits(lm, text, audio, synth.ct, synth.cross, gen.cfg_coef)
        outputs = []
        for k, (planned, guess) in enumerate(plan):
            token, _ = synth.text_sampler(logits[:, k : k + 1])
            sampled = int(token[0, 0].item())
            output, _ = self.machine.process(start + k, self.state, sampled)
            outputs.append(output)
            if guess is None:
                continue
            choice = ids.new_word if sampled == ids.new_word else ids.pad
            self._guess = choice
            if choice != guess:
                break
            assert output == planned, "the script machine went otherwise than planned"
        steps = len(outputs)
        rewind_backbone(lm, start + steps)
        self._record(start, outputs)
        self.offset += steps
        self.last_slices, self.last_steps = 0, steps

    def warm_batches(self) -> None:
        """Run the text-only delay's batched backbone call at every length an answer can
        give it, on throwaway inputs (a fresh session resets the caches). Every such call
        ends at the delay's end: the first waits for the text that reaches it
        (`_short_of_delay`), and each after a guess the model overruled runs the rest."""
        lm, gen, end = self.synth.lm, self.gen, self._delay_end()
        for steps in range(end, 1, -1):  # a single step runs as a plain step
            rewind_backbone(lm, end - steps)
            ids = mx.zeros((1, steps), dtype=mx.int32)
            audio = [ids] * len(gen.audio_delays)
            logits = backbone_text_logits(
                lm, ids, audio, self.synth.ct, self.synth.cross, gen.cfg_coef
            )
            mx.eval(logits)

    def _record(self, start: int, outputs: list[int]) -> None:
        """Write text-only steps into `LmGen`'s sequence as its own step would: the text
        tokens, and "zero" for every audio token they generated."""
        gen, zero, end = self.gen, self.machine.token_ids.zero, start + len(outputs)
        gen.gen_sequence[:, 0, start:end] = mx.array([outputs], dtype=mx.int32)
        main = gen.main_codebooks
        for q, delay in enumerate(gen.audio_delays[:main]):
            lo, hi = max(start - delay, 0), end - delay
            if hi > lo:
                gen.gen_sequence[:, q + 1, lo:hi] = zero
        if gen.gen_sequence.shape[1] > 1 + main:
            gen.gen_sequence[:, 1 + main :, start:end] = zero
        gen.step_idx = end

    def frames_left(self) -> int:
        """At most how many more audio frames the text pushed so far makes (the speech
        ends with it when closed). Each word takes one step to start, then its tokens, its
        forced pause or the model's chosen pause, whichever is longest; the model may not
        pause longer than the machine's `max_padding`."""
        model, state = self.synth.model, self.state
        tail = model.delay_steps + model.final_padding
        if state.end_step is not None:
            steps = state.end_step + tail - self.offset
        else:
            longest_pause = self.machine.max_padding
            steps = sum(1 + max(len(e.tokens), e.padding, longest_pause) for e in state.entries)
            steps += max(len(state.queued), state.forced_padding, state.remaining_padding)
            steps += self.frames_for_words(len(self._pending.split())) + 1 + tail
        before_audio = max(0, self._audio_from - self.offset)
        return max(0, steps - before_audio)

    def frames_for_words(self, words: int) -> int:
        """At most how many frames `words` words not tokenized yet take (as in
        `frames_left`, taking a word for two tokens)."""
        return words * (1 + max(2, self.machine.max_padding))

    def heard(self, frames_played: int) -> str:
        """The words whose audio was among the first `frames_played` frames."""
        if self.first_audio_step is None:
            return ""
        lag = self.synth.model.delay_steps + max(self.synth.lm.delays)
        heard_until = self.first_audio_step + frames_played
        return " ".join(w for w, step in self.state.transcript if step + lag < heard_until)

    def _queue(self, text: str) -> None:
        entries = self.synth.model.prepare_script(
            [text], padding_between=self.synth.padding_between
        )
        if not entries:
            return
        if self._started:
            # prepare_script opens every script with the speaker's token; within one
            # answer only its first word carries it, as when the text comes in one piece.
            first = entries[0]
            speaker = self.machine.token_ids.main
            if self.synth.model.multi_speaker and first.tokens and first.tokens[0] == speaker:
                first.tokens = first.tokens[1:]
                if self.synth.padding_between > 0:
                    first.padding = max(0, self.synth.padding_between + len(first.tokens) - 1)
        self._started = True
        self.state.entries.extend(entries)
        self._planned = None
