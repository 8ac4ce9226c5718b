"""Turn-taking: what the assistant does next, as a pure function of what happened.

`step(state, event, now) -> (state, actions)` holds every rule of the conversation —
when an utterance starts and ends, when one is too short, who was addressed, when the
assistant may be interrupted, how long it stays deaf to its own voice, what a device loss
or a mute does — and nothing else: it reads no clock, opens no device and runs no model.
`voice.daemon.VoiceAssistant` is the shell that turns audio, transcripts and playback into
events and carries the actions out. Tests drive `step` with scripted events and a fake
clock (`tests/test_voice_turns.py`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from difflib import SequenceMatcher
from typing import Literal

from mlx_harmony.voice.config import VoiceConfig
from mlx_harmony.voice.turn_policy import Fusion, Policy
from mlx_harmony.voice.vad import Endpointer, SpeechDropped, SpeechEnded, SpeechStarted, VadEvent

Activation = Literal["always", "wake_phrase", "push_to_talk"]
# Weight of the newest pause probability in its running average.
PAUSE_SMOOTHING = 0.3
Phase = Literal["idle", "hearing", "answering", "down"]
# Where the utterance being heard stands (also speech heard over the answer): open;
# ending (its end decided, the transcript on its way); early (the transcript taken at a
# pause, the STT's stream going on); early_answer (and an answer to it started, held
# unplayed until the end is confirmed). Speech that resumes drops an early start, and the
# stream hears on.
Ear = Literal["open", "ending", "early", "early_answer"]
# What decided that the user was done (in each turn's timings and the log).
EndedBy = Literal["silence", "turn detector", "predicted pause", "key"]


@dataclass(frozen=True)
class Rules:
    """The turn-taking settings, read once from the config."""

    endpointer: Endpointer
    block_ms: int
    barge_in: bool
    barge_in_blocks: int
    echo_guard_s: float  # deaf after playback (when the echo is not cancelled)
    activation: Activation = "always"
    wake_phrases: tuple[str, ...] = ()
    follow_up_s: float = 8.0  # after an answer (or a wake phrase), no wake phrase needed
    stop_phrases: tuple[str, ...] = ()
    prefill: bool = True
    earcons: bool = False
    hears: bool = True
    speaks: bool = True
    # Semantic end of turn: the STT's pause prediction, smoothed, above `pause_threshold`
    # once the utterance is `pause_ignore_steps` frames old, at a silent block.
    semantic: bool = False
    pause_threshold: float = 0.6
    pause_ignore_steps: int = 12
    # Speculative start: after this many silent blocks, or (semantic) once the smoothed
    # pause probability passes `pause_speculate` (0 = off), the STT's transcript is taken
    # without ending its stream and the answer started, held until the end is confirmed.
    speculate_blocks: int = 0
    pause_speculate: float = 0.0
    # The turn detector (`voice.turn_policy`): None = the silence rule alone. With one, the
    # endpointer's silence is the policy's maximum wait.
    policy: Policy | None = None
    fusion: Fusion = field(default_factory=Fusion)
    fused_speculate: float = 0.0  # fused probability that starts the answer early; 0 = off
    # Backchannels: while the assistant speaks, speech is an interruption only once its
    # words are (more than these phrases, or a stop phrase). () = any speech interrupts.
    backchannels: tuple[str, ...] = ()
    interrupt_words: int = 1

    @classmethod
    def from_config(
        cls,
        cfg: VoiceConfig,
        echo_cancelled: bool,
        hears: bool = True,
        speaks: bool = True,
        predicts_pauses: bool = False,
        turn_model: bool = False,
        text_signal: bool = False,
    ) -> Rules:
        barge_in = cfg.barge_in.enabled
        if barge_in is None:  # auto: only where the assistant cannot hear itself
            barge_in = echo_cancelled
        act = cfg.activation
        earcons = act.earcons if act.earcons is not None else act.mode != "always"
        semantic = predicts_pauses and cfg.endpointing.semantic == "auto"
        speculate_ms = cfg.endpointing.speculate_ms or 0
        speculate = speculate_ms > 0 and hears
        ep = cfg.endpointing
        policy = None
        if turn_model or text_signal:
            policy = Policy(ep.end_threshold, ep.min_wait_ms / 1000, ep.max_wait_ms / 1000)
            # The maximum wait is the silence rule's length now.
            ep = ep.model_copy(update={"silence_ms": ep.max_wait_ms})
        return cls(
            endpointer=Endpointer.new(ep, cfg.audio.block_ms),
            block_ms=cfg.audio.block_ms,
            barge_in=barge_in and hears and speaks,
            barge_in_blocks=max(1, math.ceil(cfg.barge_in.min_speech_ms / cfg.audio.block_ms)),
            echo_guard_s=0.0 if echo_cancelled else cfg.barge_in.echo_guard_ms / 1000,
            activation=act.mode,
            wake_phrases=tuple(act.wake_phrases),
            follow_up_s=act.follow_up_s,
            stop_phrases=tuple(act.stop_phrases),
            prefill=cfg.llm.prefill_while_listening,
            earcons=earcons and speaks,
            hears=hears,
            speaks=speaks,
            semantic=semantic,
            pause_threshold=cfg.endpointing.pause_threshold,
            pause_ignore_steps=math.ceil(cfg.endpointing.pause_ignore_ms / cfg.audio.block_ms),
            speculate_blocks=math.ceil(speculate_ms / cfg.audio.block_ms) if speculate else 0,
            pause_speculate=(cfg.endpointing.pause_speculate_threshold or 0.0) if semantic else 0.0,
            policy=policy,
            fusion=Fusion(
                acoustic_weight=1.0 if turn_model else 0.0,
                text_weight=cfg.endpointing.text_weight if text_signal else 0.0,
                hold_words=tuple(cfg.endpointing.hold_words),
            ),
            fused_speculate=(
                (cfg.endpointing.speculate_threshold or 0.0) if policy and hears else 0.0
            ),
            backchannels=tuple(cfg.barge_in.backchannels),
            interrupt_words=cfg.barge_in.interrupt_min_words,
        )

    def end_of_turn(self) -> str:
        """Which rule ends a turn, for the status line."""
        silence = f"{self.endpointer.p.silence_ms} ms of silence"
        rule = f"predicted pause (or {silence})" if self.semantic else silence
        if self.policy is not None:
            signals = self.signals()
            p = self.policy
            rule = (
                f"{' + '.join(signals)} >= {p.threshold:g} after {p.min_wait_s * 1000:.0f} ms "
                f"(at most {silence})"
            ) + (", or predicted pause" if self.semantic else "")
        early = []
        if self.speculate_blocks:
            early.append(f"after {self.speculate_blocks * self.block_ms} ms")
        if self.pause_speculate:
            early.append("at a likely pause")
        if self.fused_speculate:
            early.append("at a likely end")
        return f"end of turn: {rule}" + (f"; answer started {' or '.join(early)}" if early else "")

    def signals(self) -> list[str]:
        """The end-of-turn signals in use, by name."""
        f = self.fusion
        named = [
            ("turn model", f.acoustic_weight > 0),
            ("chat model", f.text_weight > 0),
            ("hold words", bool(f.hold_words)),
        ]
        return [name for name, on in named if on]


@dataclass(frozen=True)
class State:
    rules: Rules
    phase: Phase = "idle"
    muted: bool = False
    vad: Endpointer | None = None  # None: rules.endpointer
    barge: int = 0  # speech blocks in a row heard over the answer
    deaf_until: float = 0.0
    last_speech_at: float = 0.0
    # Until when speech needs no wake phrase (follow-up window) or, with push-to-talk,
    # until when the talk key's press is good for.
    open_until: float = 0.0
    addressed: bool = False  # the utterance being heard is meant for the assistant
    prefilled_words: int = 0
    pause_ema: float = 0.0  # the STT's smoothed pause probability, this utterance
    pause_steps: int = 0
    # Where the utterance being heard (or the speech over the answer) stands (`Ear`). Taken
    # early, its transcript is `held`.
    ear: Ear = "open"
    held: str = ""
    # The turn detector's signals for the pause under way (None: not yet scored), and the
    # transcript they are about.
    acoustic: float | None = None
    text_p: float | None = None
    words: str = ""
    # Speech over the answer, being heard to learn whether it is an interruption or a
    # backchannel ("mm-hmm"): the answer goes on meanwhile.
    interrupting: bool = False

    @classmethod
    def start(cls, rules: Rules) -> State:
        return cls(rules, vad=rules.endpointer)

    @property
    def ending(self) -> bool:
        return self.ear == "ending"

    @property
    def speculating(self) -> bool:
        return self.ear in ("early", "early_answer")

    @property
    def spec_turn(self) -> bool:
        return self.ear == "early_answer"

    @property
    def endpointer(self) -> Endpointer:
        return self.vad or self.rules.endpointer

    def idle_status(self, now: float) -> str:
        if not self.rules.hears:
            return "ready"  # for typed and control-socket questions
        if self.muted:
            return "muted"
        if self.rules.activation == "wake_phrase" and now >= self.open_until:
            return f"waiting for '{self.rules.wake_phrases[0]}'"
        if self.rules.activation == "push_to_talk" and now >= self.open_until:
            return "press Enter to talk"
        return "listening"


def free(state: State) -> bool:
    """Whether a typed or control-socket request may start now (never over the user)."""
    return state.phase == "idle"


# ---------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Block:
    """One microphone block and the detector's decision on it; `audio` (its samples) is
    handed on to the STT in `Feed`, never looked at here."""

    at: float
    speech: bool
    audio: object = None


@dataclass(frozen=True)
class Words:
    """The STT's transcript of the utterance so far."""

    text: str


@dataclass(frozen=True)
class Pause:
    """The STT's probability, for the frame just transcribed, that a pause comes."""

    probability: float


@dataclass(frozen=True)
class EndScore:
    """The turn model's probability that the utterance heard until `heard_until` (a
    block's time) is complete."""

    probability: float
    heard_until: float


@dataclass(frozen=True)
class TextScore:
    """The chat model's probability that the user's message ends after `text`."""

    probability: float
    text: str


@dataclass(frozen=True)
class Transcript:
    """The STT's complete transcript, after a `FinishHearing`."""

    text: str


@dataclass(frozen=True)
class Ask:
    """A typed or control-socket question (offered only when `free`); `reply` (whoever
    waits for the answer) travels with it to its `StartTurn`."""

    text: str
    reply: object = None


@dataclass(frozen=True)
class AnswerStarted:
    """A text to speak that is not a question (greeting, `say`) took the speaker."""


@dataclass(frozen=True)
class AnswerFinished:
    """The answer was generated and played to the end."""


@dataclass(frozen=True)
class Stop:
    """Stop the answer now (a command, a key)."""


@dataclass(frozen=True)
class TalkKey:
    """The push-to-talk key (or `listen` command): open the microphone for one question."""


@dataclass(frozen=True)
class Mute:
    on: bool


@dataclass(frozen=True)
class DeviceLost:
    which: str


@dataclass(frozen=True)
class DeviceBack:
    pass


Event = (
    Block | Words | Pause | EndScore | TextScore | Transcript | Ask | AnswerStarted
    | AnswerFinished | Stop | TalkKey | Mute | DeviceLost | DeviceBack
)  # fmt: skip


# ---------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class Status:
    text: str


@dataclass(frozen=True)
class Notice:
    text: str


@dataclass(frozen=True)
class StartHearing:
    """Start the STT on the last `blocks` microphone blocks (this one included)."""

    blocks: int


@dataclass(frozen=True)
class Feed:
    """Give this block to the STT. `later`: it may wait — a silent block while an answer
    started early waits to be confirmed; the loop's time goes to that answer instead. If
    the user speaks on, the STT hears the waiting blocks first; if the turn is confirmed,
    nobody needs them. Never with a semantic STT, whose pause predictions are the feed's
    output."""

    audio: object = None  # the block's samples
    later: bool = False


@dataclass(frozen=True)
class ShowWords:
    text: str


@dataclass(frozen=True)
class Prefill:
    text: str


@dataclass(frozen=True)
class ScoreEnd:
    """Score the utterance heard until `at` with the turn model (answered by an
    `EndScore`, later: it runs off the loop)."""

    at: float


@dataclass(frozen=True)
class ScoreText:
    """The chat model's end-of-message probability after `text` (a `TextScore`)."""

    text: str


@dataclass(frozen=True)
class FinishHearing:
    """Flush the STT; answer with a `Transcript`. `silence_ms`: how much of the audio fed
    last was silence (the STT's delay has already run over it)."""

    silence_ms: int = 0
    by: EndedBy = "silence"


@dataclass(frozen=True)
class PeekHearing:
    """The transcript as `FinishHearing` would give it (a `Transcript`), the STT's stream
    going on as if it had not been asked."""

    silence_ms: int = 0


@dataclass(frozen=True)
class DropHearing:
    """End the STT's utterance without a transcript (none is wanted, or it was taken)."""


@dataclass(frozen=True)
class StartTurn:
    text: str
    speech_end_at: float  # the user's last speech; the turn's timings count from here
    typed: bool = False
    speculative: bool = False  # generate and synthesize, but play nothing until confirmed
    reply: object = None  # who asked (a typed question's `Ask.reply`)


@dataclass(frozen=True)
class ConfirmTurn:
    """The speculative turn's question was the whole turn: play it, show it, keep it."""

    by: EndedBy = "silence"


@dataclass(frozen=True)
class DropTurn:
    """The user went on speaking: forget the speculative turn as if it never started."""


@dataclass(frozen=True)
class CancelTurn:
    """Stop generating and speaking now; keep in the history what the user heard."""


@dataclass(frozen=True)
class Earcon:
    kind: Literal["listening", "done"]


Action = (
    Status | Notice | StartHearing | Feed | ShowWords | Prefill | ScoreEnd | ScoreText
    | FinishHearing | PeekHearing | DropHearing | StartTurn | ConfirmTurn | DropTurn
    | CancelTurn | Earcon
)  # fmt: skip


@dataclass
class _Out:
    actions: list[Action] = field(default_factory=list)

    def __call__(self, *actions: Action) -> None:
        self.actions.extend(actions)


# ---------------------------------------------------------------------------- rules
def step(state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    out = _Out()
    match event:
        case Block():
            state = _block(state, event, now, out)
        case Words(text):
            state = _words(state, text, out)
        case Pause(probability):
            state = _pause(state, probability, now, out)
        case EndScore(probability, heard_until):
            if state.phase == "hearing" and heard_until >= state.last_speech_at:
                state = _detect_end(replace(state, acoustic=probability), now, out)
        case TextScore(probability, text):
            if state.phase == "hearing" and text == state.words:
                state = _detect_end(replace(state, text_p=probability), now, out)
        case Transcript(text):
            state = _transcript(state, text, now, out)
        case Ask(text, reply):
            if free(state):
                out(StartTurn(text, now, typed=True, reply=reply), Status("thinking"))
                state = replace(state, phase="answering", barge=0)
        case AnswerStarted():
            state = replace(state, phase="answering", barge=0)
            out(Status("speaking"))
        case AnswerFinished():
            if state.interrupting:  # it ended under the user's words: they are heard on
                state = _hear_interruption(state, out)
            else:
                state = _after_answer(state, now, out)
        case Stop():
            if state.phase == "answering":
                out(Notice("(stopped)"), CancelTurn())
                state = _after_answer(state, now, out)
        case TalkKey():
            state = _talk_key(state, now, out)
        case Mute(on):
            state = _end_interrupting(state, out)
            if state.phase == "hearing":
                out(DropHearing())  # the words being heard are dropped, not answered
                state = _drop_speculation(replace(state, phase="idle"), out)
            state = replace(state, muted=on, vad=state.endpointer.reset(), barge=0)
            if state.phase == "idle":
                out(Status(state.idle_status(now)))
        case DeviceLost(which) if state.phase != "down":
            state = _end_interrupting(state, out)
            if state.phase == "answering":
                out(CancelTurn())
            elif state.phase == "hearing":
                out(DropHearing())
                state = _drop_speculation(state, out)
            out(Notice(f"the {which} went away; waiting for it to come back"))
            out(Status("waiting for audio device"))
            state = replace(state, phase="down")
        case DeviceBack() if state.phase == "down":
            state = replace(state, phase="idle", vad=state.endpointer.reset(warmup=True))
            out(Notice("audio devices are back"), Status(state.idle_status(now)))
    return state, out.actions


def _block(state: State, block: Block, now: float, out: _Out) -> State:
    rules = state.rules
    if state.muted or state.phase == "down":
        return state  # nothing heard while muted, not even a barge-in
    if state.phase == "answering":
        if not rules.barge_in:
            return state  # the microphone would hear the assistant's own voice
        if state.interrupting:
            return _while_interrupting(state, block, out)
        barge = state.barge + 1 if block.speech else 0
        if barge < rules.barge_in_blocks:
            return replace(state, barge=barge)
        state = replace(
            state, vad=state.endpointer.started(barge), barge=0, last_speech_at=block.at
        )
        if rules.backchannels:  # its words will tell an interruption from an "mm-hmm"
            out(StartHearing(barge))
            return replace(state, interrupting=True, ear="open", words="")
        out(Notice("(interrupted)"), CancelTurn())
        # Talking over the answer is talking to the assistant: no wake phrase, no key.
        return _begin_hearing(state, barge, addressed=True, out=out)
    if state.phase == "idle" and block.at < state.deaf_until:
        return state  # the tail of our own voice, still in the room
    vad, event = state.endpointer.update(block.speech)
    state = replace(state, vad=vad)
    if block.speech:
        state = replace(state, last_speech_at=block.at, acoustic=None)
    if isinstance(event, SpeechStarted):
        if rules.activation == "push_to_talk" and now >= state.open_until:
            return replace(state, vad=vad.reset())  # not for us: the key was not pressed
        addressed = rules.activation == "always" or now < state.open_until
        return _begin_hearing(state, event.blocks_back, addressed, out)
    if state.phase != "hearing":
        return state
    if state.ending:
        return state
    out(Feed(block.audio, later=state.speculating and not block.speech and not rules.semantic))
    speculated = False
    if state.speculating:
        state = _while_speculating(state, block, event, now, out)
    elif isinstance(event, SpeechEnded):
        out(FinishHearing(event.silence_ms))
        return replace(state, ear="ending")
    elif isinstance(event, SpeechDropped):
        out(DropHearing(), Status(state.idle_status(now)), ShowWords(""))
        return replace(state, phase="idle")
    elif rules.speculate_blocks and vad.silent_blocks >= rules.speculate_blocks:
        state = _speculate(state, out)
        speculated = True
    scoring = rules.policy is not None and event is None and not block.speech
    if scoring and state.phase == "hearing" and not state.ending:
        if rules.fusion.acoustic_weight:
            out(ScoreEnd(block.at))  # for the next block: the model runs off the loop
        if not speculated:  # else its transcript comes first: the next block decides
            state = _detect_end(state, now, out)
    return state


def _detect_end(state: State, now: float, out: _Out) -> State:
    """The turn detector at a silent block: the fused probability (the newest scores of
    this pause) against the policy — or the head start at a lower probability."""
    rules = state.rules
    vad = state.endpointer
    if rules.policy is None or state.phase != "hearing" or state.ending:
        return state
    if not vad.speaking or vad.silent_blocks == 0:
        return state
    if vad.speech_blocks * vad.block_ms < vad.p.min_speech_ms:
        return state  # too short to be a question: the silence rule drops it
    fused = rules.fusion.probability(state.acoustic, state.text_p, state.words)
    if rules.policy.decide(vad.silent_blocks * vad.block_ms / 1000, fused):
        if state.speculating:
            return _confirm(replace(state, vad=vad.reset()), now, out, "turn detector")
        out(FinishHearing(vad.silent_blocks * vad.block_ms, "turn detector"))
        return replace(state, ear="ending", vad=vad.reset())
    early = rules.fused_speculate
    if early and fused is not None and fused >= early and not state.speculating:
        return _speculate(state, out)
    return state


def _while_interrupting(state: State, block: Block, out: _Out) -> State:
    """Speech over the answer, heard until its words decide (`_words`, `_transcript`)."""
    vad, event = state.endpointer.update(block.speech)
    state = replace(state, vad=vad)
    if block.speech:
        state = replace(state, last_speech_at=block.at)
    if state.ending:
        return state  # its transcript is on its way
    out(Feed(block.audio))
    if isinstance(event, SpeechEnded):
        out(FinishHearing(event.silence_ms))
        return replace(state, ear="ending")
    if isinstance(event, SpeechDropped):
        out(DropHearing())
        return replace(state, interrupting=False)
    return state


def _end_interrupting(state: State, out: _Out) -> State:
    if not state.interrupting:
        return state
    out(DropHearing())
    return replace(state, interrupting=False, ear="open")


def _hear_interruption(state: State, out: _Out) -> State:
    """The speech over the answer is a turn of its own: hearing goes on from here (its
    end, if already decided, stays decided: its transcript is on its way)."""
    out(Status("hearing"))
    return replace(
        state, phase="hearing", interrupting=False, addressed=True, prefilled_words=0,
        pause_ema=0.0, pause_steps=0, held="", acoustic=None, text_p=None, words="",
    )  # fmt: skip


def is_interruption(text: str, rules: Rules) -> bool:
    """Whether words said over the answer mean to stop it: at least `interrupt_words`
    words besides the backchannel phrases, or a stop phrase."""
    if rules.stop_phrases and find_phrase(text, rules.stop_phrases) is not None:
        return True
    said = f" {' '.join(_words_of(text))} "
    for phrase in sorted(rules.backchannels, key=len, reverse=True):
        words = " ".join(_words_of(phrase))
        if words:
            said = said.replace(f" {words} ", " ")
            said = said.replace(f" {words} ", " ")  # again: adjacent repeats overlap
    return len(said.split()) >= rules.interrupt_words


def _speculate(state: State, out: _Out) -> State:
    """Take the transcript now (it comes back as a `Transcript` while `speculating`)."""
    vad = state.endpointer
    out(PeekHearing(vad.silent_blocks * vad.block_ms))
    return replace(state, ear="early")


def _while_speculating(
    state: State, block: Block, event: VadEvent | None, now: float, out: _Out
) -> State:
    """The transcript was taken early: the silence rule (or a predicted pause, `_pause`)
    confirms the turn; speech drops the head start and the utterance goes on, heard by
    the same STT stream."""
    if isinstance(event, SpeechEnded):
        return _confirm(state, now, out)
    if isinstance(event, SpeechDropped):  # too short after all: as if never heard
        state = _drop_speculation(state, out)
        out(DropHearing(), Status(state.idle_status(now)), ShowWords(""))
        return replace(state, phase="idle")
    if not block.speech:
        return state
    return _drop_speculation(state, out)


def _drop_speculation(state: State, out: _Out) -> State:
    if state.spec_turn:
        out(DropTurn())
    return replace(state, ear="open", held="")


def _confirm(state: State, now: float, out: _Out, by: EndedBy = "silence") -> State:
    held, answered = state.held, state.spec_turn
    out(DropHearing())  # its transcript was taken
    state = replace(state, ear="open", held="")
    if not answered:  # nothing was started: the transcript's usual path
        return _transcript(state, held, now, out)
    if state.rules.earcons:
        out(Earcon("done"))
    # "thinking" before the held answer comes out: the shell says "speaking" with its
    # first frame.
    out(ShowWords(""), Status("thinking"), ConfirmTurn(by))
    return replace(state, phase="answering", barge=0, open_until=0.0)


def _begin_hearing(state: State, blocks: int, addressed: bool, out: _Out) -> State:
    if addressed and state.rules.earcons and state.rules.activation != "always":
        out(Earcon("listening"))
    out(StartHearing(blocks), Status("hearing"))
    return replace(
        state, phase="hearing", addressed=addressed, prefilled_words=0, ear="open",
        pause_ema=0.0, pause_steps=0, held="", acoustic=None, text_p=None, words="",
    )  # fmt: skip


def _pause(state: State, probability: float, now: float, out: _Out) -> State:
    """Semantic end of turn: the STT predicts a pause, as Kyutai's Unmute reads it (the
    utterance's first frames ignored, the probability smoothed), taken at a block the
    detector calls silent so that a word is never cut."""
    rules = state.rules
    if state.phase != "hearing" or state.ending or not rules.semantic:
        return state
    steps = state.pause_steps + 1
    ema = (
        probability
        if steps == 1
        else PAUSE_SMOOTHING * probability + (1 - PAUSE_SMOOTHING) * state.pause_ema
    )
    state = replace(state, pause_steps=steps, pause_ema=ema)
    vad = state.endpointer
    if steps <= rules.pause_ignore_steps or vad.silent_blocks == 0:
        return state
    if ema > rules.pause_threshold:
        if state.speculating:
            return _confirm(replace(state, vad=vad.reset()), now, out, "predicted pause")
        out(FinishHearing(vad.silent_blocks * vad.block_ms, "predicted pause"))
        return replace(state, ear="ending", vad=vad.reset())
    if rules.pause_speculate and ema > rules.pause_speculate and not state.speculating:
        return _speculate(state, out)
    return state


def _words(state: State, text: str, out: _Out) -> State:
    if state.interrupting:
        if not is_interruption(text, state.rules):
            return state  # a backchannel so far: the answer goes on
        out(Notice("(interrupted)"), CancelTurn())
        state = _hear_interruption(state, out)
    if state.phase != "hearing" or state.speculating:
        return state
    out(ShowWords(text))
    rules = state.rules
    if not state.addressed:
        if rules.activation != "wake_phrase" or find_phrase(text, rules.wake_phrases) is None:
            return state
        state = replace(state, addressed=True)
        if rules.earcons:
            out(Earcon("listening"))
    question = strip_wake_phrase(text, rules) if rules.activation == "wake_phrase" else text
    state = _new_words(state, question, out)
    words = len(question.split())
    # The last word may still grow: prefill up to the one before it.
    if rules.prefill and words - 1 > state.prefilled_words:
        out(Prefill(question))
        state = replace(state, prefilled_words=words - 1)
    return state


def _question(state: State, text: str) -> str | None:
    """The question to answer in `text`, or None when `text` starts no turn (unaddressed,
    empty, the wake phrase alone, a stop phrase)."""
    rules = state.rules
    wake = rules.activation == "wake_phrase"
    if wake and not state.addressed and find_phrase(text, rules.wake_phrases) is None:
        return None
    question = strip_wake_phrase(text, rules) if wake else text
    if not question.strip() or (rules.stop_phrases and is_only(question, rules.stop_phrases)):
        return None
    return question


def _new_words(state: State, text: str, out: _Out) -> State:
    """The transcript the turn detector judges changed: its text score is asked anew."""
    if text == state.words:
        return state
    if state.rules.fusion.text_weight and text.strip():
        out(ScoreText(text))
    return replace(state, words=text, text_p=None)


def _transcript(state: State, text: str, now: float, out: _Out) -> State:
    if state.interrupting:
        state = replace(state, ear="open")
        if not is_interruption(text, state.rules):
            return replace(state, interrupting=False)  # only "mm-hmm": nothing to do
        out(Notice("(interrupted)"), CancelTurn())
        state = _hear_interruption(state, out)
    if state.phase != "hearing":
        return state
    if state.speculating:
        question = _question(state, text)
        # The whole transcript: what the turn detector judges from here on (its text
        # score asked first: once the answer runs, the chat model is the answer's).
        state = _new_words(state, question or text, out)
        if question is not None:
            out(StartTurn(question, state.last_speech_at or now, speculative=True))
        return replace(state, held=text, ear="early_answer" if question is not None else "early")
    rules = state.rules
    state = replace(state, phase="idle", ear="open")
    out(ShowWords(""))
    question = _question(state, text)
    if question is not None:
        if rules.earcons:
            out(Earcon("done"))
        out(StartTurn(question, state.last_speech_at or now), Status("thinking"))
        return replace(state, phase="answering", barge=0, open_until=0.0)
    # No question: each reason `_question` had is answered its own way.
    wake = rules.activation == "wake_phrase"
    if wake and not state.addressed and find_phrase(text, rules.wake_phrases) is None:
        out(Status(state.idle_status(now)))
        return state  # not meant for the assistant (the TV, people in the room)
    if not text.strip():
        out(Notice("(heard speech but no words)"), Status(state.idle_status(now)))
        return state
    if wake and not strip_wake_phrase(text, rules).strip():
        # Only the wake phrase: listen for the question that follows.
        state = replace(state, open_until=now + rules.follow_up_s)
        out(Status(state.idle_status(now)))
        return state
    out(Notice("(stopped)"), Status(state.idle_status(now)))  # a stop phrase
    return replace(state, open_until=0.0)


def _after_answer(state: State, now: float, out: _Out) -> State:
    rules = state.rules
    state = _end_interrupting(state, out)
    state = replace(
        state,
        phase="idle",
        barge=0,
        vad=state.endpointer.reset(),
        deaf_until=now + rules.echo_guard_s if rules.speaks else 0.0,
        # A follow-up question needs no wake phrase (push-to-talk: still the key).
        open_until=now + rules.follow_up_s if rules.activation == "wake_phrase" else 0.0,
    )
    out(Status(state.idle_status(now)))
    return state


def _talk_key(state: State, now: float, out: _Out) -> State:
    rules = state.rules
    if state.muted or state.phase == "down" or not rules.hears:
        return state
    if state.phase == "hearing":  # pressed again while speaking: that is the end of it
        if state.ending:
            return state
        if state.speculating:
            return _confirm(state, now, out, "key")
        vad = state.endpointer
        out(FinishHearing(vad.silent_blocks * vad.block_ms, "key"))
        return replace(state, vad=vad.reset(), ear="ending")
    if state.phase == "answering":
        out(Notice("(interrupted)"), CancelTurn())
        state = _after_answer(state, now, out)
    state = replace(state, open_until=now + rules.follow_up_s, vad=state.endpointer.reset())
    if rules.earcons:
        out(Earcon("listening"))
    out(Status("listening"))
    return state


# ---------------------------------------------------------------------------- phrases
def _words_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))


def find_phrase(text: str, phrases: Sequence[str]) -> tuple[int, int] | None:
    """Where one of `phrases` is said in `text`, as a (first, end) word span, or None.

    Matched forgivingly, as a transcript spells names: word by word with a similarity
    ratio (so "hey harmony" also matches "hey, Harmonie" or "a harmony").
    """
    words = _words_of(text)
    for phrase in phrases:
        target = _words_of(phrase)
        n = len(target)
        for i in range(len(words) - n + 1):
            said = " ".join(words[i : i + n])
            if SequenceMatcher(None, said, " ".join(target)).ratio() >= 0.75:
                return i, i + n
    return None


def strip_wake_phrase(text: str, rules: Rules) -> str:
    """The question without the wake phrase and what came before it."""
    span = find_phrase(text, rules.wake_phrases)
    if span is None:
        return text
    # Cut in the original text (keeping its punctuation and case) after the phrase's
    # last word.
    tokens = list(re.finditer(r"[A-Za-z0-9'\u2019]+", text))
    rest = text[tokens[span[1] - 1].end() :] if span[1] - 1 < len(tokens) else ""
    return rest.lstrip(" ,.;:!?-").strip()


def is_only(text: str, phrases: Sequence[str]) -> bool:
    """Whether `text` is just one of `phrases` (a spoken "stop", "be quiet")."""
    said = " ".join(_words_of(text))
    return any(said == " ".join(_words_of(p)) for p in phrases)
