"""Turn-taking rules (`voice.turns`): scripted events and a fake clock, no audio."""

from __future__ import annotations

from typing import Any

import pytest

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.voice.config import VoiceConfig, apply_override, parse_voice_config
from mlx_harmony.voice.turns import (
    AnswerFinished,
    AnswerStarted,
    Ask,
    Block,
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
    Pause,
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
    TextScore,
    Transcript,
    Words,
    find_phrase,
    free,
    step,
)

BLOCK = 0.08  # s: the default 80 ms blocks


def rules(
    echo_cancelled: bool = False,
    pauses: bool = False,
    turn_model: bool = False,
    text_signal: bool = False,
    **overrides: Any,
) -> Rules:
    config = VoiceConfig()
    # Speculative start is off unless a test turns it on (its own tests below).
    settings = {
        "endpointing.silence_ms": 400,
        "endpointing.warmup_blocks": 0,
        "endpointing.speculate_ms": 0,
        "endpointing.pause_speculate_threshold": None,
    } | overrides
    for key, value in settings.items():
        config = apply_override(config, key, value)
    return Rules.from_config(
        config, echo_cancelled, predicts_pauses=pauses, turn_model=turn_model,
        text_signal=text_signal,
    )  # fmt: skip


class Talk:
    """A conversation driven event by event; `actions` holds everything that came out."""

    def __init__(self, rules: Rules, now: float = 100.0) -> None:
        self.state = State.start(rules)
        self.now = now
        self.actions: list[Any] = []

    def send(self, event: Any) -> list[Any]:
        self.state, actions = step(self.state, event, self.now)
        self.actions += actions
        return actions

    def blocks(self, pattern: str) -> list[Any]:
        """'s' a speech block, '.' a silent one, each 80 ms later than the last."""
        out = []
        for c in pattern:
            self.now += BLOCK
            out += self.send(Block(self.now, c == "s"))
        return out

    def utterance(self, words: str, speech: int = 6, silence: int = 6) -> list[Any]:
        """Speech blocks, the transcript as the STT would give it, silence to the end."""
        out = self.blocks("s" * speech)
        if self.state.phase == "hearing":
            out += self.send(Words(words))
        out += self.blocks("." * silence)
        if any(isinstance(a, FinishHearing) for a in out):
            out += self.send(Transcript(words))
        return out

    def wait(self, seconds: float) -> None:
        self.now += seconds


def of(actions: list[Any], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


# ---------------------------------------------------------------------------- listening
def test_an_utterance_is_heard_and_answered_after_the_silence() -> None:
    talk = Talk(rules())
    out = talk.blocks("..ss")
    assert of(out, StartHearing) == [StartHearing(2)] and Status("hearing") in out
    spoke_until = talk.now + 4 * BLOCK
    out = talk.blocks("ssss")
    assert len(of(out, Feed)) == 4
    out = talk.blocks("....")
    assert not of(out, FinishHearing)  # 320 ms of silence is a pause, not the end
    out = talk.blocks(".")
    # The STT heard those 400 ms of silence: its delay is flushed only past them.
    assert of(out, FinishHearing) == [FinishHearing(silence_ms=400)]
    out = talk.send(Transcript("what time is it"))
    assert of(out, StartTurn) == [StartTurn("what time is it", pytest.approx(spoke_until))]
    assert talk.state.phase == "answering" and not free(talk.state)


def test_too_short_a_sound_is_dropped_and_nothing_is_asked() -> None:
    talk = Talk(rules(**{"endpointing.min_speech_ms": 400}))
    out = talk.blocks("sss" + "." * 6)
    assert of(out, DropHearing) and not of(out, FinishHearing)
    assert talk.state.phase == "idle"


def test_an_endless_utterance_is_cut_at_the_maximum_length() -> None:
    talk = Talk(rules(**{"endpointing.max_utterance_s": 1.6}))
    out = talk.blocks("s" * 30)
    assert len(of(out, FinishHearing)) == 1
    assert out.index(FinishHearing()) == out.index(StartHearing(2)) + 2 + 18


def test_speech_without_words_is_reported_and_not_asked() -> None:
    talk = Talk(rules())
    out = talk.utterance("")
    assert Notice("(heard speech but no words)") in out and not of(out, StartTurn)


def test_the_words_heard_so_far_are_prefilled_one_complete_word_at_a_time() -> None:
    talk = Talk(rules())
    talk.blocks("ss")
    assert of(talk.send(Words("what")), Prefill) == []  # the only word may still grow
    assert of(talk.send(Words("what is")), Prefill) == [Prefill("what is")]
    assert of(talk.send(Words("what is")), Prefill) == []
    assert of(talk.send(Words("what is the cap")), Prefill) == [Prefill("what is the cap")]
    off = Talk(rules(**{"llm.prefill_while_listening": False}))
    off.blocks("ss")
    assert of(off.send(Words("what is the capital")), Prefill) == []


def test_typed_questions_wait_while_the_user_speaks() -> None:
    talk = Talk(rules())
    talk.blocks("ss")
    assert not free(talk.state) and talk.send(Ask("typed")) == []
    talk.utterance("spoken", speech=0)
    talk.send(AnswerFinished())
    assert free(talk.state)
    out = talk.send(Ask("typed"))
    assert of(out, StartTurn) == [StartTurn("typed", talk.now, typed=True)]


# ---------------------------------------------------------------------------- answering
def answering(talk: Talk) -> None:
    talk.utterance("tell me a story")
    assert talk.state.phase == "answering"


def test_without_echo_cancellation_speech_over_the_answer_is_not_heard() -> None:
    talk = Talk(rules(echo_cancelled=False))
    answering(talk)
    assert talk.blocks("s" * 20) == []


def test_with_echo_cancellation_speech_over_the_answer_interrupts_it() -> None:
    # Barge-in: on by default with cancellation; with no backchannels, at once.
    talk = Talk(rules(echo_cancelled=True, **{"barge_in.backchannels": []}))
    answering(talk)
    assert talk.blocks("ss.s.ss") == []  # 240 ms in a row are needed; blips are not enough
    out = talk.blocks("s")
    assert out[:2] == [Notice("(interrupted)"), CancelTurn()]
    # The utterance carries on from the blocks that interrupted (no wake word needed).
    assert StartHearing(3) in out and talk.state.phase == "hearing"
    out = talk.utterance("stop talking about dragons", speech=2)
    assert of(out, StartTurn)[0].text == "stop talking about dragons"


def test_barge_in_can_be_switched_off_even_with_echo_cancellation() -> None:
    talk = Talk(rules(echo_cancelled=True, **{"barge_in.enabled": False}))
    answering(talk)
    assert talk.blocks("s" * 20) == []


def test_after_an_answer_the_microphone_is_deaf_for_the_echo_guard() -> None:
    talk = Talk(rules(**{"barge_in.echo_guard_ms": 400}))
    answering(talk)
    talk.send(AnswerFinished())
    assert talk.blocks("sssss") == []  # 400 ms of the room's echo of the last words
    assert of(talk.blocks("ss"), StartHearing)
    cancelled = Talk(rules(echo_cancelled=True, **{"barge_in.echo_guard_ms": 400}))
    answering(cancelled)
    cancelled.send(AnswerFinished())
    assert of(cancelled.blocks("ss"), StartHearing)  # nothing to guard against


def test_stop_cancels_the_answer_and_listens_again() -> None:
    talk = Talk(rules())
    answering(talk)
    out = talk.send(Stop())
    assert CancelTurn() in out and talk.state.phase == "idle"
    assert Status("listening") in out
    assert talk.send(Stop()) == []  # nothing left to stop


def test_a_spoken_stop_is_not_a_question() -> None:
    talk = Talk(rules(echo_cancelled=True))
    answering(talk)
    talk.blocks("sss")  # the interruption
    out = talk.utterance("Stop!", speech=2)
    assert Notice("(stopped)") in out and not of(out, StartTurn)
    assert talk.state.phase == "idle"


def test_a_text_to_say_takes_the_speaker_like_an_answer() -> None:
    talk = Talk(rules())
    talk.send(AnswerStarted())
    assert not free(talk.state) and talk.blocks("s" * 10) == []
    talk.send(AnswerFinished())
    assert free(talk.state)


# ---------------------------------------------------------------------------- devices, mute
def test_a_lost_device_cancels_the_answer_and_coming_back_warms_up() -> None:
    talk = Talk(rules(**{"endpointing.warmup_blocks": 2}))
    talk.blocks("..")
    answering(talk)
    out = talk.send(DeviceLost("speaker"))
    assert CancelTurn() in out and Status("waiting for audio device") in out
    assert talk.blocks("ssss") == []
    assert talk.send(DeviceLost("speaker")) == []  # said once
    out = talk.send(DeviceBack())
    assert Notice("audio devices are back") in out and Status("listening") in out
    assert talk.blocks("ss") == []  # the warm-up blocks after opening the microphone
    assert of(talk.blocks("ss"), StartHearing)


def test_a_device_lost_while_hearing_drops_the_utterance() -> None:
    talk = Talk(rules())
    talk.blocks("sss")
    assert DropHearing() in talk.send(DeviceLost("microphone"))


def test_muted_it_hears_nothing_and_cannot_be_interrupted() -> None:
    talk = Talk(rules(echo_cancelled=True))
    talk.blocks("sss")
    out = talk.send(Mute(True))
    assert DropHearing() in out and Status("muted") in out
    assert talk.blocks("s" * 10) == []
    talk.send(Mute(False))
    answering(talk)
    talk.send(Mute(True))
    assert talk.blocks("s" * 10) == []
    assert talk.state.phase == "answering"


# ---------------------------------------------------------------------------- activation
def test_with_a_wake_phrase_speech_not_addressed_is_ignored() -> None:
    talk = Talk(rules(**{"activation.mode": "wake_phrase"}))
    assert talk.state.idle_status(talk.now) == "waiting for 'hey harmony'"
    out = talk.utterance("and now the weather for tomorrow")
    assert not of(out, StartTurn) and not of(out, Prefill) and talk.state.phase == "idle"


def test_the_wake_phrase_is_matched_forgivingly_and_left_out_of_the_question() -> None:
    talk = Talk(rules(**{"activation.mode": "wake_phrase"}))
    out = talk.utterance("Hey, Harmonie, what's the capital of France?")
    assert of(out, StartTurn)[0].text == "what's the capital of France?"
    assert Earcon("listening") in out and Earcon("done") in out
    assert find_phrase("a harmony please", ["hey harmony"]) == (0, 2)
    assert find_phrase("hello there", ["hey harmony"]) is None


def test_the_wake_phrase_is_noticed_while_speaking_and_prefill_starts_after_it() -> None:
    talk = Talk(rules(**{"activation.mode": "wake_phrase"}))
    talk.blocks("ss")
    assert talk.send(Words("so anyway")) == [talk.actions[-1]]  # only shown
    out = talk.send(Words("so anyway hey harmony what is the"))
    assert Earcon("listening") in out and Prefill("what is the") in out


def test_the_wake_phrase_alone_opens_a_window_for_the_question() -> None:
    talk = Talk(rules(**{"activation.mode": "wake_phrase", "activation.follow_up_s": 5}))
    out = talk.utterance("hey harmony")
    assert not of(out, StartTurn) and Status("listening") in out
    talk.wait(2)
    out = talk.utterance("what time is it")
    assert of(out, StartTurn)[0].text == "what time is it"
    talk.send(AnswerFinished())
    talk.wait(3)  # a follow-up within the window needs no wake phrase
    assert of(talk.utterance("and in Tokyo"), StartTurn)
    talk.send(AnswerFinished())
    talk.wait(6)
    assert not of(talk.utterance("and in Paris"), StartTurn)


def test_push_to_talk_hears_only_after_the_key() -> None:
    talk = Talk(rules(**{"activation.mode": "push_to_talk"}))
    assert talk.state.idle_status(talk.now) == "press Enter to talk"
    assert talk.utterance("people talking in the room") == []
    out = talk.send(TalkKey())
    assert Earcon("listening") in out and Status("listening") in out
    out = talk.blocks("ssss")
    assert of(out, StartHearing)
    talk.send(Words("what is two plus two"))
    out = talk.send(TalkKey())  # pressed again: the question is complete
    assert of(out, FinishHearing)
    out = talk.send(Transcript("what is two plus two"))
    assert of(out, StartTurn)
    talk.send(AnswerFinished())
    assert talk.utterance("more talk in the room") == []  # the next question: the key again


def test_the_talk_key_interrupts_an_answer() -> None:
    talk = Talk(rules(**{"activation.mode": "push_to_talk"}))
    talk.send(TalkKey())
    answering(talk)
    out = talk.send(TalkKey())
    assert CancelTurn() in out and Status("listening") in out
    talk.wait(0.3)  # the echo guard: what was still on its way out of the speaker
    assert of(talk.blocks("ss"), StartHearing)


def test_earcons_are_off_by_default_when_always_listening() -> None:
    talk = Talk(rules())
    assert not of(talk.utterance("hello"), Earcon)
    talk = Talk(rules(**{"activation.earcons": True}))
    assert of(talk.utterance("hello"), Earcon) == [Earcon("done")]


def test_activation_is_configured_by_name() -> None:
    config, _ = parse_voice_config({"activation": "wake_phrase"})
    assert config.activation.mode == "wake_phrase"
    config, _ = parse_voice_config({"activation": {"mode": "push_to_talk", "follow_up_s": 3}})
    assert config.activation.follow_up_s == 3
    with pytest.raises(Exception, match=r"activation\.mode"):
        parse_voice_config({"activation": "sometimes"})


# ---------------------------------------------------------------------------- semantic end
def heard_with_pauses(talk: Talk, pattern: str, pause: float) -> list[Any]:
    """Blocks as `Talk.blocks`, each followed by the STT's pause probability for it."""
    out = []
    for c in pattern:
        out += talk.blocks(c)
        if talk.state.phase == "hearing":
            out += talk.send(Pause(pause))
    return out


def test_a_predicted_pause_ends_the_turn_before_the_silence_would() -> None:
    talk = Talk(rules(pauses=True, **{"endpointing.silence_ms": 2000}))
    assert talk.state.rules.end_of_turn() == "end of turn: predicted pause (or 2000 ms of silence)"
    out = heard_with_pauses(talk, "s" * 14, 0.9)
    assert not of(out, FinishHearing)  # never in the middle of speech
    out = heard_with_pauses(talk, ".", 0.9)
    # At the first silent block: 80 ms, not 2000 (and the STT has heard those 80 ms).
    assert of(out, FinishHearing) == [FinishHearing(silence_ms=80, by="predicted pause")]
    assert of(talk.send(Transcript("what time is it")), StartTurn)


def test_a_predicted_pause_is_not_trusted_at_the_start_of_an_utterance() -> None:
    talk = Talk(rules(pauses=True, **{"endpointing.silence_ms": 2000}))
    out = heard_with_pauses(talk, "sss" + "." * 9, 0.9)  # 11 frames heard: 12 are ignored
    assert not of(out, FinishHearing)
    assert of(heard_with_pauses(talk, "..", 0.9), FinishHearing)


def test_a_low_or_flickering_pause_prediction_waits_for_the_silence() -> None:
    talk = Talk(rules(pauses=True, **{"endpointing.silence_ms": 400}))
    out = heard_with_pauses(talk, "s" * 14 + "..", 0.3)
    out += talk.send(Pause(0.95))  # one frame's spike is smoothed away
    assert not of(out, FinishHearing)
    assert of(heard_with_pauses(talk, "...", 0.3), FinishHearing)  # the silence rule


def test_without_pause_heads_or_switched_off_predictions_are_ignored() -> None:
    for talk in (
        Talk(rules(**{"endpointing.silence_ms": 2000})),
        Talk(rules(pauses=True, **{"endpointing.silence_ms": 2000, "endpointing.semantic": "off"})),
    ):
        assert talk.state.rules.end_of_turn() == "end of turn: 2000 ms of silence"
        assert not of(heard_with_pauses(talk, "s" * 14 + "...", 0.99), FinishHearing)


# ---------------------------------------------------------------------------- speculative start
SPECULATING = {"endpointing.speculate_ms": 160}  # 2 silent blocks; the end takes 5


def test_a_speculative_start_is_held_until_the_silence_confirms_the_end() -> None:
    talk = Talk(rules(**SPECULATING))
    assert talk.state.rules.end_of_turn() == (
        "end of turn: 400 ms of silence; answer started after 160 ms"
    )
    talk.blocks("ssssss")
    talk.send(Words("what time is it"))
    assert not of(talk.blocks("."), FinishHearing)
    # The transcript is taken at 160 ms (flushed past the silence the STT has heard), the
    # stream going on.
    assert of(talk.blocks("."), PeekHearing) == [PeekHearing(silence_ms=160)]
    out = talk.send(Transcript("what time is it"))
    assert of(out, StartTurn) == [
        StartTurn("what time is it", pytest.approx(talk.now - 2 * BLOCK), speculative=True)
    ]
    assert talk.state.phase == "hearing" and not free(talk.state)
    out = talk.blocks("..")
    # The STT takes these silent blocks only if the user speaks on (the answer runs now).
    assert not of(out, ConfirmTurn) and of(out, Feed) == [Feed(later=True)] * 2
    out = talk.blocks(".")
    assert of(out, ConfirmTurn) and not of(out, FinishHearing) and not of(out, StartTurn)
    assert of(out, DropHearing)  # its transcript was taken: the stream just ends
    assert talk.state.phase == "answering" and Status("thinking") in out


def test_speech_after_a_speculative_start_drops_it_and_the_same_stream_hears_on() -> None:
    talk = Talk(rules(**SPECULATING))
    talk.blocks("ssssss")
    talk.blocks("..")
    talk.send(Transcript("what is"))
    out = talk.blocks("s")
    assert of(out, DropTurn) and of(out, Feed) == [Feed(later=False)]
    assert not of(out, StartHearing) and not of(out, DropHearing)  # one utterance, one stream
    assert talk.state.phase == "hearing"
    assert ShowWords("what is the time") in talk.send(Words("what is the time"))
    out = talk.blocks("sss..")
    assert of(out, PeekHearing)
    out = talk.send(Transcript("what is the time"))
    assert of(out, StartTurn) == [
        StartTurn("what is the time", pytest.approx(talk.now - 2 * BLOCK), speculative=True)
    ]
    assert of(talk.blocks("..."), ConfirmTurn)


def test_a_speculative_transcript_without_a_question_starts_nothing() -> None:
    talk = Talk(rules(**SPECULATING))
    talk.blocks("ssssss..")
    assert not of(talk.send(Transcript("")), StartTurn)
    out = talk.blocks("...")
    assert Notice("(heard speech but no words)") in out and not of(out, ConfirmTurn)
    assert talk.state.phase == "idle"


def test_muting_drops_a_speculative_turn() -> None:
    talk = Talk(rules(**SPECULATING))
    talk.blocks("ssssss..")
    talk.send(Transcript("what time is it"))
    out = talk.send(Mute(True))
    assert of(out, DropTurn) and talk.state.phase == "idle"


def test_with_pause_heads_the_stt_hears_the_pause_after_an_early_start() -> None:
    """A semantic STT's feed is the pause prediction that may confirm the turn: its
    silent blocks are never left for later."""
    talk = Talk(rules(pauses=True, **SPECULATING, **{"endpointing.silence_ms": 2000}))
    heard_with_pauses(talk, "ssssss..", 0.1)
    talk.send(Transcript("what time is it"))
    assert talk.state.speculating
    assert of(heard_with_pauses(talk, ".", 0.1), Feed) == [Feed(later=False)]


def test_speculation_as_configured() -> None:
    assert rules().speculate_blocks == 0
    assert rules(**SPECULATING).speculate_blocks == 2
    assert rules(pauses=True, **SPECULATING).speculate_blocks == 2  # the stream goes on
    early = {"endpointing.pause_speculate_threshold": 0.4}
    assert rules(pauses=True, **early).pause_speculate == 0.4
    assert rules(**early).pause_speculate == 0  # no pause heads, no predicted pauses
    assert rules(pauses=True, **early, **{"endpointing.semantic": "off"}).pause_speculate == 0
    with pytest.raises(ConfigError, match=r"speculate_ms .* must be shorter than silence_ms"):
        rules(**{"endpointing.speculate_ms": 400})
    with pytest.raises(ConfigError, match=r"pause_speculate_threshold .* below pause_threshold"):
        rules(**{"endpointing.pause_speculate_threshold": 0.7})


# Semantic end with a speculative start at a likely pause (0.4), confirmed at 0.6.
LIKELY = {"endpointing.silence_ms": 2000, "endpointing.pause_speculate_threshold": 0.4}


def test_a_likely_pause_starts_the_answer_and_a_predicted_one_confirms_it() -> None:
    talk = Talk(rules(pauses=True, **LIKELY))
    assert talk.state.rules.end_of_turn() == (
        "end of turn: predicted pause (or 2000 ms of silence); answer started at a likely pause"
    )
    heard_with_pauses(talk, "s" * 14, 0.5)
    out = heard_with_pauses(talk, ".", 0.5)
    assert of(out, PeekHearing) == [PeekHearing(silence_ms=80)] and not of(out, FinishHearing)
    out = talk.send(Transcript("what time is it"))
    assert of(out, StartTurn) == [StartTurn("what time is it", pytest.approx(talk.now - BLOCK),
                                            speculative=True)]  # fmt: skip
    out = heard_with_pauses(talk, ".", 0.55)
    assert of(out, Feed) and not of(out, ConfirmTurn)  # still only likely
    out = heard_with_pauses(talk, ".", 0.95)
    assert of(out, ConfirmTurn) and of(out, DropHearing) and talk.state.phase == "answering"


def test_speech_after_a_likely_pause_drops_the_answer() -> None:
    talk = Talk(rules(pauses=True, **LIKELY))
    heard_with_pauses(talk, "s" * 14 + ".", 0.5)
    talk.send(Transcript("what is"))
    out = heard_with_pauses(talk, "s", 0.1)
    assert of(out, DropTurn) and talk.state.phase == "hearing"
    out = heard_with_pauses(talk, "sss.", 0.95)  # said, and now surely done
    assert of(out, FinishHearing) and not of(out, PeekHearing)


def test_a_likely_pause_is_confirmed_by_the_silence_when_no_certainty_comes() -> None:
    talk = Talk(rules(pauses=True, **(LIKELY | {"endpointing.silence_ms": 400})))
    heard_with_pauses(talk, "s" * 14 + ".", 0.5)
    talk.send(Transcript("what time is it"))
    out = heard_with_pauses(talk, "....", 0.5)
    assert of(out, ConfirmTurn) and talk.state.phase == "answering"


# ---------------------------------------------------------------------------- backchannels
def test_a_backchannel_over_the_answer_does_not_interrupt_it() -> None:
    talk = Talk(rules(echo_cancelled=True))
    answering(talk)
    out = talk.blocks("sss")
    assert StartHearing(3) in out and not of(out, CancelTurn)  # heard, not yet obeyed
    assert not of(talk.send(Words("mm-hmm")), CancelTurn)
    out = talk.blocks("." * 5)
    assert of(out, FinishHearing)
    out = talk.send(Transcript("Mm-hmm, yeah."))
    assert not of(out, CancelTurn) and not of(out, StartTurn)
    assert talk.state.phase == "answering" and not talk.state.interrupting
    talk.send(AnswerFinished())
    assert talk.state.phase == "idle"


def test_words_over_the_answer_interrupt_it_as_soon_as_they_are_heard() -> None:
    talk = Talk(rules(echo_cancelled=True))
    answering(talk)
    talk.blocks("sss")
    out = talk.send(Words("yeah wait"))
    assert out[:2] == [Notice("(interrupted)"), CancelTurn()]
    assert talk.state.phase == "hearing" and talk.state.addressed
    out = talk.utterance("yeah wait what about Paris", speech=2)
    assert of(out, StartTurn)[0].text == "yeah wait what about Paris"


def test_a_stop_phrase_interrupts_and_a_word_count_can_be_asked() -> None:
    talk = Talk(rules(echo_cancelled=True, **{"barge_in.interrupt_min_words": 2}))
    answering(talk)
    talk.blocks("sss")
    assert not of(talk.send(Words("okay wait")), CancelTurn)  # one word besides "okay"
    assert of(talk.send(Words("okay wait no")), CancelTurn)
    other = Talk(rules(echo_cancelled=True, **{"barge_in.interrupt_min_words": 3}))
    answering(other)
    other.blocks("sss")
    assert of(other.send(Words("stop")), CancelTurn)  # a stop phrase needs no count


def test_the_answer_ending_under_the_users_words_hands_them_to_a_turn() -> None:
    talk = Talk(rules(echo_cancelled=True))
    answering(talk)
    talk.blocks("sss")
    talk.send(AnswerFinished())
    assert talk.state.phase == "hearing" and not talk.state.interrupting
    out = talk.utterance("mm and another one", speech=2)
    assert of(out, StartTurn)[0].text == "mm and another one"


def test_the_answer_ending_once_the_words_over_it_were_done_waits_for_their_transcript() -> None:
    """The speech over the answer ended (its transcript asked), then the answer ended too:
    the utterance's end stays decided — no second end is asked of a finished stream — and
    its transcript is the next turn."""
    talk = Talk(rules(echo_cancelled=True))
    answering(talk)
    talk.blocks("sss")
    assert of(talk.blocks("." * 5), FinishHearing)
    talk.send(AnswerFinished())
    assert talk.state.phase == "hearing" and talk.state.ending
    assert not of(talk.blocks("." * 6), FinishHearing)
    out = talk.send(Transcript("and what about Spain"))
    assert of(out, StartTurn)[0].text == "and what about Spain"


def test_muting_while_speech_is_heard_over_the_answer_drops_it() -> None:
    talk = Talk(rules(echo_cancelled=True))
    answering(talk)
    talk.blocks("sss")
    out = talk.send(Mute(True))
    assert DropHearing() in out and not talk.state.interrupting


# ---------------------------------------------------------------------------- turn detector
DETECTOR = {
    "endpointing.silence_ms": 700,
    "endpointing.min_wait_ms": 300,
    "endpointing.max_wait_ms": 1500,
    "endpointing.end_threshold": 0.5,
    "endpointing.speculate_threshold": None,
}


def pause(talk: Talk, blocks: int, score: float | None) -> list[Any]:
    """Silent blocks, each followed by the turn model's score of the audio heard so far."""
    out = []
    for _ in range(blocks):
        step_out = talk.blocks(".")
        out += step_out
        if talk.state.phase != "hearing" or talk.state.ending:
            break
        if score is not None and of(step_out, ScoreEnd):
            out += talk.send(EndScore(score, talk.now))
    return out


def heard(talk: Talk, words: str, speech: int = 6) -> None:
    talk.blocks("s" * speech)
    talk.send(Words(words))


def test_the_detector_ends_a_complete_request_sooner_than_the_silence_rule() -> None:
    talk = Talk(rules(turn_model=True, **DETECTOR))
    heard(talk, "what time is it")
    out = pause(talk, 20, score=0.95)
    # 320 ms (the first block past min_wait) against 700 ms of silence.
    assert of(out, FinishHearing) == [FinishHearing(silence_ms=320, by="turn detector")]
    silence = Talk(rules(**DETECTOR))
    heard(silence, "what time is it")
    assert of(pause(silence, 20, score=None), FinishHearing) == [FinishHearing(silence_ms=720)]


def test_the_detector_holds_through_a_mid_sentence_pause_the_silence_rule_cuts() -> None:
    for words, score in [("so I was thinking that", 0.1), ("add eggs, milk and", 0.95)]:
        # The voice sounds unfinished; or it sounds finished but the words are not.
        silence = Talk(rules(**DETECTOR))
        heard(silence, words)
        assert of(pause(silence, 12, score=None), FinishHearing)  # cut off after 700 ms
        talk = Talk(rules(turn_model=True, **DETECTOR))
        heard(talk, words)
        assert not of(pause(talk, 12, score=score), FinishHearing)  # 960 ms: still listening
        talk.blocks("ss")
        talk.send(Words(f"{words} we go"))
        out = pause(talk, 20, score=0.9)
        assert of(out, FinishHearing) == [FinishHearing(320, "turn detector")]


def test_the_detector_never_waits_past_the_maximum() -> None:
    talk = Talk(rules(turn_model=True, **DETECTOR))
    heard(talk, "what time is it")
    out = pause(talk, 30, score=0.01)
    assert of(out, FinishHearing) == [FinishHearing(silence_ms=1520)]  # the block past 1.5 s
    unscored = Talk(rules(turn_model=True, **DETECTOR))  # a model too slow to answer
    heard(unscored, "what time is it")
    assert of(pause(unscored, 30, score=None), FinishHearing) == [FinishHearing(1520)]


def test_a_score_of_audio_before_the_latest_speech_is_ignored() -> None:
    talk = Talk(rules(turn_model=True, **DETECTOR))
    heard(talk, "what time")
    talk.blocks("....")
    before = talk.now
    heard(talk, "what time is it", speech=2)
    talk.blocks("....")
    assert not of(talk.send(EndScore(0.99, before)), FinishHearing)
    assert of(talk.send(EndScore(0.99, talk.now)), FinishHearing)


def test_a_likely_end_starts_the_answer_and_the_end_confirms_it() -> None:
    talk = Talk(rules(turn_model=True, **DETECTOR | {"endpointing.speculate_threshold": 0.3}))
    assert talk.state.rules.end_of_turn() == (
        "end of turn: turn model + hold words >= 0.5 after 300 ms (at most 1500 ms of silence)"
        "; answer started at a likely end"
    )
    heard(talk, "what time is it")
    out = pause(talk, 2, score=0.4)
    assert of(out, PeekHearing) and talk.state.speculating
    out = talk.send(Transcript("what time is it"))
    assert of(out, StartTurn)[0].speculative
    out = pause(talk, 3, score=0.8)
    assert ConfirmTurn("turn detector") in out and talk.state.phase == "answering"


def test_the_chat_models_text_signal_is_asked_and_weighed() -> None:
    settings = DETECTOR | {"endpointing.text_weight": 1.0, "endpointing.hold_words": []}
    talk = Talk(rules(text_signal=True, **settings))
    assert "chat model" in talk.state.rules.end_of_turn()
    talk.blocks("s" * 6)
    assert not of(talk.blocks("."), ScoreEnd)  # no turn model: nothing to score the audio
    talk.blocks("s")
    assert ScoreText("what is the capital of") in talk.send(Words("what is the capital of"))
    talk.send(TextScore(0.02, "what is the capital of"))
    assert not of(pause(talk, 10, score=None), FinishHearing)  # unlikely end: listening on
    talk.blocks("ss")
    talk.send(Words("what is the capital of France"))
    talk.send(TextScore(0.9, "what is the capital of France"))
    assert of(pause(talk, 6, score=None), FinishHearing) == [FinishHearing(320, "turn detector")]


def test_a_head_start_taken_at_the_end_waits_for_its_transcript() -> None:
    """Speculation (by silence) and the detector's end due on the same block: the end is
    decided once the transcript it needs has come back (the shell answers a
    `PeekHearing` at once, before any later score)."""
    settings = DETECTOR | {"endpointing.speculate_ms": 560, "endpointing.min_wait_ms": 500}
    talk = Talk(rules(turn_model=True, **settings))
    heard(talk, "what time is it")
    pause(talk, 6, score=0.9)
    out = talk.blocks(".")  # 560 ms: the head start's block, past the minimum wait
    assert of(out, PeekHearing) and not of(out, ConfirmTurn) and not of(out, Notice)
    out = talk.send(Transcript("what time is it"))
    assert of(out, StartTurn)[0].speculative
    out = talk.send(EndScore(0.9, talk.now))
    assert ConfirmTurn("turn detector") in out
