"""Voice-to-voice latency through the real daemon, on PulseAudio's virtual devices (Linux)
or, where there is no sound server (a GPU machine), on paced file devices
(`bench.file_audio`).

Questions spoken with espeak-ng are played into the microphone; the assistant runs
its real loop on the configured models; each turn's timings are measured inside the
program on one clock, from the arrival of the last speech block (the end of the user's
speech) to the first audible sample handed to the device. Each utterance is run with and
without prefilling the words heard while the user is still speaking.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mlx_harmony.bench.file_audio import ClockSpeaker, FileMicrophone
from mlx_harmony.llm.cli.common import Setup
from mlx_harmony.llm.engine import Engine
from mlx_harmony.llm.session import Session
from mlx_harmony.voice.audio_io import MODEL_RATE
from mlx_harmony.voice.config import VoiceConfig, apply_override
from mlx_harmony.voice.control import Reply, Request
from mlx_harmony.voice.daemon import TurnTimings, VoiceAssistant
from mlx_harmony.voice.stt import Transcriber
from mlx_harmony.voice.synthesis import TextToSpeech
from mlx_harmony.voice.turn_scorer import load_turn_scorer
from mlx_harmony.voice.vad import make_detector

# (prefill while listening, endpointing.speculate_ms or None for the config's, the turn
# model on or off or None for the config's, tts.own_thread or None for the config's)
Variant = tuple[bool, int | None, bool | None, bool | None]
QUESTIONS = [
    "What is the capital of France?",
    "Tell me a joke.",
    "How far away is the moon?",
]


# The stages summarized (medians), in the order they happen.
STAGES = (
    "head_start_ms", "endpointing_ms", "stt_flush_ms", "prefill_ms", "first_final_ms",
    "first_frame_ms", "first_chunk_ms", "first_audio_ms", "turn_model_ms",
)  # fmt: skip


@dataclass
class LatencyRecord:
    prefill_while_listening: bool
    turn: int
    endpointing_ms: float  # speech end → end detected (mostly the configured silence)
    stt_flush_ms: float  # end detected → transcript complete
    prefill_ms: float | None  # transcript → first token
    first_final_ms: float | None  # first token → first final-channel token
    first_chunk_ms: float | None  # first final token → first TTS frame queued
    first_audio_ms: float | None  # the whole: speech end → first audible sample out
    cached_tokens: int
    prompt_tokens: int
    # Started before the end was confirmed (speculative start): its stages overlap the
    # endpointing wait, so only first_audio_ms is the whole.
    speculative: bool = False
    head_start_ms: float | None = None  # speech end → transcript taken early (speculative)
    speculations_dropped: int = 0  # answers started during this question, then dropped
    speculate_ms: int = 0  # endpointing.speculate_ms in effect (0: off)
    turn_model: bool = False  # the turn detector was on
    tts_thread: bool = False  # the TTS ran on a thread of its own (tts.own_thread)
    ended_by: str = ""  # what ended the turn (silence, turn detector, …)
    # The turn model's median turnaround over the variant (request → result on the loop).
    turn_model_ms: float | None = None
    underruns: int = 0  # the speaker ran dry mid-answer (a gap in the speech)
    text_gaps: int = 0  # of them: the voice waited for the language model's next word
    buffered_frames: int = 0  # TTS frames held back before the answer started playing
    # First final token → first TTS frame synthesized (held or not): the TTS's own start,
    # where first_chunk_ms also waits for the end to be confirmed and the playout buffer.
    first_frame_ms: float | None = None
    first_frame_words: int = 0  # the answer's words written by then (the TTS reads ahead)
    predicted_frames: int = 0  # the answer's length in frames as the decision predicted it
    tts_rate: float | None = None  # the synthesis speed the playout decision used
    jitter_frames: int = 0  # of buffered_frames: held for the last answers' stalls
    late_ms: float = 0.0  # the most a frame came after its place in the playback
    slowest_tts_step_ms: float = 0.0  # the answer's longest TTS step
    slowest_engine_step_ms: float = 0.0  # and engine step (a stall, where gaps come from one)

    @classmethod
    def of(cls, prefill: bool, turn: int, t: TurnTimings, dropped: int = 0) -> LatencyRecord:
        def gap(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        return cls(
            prefill, turn, t.endpoint_ms, t.transcript_ms - t.endpoint_ms,
            gap(t.transcript_ms, t.first_token_ms), gap(t.first_token_ms, t.first_final_ms),
            gap(t.first_final_ms, t.first_chunk_ms), t.first_audio_ms, t.cached_tokens,
            t.prompt_tokens, t.speculative, t.head_start_ms, dropped, ended_by=t.ended_by,
            underruns=t.underruns, text_gaps=t.text_gaps, buffered_frames=t.buffered_frames,
            first_frame_ms=gap(t.first_final_ms, t.first_frame_ms),
            first_frame_words=t.first_frame_words,
            predicted_frames=t.predicted_frames, tts_rate=t.tts_rate,
            jitter_frames=t.jitter_frames, late_ms=t.late_ms,
            slowest_tts_step_ms=t.slowest_tts_step_ms,
            slowest_engine_step_ms=t.slowest_engine_step_ms,
        )  # fmt: skip

    def row(self) -> dict:
        return asdict(self)


class _Collector:
    def __init__(self) -> None:
        self.timings: list[TurnTimings] = []
        self.dropped: list[int] = []  # speculative starts dropped before each turn
        self.speculations: Counter[str] = Counter()  # the assistant's, once it exists
        self.done = threading.Event()

    def turn_done(self, timings: TurnTimings) -> None:
        self.timings.append(timings)
        self.dropped.append(self.speculations["dropped"] - sum(self.dropped))
        self.done.set()

    def __getattr__(self, name: str):
        return lambda *args: None  # status, heard, answer …: not needed here


def run(
    config: VoiceConfig,
    setup: Setup,
    engine: Engine,
    stt: Transcriber,
    tts: TextToSpeech,
    rounds: int,
    devices: Literal["auto", "pulse", "file"] = "auto",
    variants: tuple[Variant, ...] = ((True, None, None, None), (False, None, None, None)),
    one_chat: bool = False,
) -> list[LatencyRecord]:
    """Each of `variants` in turn, in one process (so a backend that compiles kernels per
    shape pays once): prefill while listening on or off, `endpointing.speculate_ms`
    (None: the config's), the turn model on or off and the TTS on its own thread or not
    (None: the config's). `devices`:
    PulseAudio's
    virtual ones (espeak-ng speech), or `file` ones (no sound
    server: a GPU machine) fed espeak-ng speech where it is installed, else speech-like
    noise; `auto` picks PulseAudio where its tools are installed. `one_chat`: a variant's
    rounds are one conversation (its prompt grows every turn) instead of a new chat each."""
    from mlx_harmony.bench.virtual_audio import missing_tools

    if devices == "auto":
        devices = "file" if missing_tools() else "pulse"
    engine.warmup(setup.prompt)  # as the voice command does before it listens
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if devices == "pulse":
            return _run_pulse(config, setup, engine, stt, tts, rounds, folder, variants, one_chat)
        clips = [spoken(q) for q in QUESTIONS]
        records = []
        for variant in variants:
            cfg = _variant_config(config, variant)
            mic, speaker = FileMicrophone(cfg.audio.block_ms), ClockSpeaker()
            assistant, collector = _assistant(
                cfg, setup, engine, stt, tts, folder, mic=mic, speaker=speaker
            )

            def say(i: int, mic: FileMicrophone = mic) -> None:
                clip = clips[i % len(clips)]
                mic.say(clip)
                time.sleep(len(clip) / MODEL_RATE)

            records += _rounds(assistant, collector, rounds, say, cfg, one_chat)
        return records


def _run_pulse(
    config: VoiceConfig, setup: Setup, engine: Engine, stt: Transcriber, tts: TextToSpeech,
    rounds: int, folder: Path, variants: tuple[Variant, ...], one_chat: bool,
) -> list[LatencyRecord]:  # fmt: skip
    from mlx_harmony.bench.virtual_audio import VirtualAudio, missing_tools

    if missing_tools():
        raise RuntimeError(f"--voice needs {', '.join(missing_tools())} (Linux, PulseAudio)")
    audio = VirtualAudio.start()
    audio.activate()
    records = []
    try:
        speech = [audio.say(q, folder, lead_silence=0.3) for q in QUESTIONS]
        for variant in variants:
            cfg = _variant_config(config, variant)
            for name, value in (("audio.input_device", "pulse"),
                                ("audio.output_device", "pulse")):  # fmt: skip
                cfg = apply_override(cfg, name, value)
            assistant, collector = _assistant(cfg, setup, engine, stt, tts, folder)

            def say(i: int) -> None:
                audio.play_into_mic(speech[i % len(speech)]).wait()

            records += _rounds(assistant, collector, rounds, say, cfg, one_chat)
    finally:
        audio.stop()
    return records


def _variant_config(config: VoiceConfig, variant: Variant) -> VoiceConfig:
    prefill, speculate_ms, turn_model, tts_thread = variant
    if tts_thread is not None:
        config = apply_override(config, "tts.own_thread", tts_thread)
    config = apply_override(config, "llm.prefill_while_listening", prefill)
    if speculate_ms is not None:
        config = apply_override(config, "endpointing.speculate_ms", speculate_ms)
    if speculate_ms == 0:  # no head start at all: nor at a likely end
        config = apply_override(config, "endpointing.speculate_threshold", None)
    if turn_model is False:
        config = apply_override(config, "endpointing.turn_model", None)
    return config


def _assistant(
    cfg: VoiceConfig, setup: Setup, engine: Engine, stt: Transcriber, tts: TextToSpeech,
    folder: Path, **devices: Any,
) -> tuple[VoiceAssistant, _Collector]:  # fmt: skip
    session = Session(engine, setup.prompt, folder / "log.json", setup.model)
    session.new_chat()
    collector = _Collector()
    scorer = load_turn_scorer(cfg.endpointing, MODEL_RATE, print)
    assistant = VoiceAssistant(
        cfg, engine, setup.prompt, stt, tts, make_detector(cfg.endpointing, MODEL_RATE),
        session, collector, turn_scorer=scorer, **devices,
    )  # fmt: skip
    collector.speculations = assistant.speculations
    return assistant, collector


def _rounds(
    assistant: VoiceAssistant,
    collector: _Collector,
    rounds: int,
    say: Callable[[int], None],
    config: VoiceConfig,
    one_chat: bool = False,
) -> list[LatencyRecord]:
    """Ask `rounds` questions, each once the last answer was played; the turns' timings."""
    stop = threading.Event()

    def scenario() -> None:
        try:
            for i in range(rounds):
                collector.done.clear()
                if i and not one_chat:
                    # Each question opens a new chat: every round has the same prompt
                    # shapes, so a backend that compiles kernels per shape (MLX on CUDA)
                    # is timed warm from the second round on. In one chat every turn
                    # meets prompt lengths it has not seen: what a conversation pays.
                    reply = Reply()
                    assistant.submit(Request(cmd="new-chat"), reply)
                    reply.lines.get(timeout=60)
                time.sleep(0.5)
                say(i)
                if not collector.done.wait(timeout=600):
                    break
        finally:
            stop.set()

    assistant.open()
    helper = threading.Thread(target=scenario)
    helper.start()
    assistant.serve(stop)
    helper.join()
    prefill = config.llm.prefill_while_listening
    speculate = config.endpointing.speculate_ms or 0
    detector = assistant.rules.policy is not None
    turnarounds = assistant.scorer.turnarounds if assistant.scorer is not None else []
    turn_model_ms = statistics.median(turnarounds) * 1000 if turnarounds else None
    return [
        replace(
            LatencyRecord.of(prefill, i, t, d),
            speculate_ms=speculate,
            turn_model=detector,
            turn_model_ms=turn_model_ms,
            tts_thread=config.tts.own_thread,
        )
        for i, (t, d) in enumerate(zip(collector.timings, collector.dropped, strict=True))
    ]


QUESTIONS_SPOKEN = Path(__file__).parent / "data" / "questions"


def spoken(text: str) -> np.ndarray:
    """`text` as spoken in `bench/data/questions` (espeak-ng, made once: the same speech on
    every machine), else by espeak-ng at 24 kHz, else two seconds of speech-like noise
    (syllable-paced bursts: what an energy detector and a random-weight STT need)."""
    from mlx_harmony.bench.virtual_audio import read_wav

    spoken = QUESTIONS_SPOKEN / (re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") + ".wav")
    if spoken.is_file():
        return read_wav(spoken)
    if shutil.which("espeak-ng") and shutil.which("sox"):
        with tempfile.TemporaryDirectory() as tmp:
            raw, out = Path(tmp) / "raw.wav", Path(tmp) / "out.wav"
            subprocess.run(["espeak-ng", "-w", str(raw), text], check=True)
            subprocess.run(
                ["sox", str(raw), "-r", "24000", "-c", "1", "-b", "16", str(out)], check=True
            )
            return read_wav(out)
    rng = np.random.default_rng(len(text))
    t = np.arange(2 * MODEL_RATE) / MODEL_RATE
    syllables = (np.sin(2 * np.pi * 4 * t) > -0.3).astype(np.float32)
    return (rng.normal(0, 0.1, len(t)) * syllables).astype(np.float32)


def summarize(records: list[LatencyRecord]) -> dict:
    """Medians per variant, as `<label>_<stage>`; `labels` lists the variants in order:
    `with_prefill` / `without_prefill`, with `_speculate_<ms>` when several were run and
    `_silence` / `_detector` when the turn model was run both ways, `_tts_thread` /
    `_one_thread` when the TTS was."""

    def group_of(r: LatencyRecord) -> tuple[bool, int, bool, bool]:
        return r.prefill_while_listening, r.speculate_ms, r.turn_model, r.tts_thread

    groups = list(dict.fromkeys(group_of(r) for r in records))
    several = len({g[1] for g in groups}) > 1
    both = len({g[2] for g in groups}) > 1
    threads = len({g[3] for g in groups}) > 1
    out: dict = {"labels": []}
    for group in groups:
        prefill, ms, detector, thread = group
        rows = [r for r in records if group_of(r) == group]
        label = (
            ("with_prefill" if prefill else "without_prefill")
            + (f"_speculate_{ms}" if several else "")
            + (("_detector" if detector else "_silence") if both else "")
            + (("_tts_thread" if thread else "_one_thread") if threads else "")
        )
        out["labels"].append(label)
        for key in STAGES:
            values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
            out[f"{label}_{key}"] = statistics.median(values) if values else None
        out[f"{label}_speculative_turns"] = sum(r.speculative for r in rows)
        out[f"{label}_speculations_dropped"] = sum(r.speculations_dropped for r in rows)
        out[f"{label}_ended_by_detector"] = sum(r.ended_by == "turn detector" for r in rows)
        out[f"{label}_underruns"] = sum(r.underruns for r in rows)
        out[f"{label}_text_gaps"] = sum(r.text_gaps for r in rows)
        # Frames held for recurring stalls, over all answers (`voice.playout`).
        out[f"{label}_jitter_frames"] = sum(r.jitter_frames for r in rows)
    return out
