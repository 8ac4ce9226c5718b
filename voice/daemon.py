"""The hands-free loop: microphone → endpointing → STT → engine → TTS → speaker.

One thread (the caller's) owns every model, and the loop interleaves their work (unless
`tts.own_thread` gives the TTS a thread of its own: `voice.synthesis_thread`). Each pass
runs the commands other threads submitted (the control socket, typed lines), takes what
the microphone delivered, then does one unit of model work for the running turn: an
engine step (one token) or a TTS step (one 80 ms frame), whichever keeps speech flowing
while text keeps arriving. The audio callbacks only queue blocks (see `voice.audio_io`).

Either side may be off (`audio.use_stt` / `audio.use_tts`): without STT questions come
only as typed or control-socket text; without TTS answers are only shown and returned.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import numpy as np

from mlx_harmony.llm.backends import ChatEngine
from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.errors import ConfigError, HarmonyError
from mlx_harmony.llm.messages import ChatMessage, Event, TextDelta, ToolCall, ToolResult, TurnDone
from mlx_harmony.llm.session import Session
from mlx_harmony.llm.tool_loop import respond
from mlx_harmony.voice import turns
from mlx_harmony.voice.audio_io import AudioError, Block, Microphone, Speaker, rescan
from mlx_harmony.voice.config import VoiceConfig
from mlx_harmony.voice.control import Reply, Request
from mlx_harmony.voice.earcons import Earcons
from mlx_harmony.voice.echo import EchoCanceller
from mlx_harmony.voice.echo import available as echo_available
from mlx_harmony.voice.hearing import Hearing
from mlx_harmony.voice.speaking import SpokenAnswer, Voice
from mlx_harmony.voice.stt import Transcriber
from mlx_harmony.voice.synthesis import TextToSpeech
from mlx_harmony.voice.synthesis_thread import ThreadedTTS
from mlx_harmony.voice.timings import TurnTimings
from mlx_harmony.voice.turn_scorer import TurnScorer
from mlx_harmony.voice.turns import (
    AnswerFinished,
    AnswerStarted,
    Ask,
    CancelTurn,
    ConfirmTurn,
    DeviceBack,
    DeviceLost,
    DropHearing,
    DropTurn,
    Earcon,
    EndScore,
    Feed,
    FinishHearing,
    Mute,
    Notice,
    PeekHearing,
    Prefill,
    Rules,
    ScoreEnd,
    ScoreText,
    ShowWords,
    StartHearing,
    StartTurn,
    State,
    Status,
    Stop,
    TalkKey,
    Transcript,
    free,
)  # fmt: skip
from mlx_harmony.voice.vad import Detector

# Blocks kept from before the detector fired, so the first syllable reaches the STT.
PREROLL_EXTRA_BLOCKS = 2


class Reporter(Protocol):
    """What the daemon tells its front end (terminal status, logs, tests)."""

    def status(self, state: str) -> None: ...
    def heard(self, text: str) -> None: ...
    def partial(self, text: str) -> None: ...  # the words heard so far ("" clears them)
    def reasoning(self, text: str) -> None: ...
    def answer(self, text: str) -> None: ...
    def answer_done(self) -> None: ...
    def notice(self, text: str) -> None: ...
    def turn_done(self, timings: TurnTimings) -> None: ...


@dataclass
class _Turn:
    """An answer being generated and spoken, or (without `user`) a text only spoken."""

    events: Iterator[Event]
    speech: SpokenAnswer | None  # the answer's voice (None: no TTS)
    speech_end_at: float
    timings: TurnTimings
    user: ChatMessage | None
    reply: Reply | None = None  # who asked, when not the microphone
    generated: bool = False  # the engine has nothing more to say
    done: TurnDone | None = None
    cancelled: bool = False
    answer: str = ""
    # A speculative turn, until confirmed: its frames (in `speech`) and what would be
    # shown are held, and a tool call waits (it may act on the world); `mark` is the
    # engine's cache before it.
    held: bool = False
    held_reports: list[Callable[[], None]] = field(default_factory=list)
    at_tool: bool = False
    mark: object = None

    def show(self, report: Callable[[], None]) -> None:
        if self.held:
            self.held_reports.append(report)
        else:
            report()


class VoiceAssistant:
    """The I/O shell around `voice.turns`: it turns audio, transcripts and playback into
    turn-taking events and carries out the actions that come back. No turn rule lives
    here; the devices and the clock are injected (built from the config when not given)."""

    def __init__(
        self,
        config: VoiceConfig,
        engine: ChatEngine,
        prompt: PromptConfig,
        transcriber: Transcriber | None,
        synthesizer: TextToSpeech | None,
        detector: Detector,
        session: Session,
        reporter: Reporter,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        mic: Microphone | None = None,
        speaker: Speaker | None = None,
        turn_scorer: TurnScorer | None = None,
    ) -> None:
        self.cfg, self.engine, self.prompt = config, engine, prompt
        self._tts_thread: ThreadedTTS | None = None
        if synthesizer is not None and config.tts.own_thread:
            synthesizer = self._tts_thread = ThreadedTTS(synthesizer, clock)
            synthesizer.warmup()
        self.stt, self.tts, self.detector = transcriber, synthesizer, detector
        self.session, self.report, self.clock = session, reporter, clock
        self.sleep = sleep  # waits on the clock's time (a test's clock: no real wait)
        audio = config.audio
        if transcriber is not None:
            self.mic = mic or Microphone(audio.input_device, audio.block_ms)
        else:
            self.mic = None
        self.speaker = (speaker or Speaker(audio.output_device)) if synthesizer else None
        self.echo = self._echo_canceller()
        hears, speaks = self.mic is not None, self.speaker is not None
        pauses = transcriber is not None and transcriber.predicts_pauses
        self.scorer = turn_scorer if hears else None
        self._scorer_failed = False
        self.rules = Rules.from_config(
            config, self.echo is not None, hears, speaks, pauses,
            turn_model=self.scorer is not None,
            text_signal=hears and config.endpointing.text_weight > 0,
        )  # fmt: skip
        self.conv = State.start(self.rules)
        self.earcons = Earcons(config.activation.earcon_volume) if self.rules.earcons else None
        self.preroll: deque[Block] = deque(
            maxlen=max(config.endpointing.hits, self.rules.barge_in_blocks) + PREROLL_EXTRA_BLOCKS
        )
        self.turn: _Turn | None = None
        self.state = ""
        self._block: Block | None = None  # the microphone block being handled
        self.hearing = (
            Hearing(transcriber, engine, self.scorer, clock) if transcriber is not None else None
        )
        self._devices_down = False
        self._utterance_now = datetime.now()
        self.turns = 0
        # Speculative starts: "started", "confirmed", "dropped" (the waste).
        self.speculations: Counter[str] = Counter()
        self.voice = (
            Voice(synthesizer, self.speaker, clock, config.tts.playout_buffer, reporter.notice)
            if synthesizer is not None and self.speaker is not None
            else None
        )
        self._commands: queue.Queue[tuple[Request, Reply | None]] = queue.Queue()
        self._waiting: deque[tuple[Request, Reply | None]] = deque()  # asks and says
        self._chat_id = session.chat.chat_id  # for the control socket's thread

    def _echo_canceller(self) -> EchoCanceller | None:
        mode = self.cfg.audio.echo_cancellation
        if mode == "off" or self.mic is None or self.speaker is None:
            return None
        if not echo_available():
            if mode == "on":
                raise ConfigError(
                    "audio.echo_cancellation: on, but pywebrtc-audio is not installed"
                )
            return None
        return EchoCanceller(self.speaker)

    @property
    def muted(self) -> bool:
        return self.conv.muted

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        self._open_devices()
        if self.mic is not None:
            self.report.notice(self.rules.end_of_turn())
        self._set_state(self.conv.idle_status(self.clock()))
        self._greet(self.session.greet())

    def close(self) -> None:
        if self.turn is not None:
            self._interrupt(save=True)
        if self._tts_thread is not None:
            self._tts_thread.close()
        self._close_devices()
        # Its resamplers are native objects: released now, not left to the interpreter's
        # exit (where nanobind reports them as leaked).
        self.echo = None
        if self.scorer is not None:
            self.scorer.close()
        self.session.close()
        self.save()
        leftovers = [*self._waiting, *self._drain_commands()]
        self._waiting.clear()
        for _, reply in leftovers:
            if reply is not None:
                reply.error("the assistant stopped")

    def _open_devices(self) -> None:
        if self.speaker is not None:
            self.speaker.open()
        if self.mic is not None:
            self.mic.open()
        if self.echo is not None:
            self.echo.reset()

    def _close_devices(self) -> None:
        if self.mic is not None:
            self.mic.close()
        if self.speaker is not None:
            self.speaker.close()

    def save(self) -> None:
        """Write the log; a failure is said and the conversation goes on in memory (the
        next turn's save tries again). A new log with no message at all is not written:
        an assistant that could not even open its devices leaves no file behind."""
        session = self.session
        if session.empty and not session.log_path.exists():
            return
        why = session.save()
        if why is not None:
            self.report.notice(
                f"Could not save {session.log_path} ({why}); the conversation is kept in memory."
            )

    def serve(self, stop: threading.Event) -> None:
        """Run the loop until `stop` is set (SIGINT/SIGTERM in the CLI); then close cleanly."""
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()

    def step(self) -> None:
        """One pass of the loop (tests drive it directly)."""
        lost = [d for d in (self.mic, self.speaker) if d is not None and d.lost]
        if lost:
            self._recover("microphone" if lost[0] is self.mic else "speaker")
            return
        self._run_commands()
        busy = self.turn is not None
        if self.mic is not None:
            for block in self.mic.drain() if busy else self._wait_block(self.mic):
                self._on_block(block)
        elif not busy:
            self._wait_command(timeout=0.05)
        if self.scorer is not None:
            self._take_scores(self.scorer)
        if self.turn is not None:
            self._advance()
            return
        hearing = self.hearing
        if hearing is not None:
            hearing.prefill_step()
            if not hearing.prefilling and hearing.text_to_score is not None:
                for event in self._score_text(hearing.text_to_score):
                    self._handle(event)
        if self._waiting and free(self.conv):
            self._start_waiting()

    def _take_scores(self, scorer: TurnScorer) -> None:
        for heard_until, p in scorer.results():
            self._handle(EndScore(p, heard_until))
        if scorer.failure is not None and not self._scorer_failed:
            self._scorer_failed = True
            self.report.notice(
                f"the turn model stopped ({scorer.failure}); turns end after "
                f"{self.cfg.endpointing.max_wait_ms} ms of silence"
            )

    def _wait_block(self, mic: Microphone) -> list[Block]:
        first = mic.read(timeout=0.05)
        return [first, *mic.drain()] if first is not None else []

    def _recover(self, which: str) -> None:
        if not self._devices_down:
            self._devices_down = True
            self._handle(DeviceLost(which))
            self._close_devices()
        self.sleep(self.cfg.audio.reopen_seconds)
        try:
            rescan()
            self._open_devices()
        except AudioError:
            self._close_devices()
            return
        self._devices_down = False
        self._handle(DeviceBack())

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.report.status(state)

    # ------------------------------------------------------------------ turn-taking
    def _handle(self, event: turns.Event) -> None:
        """Run `event` through the turn rules and carry out their actions (which may
        answer with events of their own: a transcript, the words heard so far)."""
        pending = [event]
        while pending:
            self.conv, actions = turns.step(self.conv, pending.pop(0), self.clock())
            for action in actions:
                pending += self._act(action)

    def _act(self, action: turns.Action) -> list[turns.Event]:
        match action:
            case Status(text):
                self._set_state(text)
            case Notice(text):
                self.report.notice(text)
            case ShowWords(text):
                self.report.partial(text)
            case StartHearing(blocks):
                assert self.hearing is not None
                # One clock reading per utterance, so that the prompt rendered while
                # listening and the one rendered at the end agree on any time placeholder.
                self._utterance_now = datetime.now()
                preroll = list(self.preroll)[-(blocks + PREROLL_EXTRA_BLOCKS) :]
                return self.hearing.start([b.pcm for b in preroll])
            case Feed(audio, later):
                assert self.hearing is not None and isinstance(audio, np.ndarray)
                return self.hearing.feed(audio, later)
            case Prefill(text):
                assert self.hearing is not None
                self.hearing.prefill(self._asking(text))
            case ScoreEnd(at):
                assert self.scorer is not None
                self.scorer.request(at)
            case ScoreText(text):
                return self._score_text(text)
            case FinishHearing(silence_ms, by):
                text = self._finish_hearing(silence_ms / 1000)
                assert self.hearing is not None
                self.hearing.timings.ended_by = by
                return [Transcript(text)]
            case PeekHearing(silence_ms):
                return [Transcript(self._finish_hearing(silence_ms / 1000, peek=True))]
            case DropHearing():
                assert self.hearing is not None
                self.hearing.drop()
            case StartTurn(text, at, typed, speculative, reply):
                assert typed or self.hearing is not None
                timings = TurnTimings(typed=True) if typed else self.hearing.timings
                if not typed and not speculative:
                    self.report.heard(text)
                assert reply is None or isinstance(reply, Reply)
                self._start_turn(text, at, timings, reply, speculative)
            case ConfirmTurn(by):
                self._confirm_turn(by)
            case DropTurn():
                self._drop_turn()
            case CancelTurn():
                if self.turn is not None:
                    self._interrupt(save=True)
            case Earcon(kind):
                if self.earcons is not None and self.speaker is not None:
                    self.speaker.play(self.earcons.tone(kind))
        return []

    # ------------------------------------------------------------------ commands
    def submit(self, request: Request, reply: Reply | None = None) -> None:
        """Queue a command from any thread; it runs on the loop's thread, in order."""
        self._commands.put((request, reply))

    def status(self) -> dict[str, object]:
        """A snapshot for the control socket (read from its thread: plain values only)."""
        return {
            "state": self.state,
            "muted": self.muted,
            "hears": self.mic is not None,
            "speaks": self.tts is not None,
            "tts": self.tts.speed.describe() if self.tts and self.tts.speed else None,
            "activation": self.rules.activation,
            "echo_cancellation": self.echo is not None,
            "barge_in": self.rules.barge_in,
            "end_of_turn": self.rules.end_of_turn().removeprefix("end of turn: "),
            "chat_log": str(self.session.log_path),
            "chat_id": self._chat_id,
            "turns": self.turns,
            "waiting": len(self._waiting),
        }

    def _drain_commands(self) -> list[tuple[Request, Reply | None]]:
        out = []
        while True:
            try:
                out.append(self._commands.get_nowait())
            except queue.Empty:
                return out

    def _wait_command(self, timeout: float) -> None:
        try:
            command = self._commands.get(timeout=timeout)
        except queue.Empty:
            return
        self._run(*command)

    def _run_commands(self) -> None:
        for command in self._drain_commands():
            self._run(*command)

    def _run(self, request: Request, reply: Reply | None) -> None:
        reply = reply or Reply()
        cmd = request.cmd
        if cmd in ("mute", "unmute"):
            self._handle(Mute(cmd == "mute"))
            reply.done(muted=self.muted)
        elif cmd == "stop":
            stopped = self.turn is not None
            self._handle(Stop())
            reply.done(stopped=stopped)
        elif cmd == "listen":
            if self.mic is None:
                reply.error("speech input is off (audio.use_stt)")
            else:
                self._handle(TalkKey())
                reply.done(state=self.state)
        elif cmd == "new-chat":
            if self.turn is not None:
                self._interrupt(save=True)
                self._handle(AnswerFinished())
            self._new_chat()
            reply.done(chat_id=self._chat_id)
        elif cmd == "say" and self.tts is None:
            reply.error("speech output is off (audio.use_tts)")
        elif cmd in ("say", "ask"):
            self._waiting.append((request, reply))  # taken up once nothing else runs
        else:
            reply.error(f"'{cmd}' is answered by the control socket itself")

    def _start_waiting(self) -> None:
        request, reply = self._waiting.popleft()
        assert request.text is not None
        if request.cmd == "say":
            self._start_saying(request.text, reply)
            self._handle(AnswerStarted())
            return
        self.report.heard(request.text)
        self._utterance_now = datetime.now()
        self._handle(Ask(request.text, reply))

    def _new_chat(self) -> None:
        greeting = self.session.new_chat()
        self._chat_id = self.session.chat.chat_id
        self._greet(greeting)
        self.save()

    def _greet(self, greeting: str | None) -> None:
        """The prompt config's greeting, shown, and spoken if so configured (at start, and
        opening each new chat, as in the text chat)."""
        if greeting is None:
            return
        self.report.answer(greeting)
        self.report.answer_done()
        if self.tts is not None and self.cfg.tts.greeting:
            self._waiting.appendleft((Request(cmd="say", text=greeting), None))

    # ------------------------------------------------------------------ listening
    def _on_block(self, block: Block) -> None:
        if self.echo is not None:
            block = self.echo(block)
        self.preroll.append(block)
        self._block = block
        speech = self.detector(block.pcm)
        self._handle(turns.Block(block.at, speech, block.pcm))

    def _asking(self, text: str) -> Conversation:
        """The conversation as it would be asked with `text` as the user's message."""
        history = [*self.session.chat.history(), ChatMessage("user", text)]
        toolbox = self.session.toolbox
        tools = toolbox.declarations if toolbox else []
        return Conversation(history, self.prompt, now=self._utterance_now, tools=tools)

    def _score_text(self, text: str) -> list[turns.Event]:
        assert self.hearing is not None
        return self.hearing.score_text(text, self._asking(text), busy=self.turn is not None)

    def _finish_hearing(self, silence_s: float, peek: bool = False) -> str:
        assert self.hearing is not None and self._block is not None
        speech_end = self.conv.last_speech_at or self._block.at
        return self.hearing.finish(silence_s, speech_end, peek)

    # ------------------------------------------------------------------ answering
    def _new_turn(self, user: ChatMessage | None, at: float, timings: TurnTimings,
                  reply: Reply | None, held: bool = False) -> _Turn:  # fmt: skip
        voice = self.voice
        speech = voice.answer(timings, at, held, self._playing) if voice is not None else None
        self.turn = _Turn(iter(()), speech, at, timings, user, reply, held=held)
        return self.turn

    def _playing(self) -> None:
        self._set_state("speaking")

    def _start_turn(
        self,
        text: str,
        speech_end: float,
        timings: TurnTimings,
        reply: Reply | None = None,
        speculative: bool = False,
    ) -> None:
        user = ChatMessage("user", text)
        history = [*self.session.chat.history(), user]
        if self.hearing is not None:
            self.hearing.stop_prefill()  # the turn's own prefill feeds whatever is left
        mark = self.engine.mark() if speculative else None
        turn = self._new_turn(user, speech_end, timings, reply, held=speculative)
        if speculative:
            turn.mark = mark
            timings.speculative = True
            self.speculations["started"] += 1
        turn.events = respond(
            self.engine,
            history,
            self.prompt,
            self.session.toolbox,
            should_stop=lambda: turn.cancelled,
            now=self._utterance_now,
            start=self.cfg.llm.reply_start(),
        )

    def _confirm_turn(self, by: str) -> None:
        """The speculative turn's question was the user's whole turn: from now on it is an
        ordinary answer, and what was held comes out at once."""
        turn = self.turn
        assert turn is not None and turn.held and turn.user is not None
        self.speculations["confirmed"] += 1
        turn.timings.endpoint_ms = (self.clock() - turn.speech_end_at) * 1000
        turn.timings.ended_by = by
        self.report.heard(turn.user.content)
        reports = turn.held_reports
        turn.held, turn.held_reports, turn.at_tool = False, [], False
        for report in reports:
            report()
        if turn.speech is not None:
            turn.speech.confirm()

    def _drop_turn(self) -> None:
        """The user went on speaking: the speculative turn ends unseen and unheard, and the
        engine's cache goes back to before it."""
        turn = self.turn
        assert turn is not None and turn.held
        self.speculations["dropped"] += 1
        turn.cancelled = True
        close = getattr(turn.events, "close", None)
        if close is not None:
            close()  # the engine stops at the token it is on
        self.engine.rollback(turn.mark)
        if turn.speech is not None:
            turn.speech.end()
        self.turn = None

    def _start_saying(self, text: str, reply: Reply | None) -> None:
        """Speak a text as the assistant's voice; it is not part of the conversation."""
        turn = self._new_turn(None, self.clock(), TurnTimings(), reply)
        turn.generated = True
        assert turn.speech is not None  # `say` is refused without a voice
        turn.speech.say(text)
        turn.speech.finish()

    def _advance(self) -> None:
        turn = self.turn
        assert turn is not None
        speech, timings = turn.speech, turn.timings
        if speech is not None and speech.wants_step():
            speech.step()  # which keeps its own slowest step
        elif not turn.generated and not turn.at_tool:
            start = self.clock()
            self._engine_step(turn)
            took = (self.clock() - start) * 1000
            timings.slowest_engine_step_ms = max(timings.slowest_engine_step_ms, took)
        elif turn.held:
            self.sleep(0.005)  # held until the end of the turn is confirmed or dropped
        elif speech is not None and speech.synthesizing:
            speech.wait(0.005)  # the TTS's own thread is making the next frame
        elif speech is not None and speech.playing:
            self.sleep(0.01)
        else:
            self._finish_turn()

    def _engine_step(self, turn: _Turn) -> None:
        try:
            event = next(turn.events)
        except StopIteration:
            return
        except HarmonyError as e:
            self.report.notice(f"error: {e}")
            if turn.reply is not None:
                turn.reply.error(str(e))
            self.turn = None
            self._handle(AnswerFinished())
            return
        now = self.clock()
        speech = turn.speech
        if isinstance(event, TextDelta):
            if turn.timings.first_token_ms is None:
                turn.timings.first_token_ms = (now - turn.speech_end_at) * 1000
            text = event.text
            if event.kind == "answer":
                if turn.timings.first_final_ms is None:
                    turn.timings.first_final_ms = (now - turn.speech_end_at) * 1000
                turn.answer += text
                turn.show(lambda: self.report.answer(text))
                if turn.reply is not None:
                    turn.reply.event(event="answer", text=text)
                if speech is not None:
                    speech.write(text)
            elif event.kind == "reasoning":
                turn.show(lambda: self.report.reasoning(text))
        elif isinstance(event, ToolCall):
            # A speculative turn goes no further: the tool would act before the user is
            # known to be done (the generator waits before running it).
            turn.at_tool = turn.held
            recipient = event.message.recipient
            turn.show(lambda: self.report.notice(f"→ {recipient}"))
            if speech is not None:
                speech.tool_call()  # the notice, then silence while it runs
                toolbox = self.session.toolbox
                if toolbox is not None and toolbox.config.spoken_notices:
                    # Said while the tool runs; the result itself is for the model.
                    speech.say(toolbox.notice(recipient) + " ")
        elif isinstance(event, ToolResult):
            first = (event.message.content.strip().splitlines() or [""])[0]
            self.report.notice(f"← {event.message.name}: {first[:80]}")
            if speech is not None:
                speech.tool_result()
        elif isinstance(event, TurnDone):
            turn.done, turn.generated = event, True
            turn.timings.generation_ms = (now - turn.speech_end_at) * 1000
            turn.show(self.report.answer_done)
            if speech is not None:
                speech.finish()

    def _finish_turn(self) -> None:
        turn = self.turn
        assert turn is not None
        if turn.speech is not None and self.voice is not None:
            self.speaker.expecting = False
            self.voice.learn(turn.speech)
        if turn.user is not None:
            self._record(turn, heard=None)
        elif turn.reply is not None:
            turn.reply.done(interrupted=False)
        self.turn = None
        self._handle(AnswerFinished())

    def _interrupt(self, save: bool) -> None:
        """Stop speaking and generating now; keep in the history what the user heard. A
        speculative answer not yet confirmed is dropped instead: the user was not known to
        be done, and nothing of it was played (the assistant stopping mid-pause)."""
        turn = self.turn
        assert turn is not None
        if turn.held:
            self._drop_turn()
            return
        # Without a voice every word was shown, so all of it was "heard".
        heard = turn.speech.stop() if turn.speech is not None else turn.answer
        turn.cancelled = True
        while not turn.generated:  # the engine stops after its current token
            try:
                event = next(turn.events)
            except StopIteration:
                break
            if isinstance(event, TurnDone):
                turn.done, turn.generated = event, True
        turn.timings.interrupted = True
        if turn.user is not None and save and turn.done is not None:
            self._record(turn, heard=heard)
        elif turn.reply is not None:
            turn.reply.done(interrupted=True)
        self.turn = None

    def _record(self, turn: _Turn, heard: str | None) -> None:
        assert turn.done is not None and turn.user is not None
        if turn.speech is not None:
            turn.speech.account()
        turn.timings.prompt_tokens = turn.done.stats.prompt_tokens
        turn.timings.cached_tokens = turn.done.stats.cached_tokens
        finals = [m for m in turn.done.messages if m.channel == "final"]
        if heard is not None:
            # Interrupted: the model's words the user never heard are not part of the talk.
            final = ChatMessage("assistant", f"{heard} …".strip(), "final")
        else:
            final = finals[-1] if finals else ChatMessage("assistant", turn.answer, "final")
        others = [m for m in turn.done.messages if m.channel != "final"]
        self.session.record(
            [turn.user, *others, final],
            self.prompt.sampling.model_dump(),
            extra={"voice_timings": turn.timings.as_log()},
        )
        self.save()
        self.turns += 1
        if turn.reply is not None:
            turn.reply.done(answer=final.content, interrupted=heard is not None)
        self.report.turn_done(turn.timings)
