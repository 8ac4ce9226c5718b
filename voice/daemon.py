"""The hands-free loop: microphone → endpointing → STT → engine → TTS → speaker.

One thread (the caller's) owns every model: MLX work is never spread over threads, and
the loop interleaves it. Each pass takes what the microphone delivered, then does one
unit of model work for the running turn: an engine step (one token) or a TTS step (one
80 ms frame), whichever keeps speech flowing while text keeps arriving. The audio
callbacks only queue blocks (see `voice.audio_io`).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np

from llm.backends import ChatEngine
from llm.chatlog import ChatLog, save_chat_log
from llm.config import PromptConfig
from llm.errors import ConfigError
from llm.messages import ChatMessage, Event, TextDelta, ToolCall, ToolResult, TurnDone
from llm.tool_loop import respond
from llm.tools.toolbox import Toolbox, conversation_workspace
from voice.audio_io import MODEL_RATE, AudioError, Block, Microphone, Speaker, rescan
from voice.chunker import SentenceChunker
from voice.config import VoiceConfig
from voice.stt import Transcriber
from voice.tts import Synthesizer
from voice.vad import Detector, Endpointer, SpeechDropped, SpeechEnded, SpeechStarted

# Speech to have queued on the speaker before text generation gets a turn again.
AHEAD_SECONDS = 0.3
# Blocks kept from before the detector fired, so the first syllable reaches the STT.
PREROLL_EXTRA_BLOCKS = 2


class Reporter(Protocol):
    """What the daemon tells its front end (terminal status, logs, tests)."""

    def status(self, state: str) -> None: ...
    def heard(self, text: str) -> None: ...
    def reasoning(self, text: str) -> None: ...
    def answer(self, text: str) -> None: ...
    def answer_done(self) -> None: ...
    def notice(self, text: str) -> None: ...
    def turn_done(self, timings: TurnTimings) -> None: ...


@dataclass
class TurnTimings:
    """Milliseconds from the end of the user's speech (the last speech block's arrival)."""

    endpoint_ms: float = 0.0  # endpointing noticed the end (includes the silence wait)
    transcript_ms: float = 0.0  # STT flushed: transcript complete
    first_token_ms: float | None = None
    first_final_ms: float | None = None
    first_chunk_ms: float | None = None  # the first sentence's first frame went to the speaker
    generation_ms: float | None = None  # the engine finished the answer
    first_audio_ms: float | None = None  # first audible sample played by the device
    stt_frames_while_speaking: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens: reused or prefilled while the user spoke
    interrupted: bool = False

    def as_log(self) -> dict[str, float | int | bool | None]:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class _Turn:
    events: Iterator[Event]
    chunker: SentenceChunker
    speech_end_at: float
    timings: TurnTimings
    user: ChatMessage
    chunks: deque[str] = field(default_factory=deque)
    speech: Iterator[np.ndarray] | None = None
    started_chunks: list[tuple[str, int]] = field(default_factory=list)  # (text, start sample)
    queued_samples: int = 0
    done: TurnDone | None = None
    cancelled: bool = False
    answer: str = ""
    played_base: int = 0  # the speaker's played-sample count when the turn began


class VoiceAssistant:
    def __init__(
        self,
        config: VoiceConfig,
        engine: ChatEngine,
        prompt: PromptConfig,
        transcriber: Transcriber,
        synthesizer: Synthesizer,
        detector: Detector,
        log: ChatLog,
        log_path: Path,
        reporter: Reporter,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.cfg, self.engine, self.prompt = config, engine, prompt
        self.stt, self.tts, self.detector = transcriber, synthesizer, detector
        self.log, self.log_path, self.report, self.clock = log, log_path, reporter, clock
        block_ms = config.audio.block_ms
        self.mic = Microphone(config.audio.input_device, block_ms)
        self.speaker = Speaker(config.audio.output_device)
        self.endpointer = Endpointer(config.endpointing, block_ms)
        self.preroll: deque[Block] = deque(maxlen=config.endpointing.hits + PREROLL_EXTRA_BLOCKS)
        self.turn: _Turn | None = None
        self.state = ""
        self._barge_blocks = 0
        self._deaf_until = 0.0
        self._last_speech_at = 0.0
        self._stt_frames_at_start = 0
        self._devices_down_since: float | None = None
        self._utterance_now = datetime.now()
        self._prefilled_words = 0
        tools = prompt.tools
        self.toolbox = (
            Toolbox(tools, conversation_workspace(tools, log.active().chat_id))
            if tools.enabled
            else None
        )

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        self.speaker.open()
        self.mic.open()
        self._set_state("listening")

    def close(self) -> None:
        if self.turn is not None:
            self._interrupt(save=True)
        self.mic.close()
        self.speaker.close()
        if self.toolbox is not None:
            self.toolbox.close()
        self.save()

    def save(self) -> None:
        save_chat_log(self.log_path, self.log)

    def serve(self, stop: threading.Event) -> None:
        """Run the loop until `stop` is set (SIGINT/SIGTERM in the CLI); then close cleanly."""
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()

    def step(self) -> None:
        """One pass of the loop (tests drive it directly)."""
        if self.mic.lost or self.speaker.lost:
            self._recover()
            return
        busy = self.turn is not None
        blocks = self.mic.drain() if busy else self._wait_block()
        for block in blocks:
            self._on_block(block)
        if self.turn is not None:
            self._advance()

    def _wait_block(self) -> list[Block]:
        first = self.mic.read(timeout=0.05)
        return [first, *self.mic.drain()] if first is not None else []

    def _recover(self) -> None:
        now = self.clock()
        if self._devices_down_since is None:
            self._devices_down_since = now
            which = "microphone" if self.mic.lost else "speaker"
            self.report.notice(f"the {which} went away; waiting for it to come back")
            self._set_state("waiting for audio device")
            if self.turn is not None:
                self._interrupt(save=True)
            self.mic.close()
            self.speaker.close()
        time.sleep(self.cfg.audio.reopen_seconds)
        try:
            rescan()
            self.speaker.open()
            self.mic.open()
        except AudioError:
            self.mic.close()
            self.speaker.close()
            return
        self._devices_down_since = None
        self.endpointer.reset()
        self.report.notice("audio devices are back")
        self._set_state("listening")

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.report.status(state)

    # ------------------------------------------------------------------ listening
    def _on_block(self, block: Block) -> None:
        if self.turn is not None:
            self._while_answering(block)
            return
        if block.at < self._deaf_until:
            return  # the tail of our own voice, still in the room
        is_speech = self.detector(block.pcm)
        event = self.endpointer.update(is_speech)
        self.preroll.append(block)
        if is_speech:
            self._last_speech_at = block.at
        if isinstance(event, SpeechStarted):
            self._start_hearing(list(self.preroll)[-(event.blocks_back + PREROLL_EXTRA_BLOCKS) :])
        elif self.stt.active and self.stt.room > 0 and self.stt.feed(block.pcm):
            self._prefill_heard_words()
        if isinstance(event, SpeechEnded):
            self._end_of_speech(block)
        elif isinstance(event, SpeechDropped):
            self.stt.finish()
            self._set_state("listening")

    def _start_hearing(self, blocks: list[Block]) -> None:
        self._set_state("hearing")
        self.stt.start()
        self._stt_frames_at_start = self.stt.frames_fed
        # One clock reading per utterance, so that the prompt rendered while listening and
        # the one rendered at the end agree on any time placeholder.
        self._utterance_now = datetime.now()
        self._prefilled_words = 0
        for b in blocks:
            self.stt.feed(b.pcm)

    def _prefill_heard_words(self) -> None:
        """While the user speaks, prefill the conversation up to the words already heard,
        so that at the end of speech only the last words are left to prefill."""
        if not self.cfg.llm.prefill_while_listening:
            return
        text = self.stt.text
        words = len(text.split())
        if words - 1 <= self._prefilled_words:  # the last word may still grow
            return
        self._prefilled_words = words - 1
        history = [*self.log.active().history(), ChatMessage("user", text)]
        # A rendering problem is reported by the real turn; here it only means no head start.
        with contextlib.suppress(ConfigError):
            tools = self.toolbox.declarations if self.toolbox else []
            self.engine.prefill(history, self.prompt, now=self._utterance_now, tools=tools)

    def _end_of_speech(self, block: Block) -> None:
        frames_while_speaking = self.stt.frames_fed - self._stt_frames_at_start
        speech_end = self._last_speech_at or block.at
        endpointed = self.clock()
        text = self.stt.finish()
        transcribed = self.clock()
        if not text:
            self.report.notice("(heard speech but no words)")
            self._set_state("listening")
            return
        self.report.heard(text)
        timings = TurnTimings(
            endpoint_ms=(endpointed - speech_end) * 1000,
            transcript_ms=(transcribed - speech_end) * 1000,
            stt_frames_while_speaking=frames_while_speaking,
        )
        self._start_turn(text, speech_end, timings)

    # ------------------------------------------------------------------ answering
    def _start_turn(self, text: str, speech_end: float, timings: TurnTimings) -> None:
        user = ChatMessage("user", text)
        history = [*self.log.active().history(), user]
        c = self.cfg.chunking
        turn = _Turn(
            events=iter(()),
            chunker=SentenceChunker(c.chunk_chars, c.min_chars, c.sentences),
            speech_end_at=speech_end,
            timings=timings,
            user=user,
        )
        turn.events = respond(
            self.engine,
            history,
            self.prompt,
            self.toolbox,
            should_stop=lambda: turn.cancelled,
            now=self._utterance_now,
        )
        turn.played_base = self.speaker.played_samples
        self.turn = turn
        self.speaker.first_sound_at = None
        self._barge_blocks = 0
        self._set_state("thinking")

    def _while_answering(self, block: Block) -> None:
        if not self.cfg.barge_in.enabled:
            return  # the microphone would hear the assistant's own voice
        self.preroll.append(block)
        self._barge_blocks = self._barge_blocks + 1 if self.detector(block.pcm) else 0
        needed = max(1, math.ceil(self.cfg.barge_in.min_speech_ms / self.cfg.audio.block_ms))
        if self._barge_blocks >= needed:
            self.report.notice("(interrupted)")
            self._interrupt(save=True)
            self.endpointer.reset(warmup=False)
            # Carry on as if the endpointer had just heard the start of this utterance.
            for _ in range(self.cfg.endpointing.hits):
                self.endpointer.update(True)
            self._last_speech_at = block.at
            self._start_hearing(list(self.preroll)[-(needed + PREROLL_EXTRA_BLOCKS) :])

    def _advance(self) -> None:
        turn = self.turn
        assert turn is not None
        if turn.speech is None and turn.chunks:
            self._start_chunk(turn)
        need_text = turn.done is None and not turn.chunks
        ahead = self.speaker.pending_seconds()
        if need_text and (turn.speech is None or ahead >= AHEAD_SECONDS):
            self._engine_step(turn)
        elif turn.speech is not None:
            self._tts_step(turn)
        elif turn.done is None:
            self._engine_step(turn)
        elif self.speaker.busy:
            time.sleep(0.01)
        else:
            self._finish_turn()

    def _engine_step(self, turn: _Turn) -> None:
        try:
            event = next(turn.events)
        except StopIteration:
            return
        except ConfigError as e:
            self.report.notice(f"error: {e}")
            self.turn = None
            self._set_state("listening")
            return
        now = self.clock()
        if isinstance(event, TextDelta):
            if turn.timings.first_token_ms is None:
                turn.timings.first_token_ms = (now - turn.speech_end_at) * 1000
            if event.channel == "final" and not event.recipient:
                if turn.timings.first_final_ms is None:
                    turn.timings.first_final_ms = (now - turn.speech_end_at) * 1000
                turn.answer += event.text
                self.report.answer(event.text)
                turn.chunks.extend(turn.chunker.push(event.text))
            elif event.channel == "analysis" and not event.recipient:
                self.report.reasoning(event.text)
        elif isinstance(event, ToolCall):
            self.report.notice(f"→ {event.message.recipient}")
            if self.toolbox is not None and self.toolbox.config.spoken_notices:
                # Said while the tool runs; the result itself is for the model, not the ear.
                turn.chunks.append(self.toolbox.notice(event.message.recipient))
        elif isinstance(event, ToolResult):
            first = (event.message.content.strip().splitlines() or [""])[0]
            self.report.notice(f"← {event.message.name}: {first[:80]}")
        elif isinstance(event, TurnDone):
            turn.done = event
            turn.timings.generation_ms = (now - turn.speech_end_at) * 1000
            self.report.answer_done()
            turn.chunks.extend(turn.chunker.flush())

    def _start_chunk(self, turn: _Turn) -> None:
        text = turn.chunks.popleft()
        turn.started_chunks.append((text, turn.queued_samples))
        turn.speech = self.tts.speak(text)
        self._set_state("speaking")

    def _tts_step(self, turn: _Turn) -> None:
        assert turn.speech is not None
        frame = next(turn.speech, None)
        if frame is None:
            turn.speech = None
            return
        self.speaker.play(frame)
        if turn.timings.first_chunk_ms is None:
            turn.timings.first_chunk_ms = (self.clock() - turn.speech_end_at) * 1000
        turn.queued_samples += len(frame)

    def _finish_turn(self) -> None:
        turn = self.turn
        assert turn is not None and turn.done is not None
        self._record(turn, heard=None)
        self.turn = None
        self._deaf_until = self.clock() + self.cfg.barge_in.echo_guard_ms / 1000
        self.endpointer.reset(warmup=False)
        self._set_state("listening")

    def _interrupt(self, save: bool) -> None:
        """Stop speaking and generating now; keep in the history what the user heard."""
        turn = self.turn
        assert turn is not None
        played = self.speaker.played_samples - turn.played_base
        played = played * MODEL_RATE // self.speaker.rate  # chunk offsets are at model rate
        self.speaker.clear()
        turn.cancelled = True
        if turn.speech is not None:
            turn.speech.close()  # type: ignore[attr-defined]
        while turn.done is None:  # the engine stops after its current token
            try:
                event = next(turn.events)
            except StopIteration:
                break
            if isinstance(event, TurnDone):
                turn.done = event
        turn.timings.interrupted = True
        heard = " ".join(text for text, start in turn.started_chunks if start < played)
        if save and turn.done is not None:
            self._record(turn, heard=heard)
        self.turn = None

    def _record(self, turn: _Turn, heard: str | None) -> None:
        assert turn.done is not None
        if self.speaker.first_sound_at is not None:
            turn.timings.first_audio_ms = (
                self.speaker.first_sound_at + self.speaker.latency - turn.speech_end_at
            ) * 1000
        turn.timings.prompt_tokens = turn.done.stats.prompt_tokens
        turn.timings.cached_tokens = turn.done.stats.cached_tokens
        chat = self.log.active()
        chat.append(turn.user)
        hyper = self.prompt.sampling.model_dump()
        finals = [m for m in turn.done.messages if m.channel == "final"]
        for msg in turn.done.messages:
            if msg.channel != "final":
                chat.append(msg)
        if heard is not None:
            # Interrupted: the model's words the user never heard are not part of the talk.
            final = ChatMessage("assistant", f"{heard} …".strip(), "final")
        else:
            final = finals[-1] if finals else ChatMessage("assistant", turn.answer, "final")
        chat.append(final, hyper, extra={"voice_timings": turn.timings.as_log()})
        self.save()
        self.report.turn_done(turn.timings)
