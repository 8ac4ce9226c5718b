"""Voice-to-voice latency through virtual audio devices (Linux, PulseAudio).

Questions spoken with espeak-ng are played into a virtual microphone; the assistant runs
its real loop on the configured models; each turn's timings are measured inside the
program on one clock, from the arrival of the last speech block (the end of the user's
speech) to the first audible sample handed to the device. Each utterance is run with and
without prefilling the words heard while the user is still speaking.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llm.chatlog import Chat, ChatLog
from llm.cli.common import Setup
from llm.engine import Engine
from voice.audio_io import MODEL_RATE
from voice.config import VoiceConfig, apply_override
from voice.daemon import TurnTimings, VoiceAssistant
from voice.stt import Transcriber
from voice.tts import Synthesizer
from voice.vad import make_detector

QUESTIONS = [
    "What is the capital of France?",
    "Tell me a joke.",
    "How far away is the moon?",
]


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

    @classmethod
    def of(cls, prefill: bool, turn: int, t: TurnTimings) -> LatencyRecord:
        def gap(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        return cls(
            prefill, turn, t.endpoint_ms, t.transcript_ms - t.endpoint_ms,
            gap(t.transcript_ms, t.first_token_ms), gap(t.first_token_ms, t.first_final_ms),
            gap(t.first_final_ms, t.first_chunk_ms), t.first_audio_ms, t.cached_tokens,
            t.prompt_tokens,
        )  # fmt: skip

    def row(self) -> dict:
        return asdict(self)


class _Collector:
    def __init__(self) -> None:
        self.timings: list[TurnTimings] = []
        self.done = threading.Event()

    def turn_done(self, timings: TurnTimings) -> None:
        self.timings.append(timings)
        self.done.set()

    def __getattr__(self, name: str):
        return lambda *args: None  # status, heard, answer …: not needed here


def run(
    config: VoiceConfig,
    setup: Setup,
    engine: Engine,
    stt: Transcriber,
    tts: Synthesizer,
    rounds: int,
) -> list[LatencyRecord]:
    from bench.virtual_audio import VirtualAudio, missing_tools

    if missing_tools():
        raise RuntimeError(f"--voice needs {', '.join(missing_tools())} (Linux, PulseAudio)")
    audio = VirtualAudio.start()
    audio.activate()
    records = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            speech = [audio.say(q, folder, lead_silence=0.3) for q in QUESTIONS]
            for prefill in (True, False):
                cfg = apply_override(config, "llm.prefill_while_listening", prefill)
                for name, value in (("audio.input_device", "pulse"),
                                    ("audio.output_device", "pulse")):  # fmt: skip
                    cfg = apply_override(cfg, name, value)
                log = ChatLog()
                log.start_chat(Chat.new(setup.model))
                engine.reset()
                collector = _Collector()
                assistant = VoiceAssistant(
                    cfg, engine, setup.prompt, stt, tts,
                    make_detector(cfg.endpointing, MODEL_RATE), log, folder / "log.json", collector,
                )  # fmt: skip
                stop = threading.Event()

                def scenario(collector=collector, stop=stop) -> None:
                    try:
                        for i in range(rounds):
                            collector.done.clear()
                            time.sleep(0.5)
                            audio.play_into_mic(speech[i % len(speech)]).wait()
                            if not collector.done.wait(timeout=600):
                                break
                    finally:
                        stop.set()

                assistant.open()
                helper = threading.Thread(target=scenario)
                helper.start()
                assistant.serve(stop)
                helper.join()
                records += [
                    LatencyRecord.of(prefill, i, t) for i, t in enumerate(collector.timings)
                ]
    finally:
        audio.stop()
    return records


def summarize(records: list[LatencyRecord]) -> dict:
    out = {}
    for prefill in (True, False):
        rows = [r for r in records if r.prefill_while_listening == prefill]
        label = "with_prefill" if prefill else "without_prefill"
        for key in ("endpointing_ms", "stt_flush_ms", "prefill_ms", "first_final_ms",
                    "first_chunk_ms", "first_audio_ms"):  # fmt: skip
            values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
            out[f"{label}_{key}"] = statistics.median(values) if values else None
    return out
