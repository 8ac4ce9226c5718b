"""Where Pocket TTS's answer is cut into chunks as it is written (`PocketSpeech._cut`):
its text is a prefix of each chunk, so a chunk must be complete before it is spoken."""

from __future__ import annotations

import pytest

from mlx_harmony.voice.pocket_tts import (
    FIRST_CHUNK_MAX_WORDS,
    MAX_CHUNK_WORDS,
    PocketSpeech,
    _Chunk,
)


def speech(text: str, spoken_before: bool = False, closed: bool = False) -> PocketSpeech:
    s = PocketSpeech(None)  # type: ignore[arg-type]  # cutting needs no model
    s.push(text)
    if spoken_before:
        s._chunks.append(_Chunk(["Earlier."], 0, 10, True))
    if closed:
        s.close()
    return s


def cut(s: PocketSpeech) -> str | None:
    at = s._cut()
    return None if at is None else s._text[:at]


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("The capital of France", None),  # no end yet: nothing can be said
        ("Paris. It is ", "Paris. "),  # a sentence, however short
        ("Well, it is ", None),  # a clause of one word is too short alone
        ("Well, if you ask me, it is ", "Well, if you ask me, "),
        ("It costs 3.5 euros ", None),  # a decimal point is not a full stop
        ('He said "yes." Then ', 'He said "yes." '),  # an end inside quotes
    ],
)
def test_the_first_chunk_ends_at_the_first_clause_or_sentence(text: str, first: str | None) -> None:
    assert cut(speech(text)) == first


def test_later_chunks_take_every_complete_sentence_and_no_clause() -> None:
    s = speech("Yes, it is. It has two rivers, the Seine and the Bievre. And ", spoken_before=True)
    assert cut(s) == "Yes, it is. It has two rivers, the Seine and the Bievre. "


def test_a_sentence_longer_than_a_chunk_is_cut_at_a_word() -> None:
    words = [f"w{i}" for i in range(MAX_CHUNK_WORDS + 5)]
    s = speech(" ".join(words) + " ", spoken_before=True)
    assert cut(s) == " ".join(words[:MAX_CHUNK_WORDS]) + " "


def test_the_first_chunk_does_not_wait_for_a_long_first_sentence() -> None:
    words = [f"w{i}" for i in range(FIRST_CHUNK_MAX_WORDS)]
    assert cut(speech(" ".join(words) + " ")) is None  # not yet: it may still end
    more = speech(" ".join([*words, "and"]) + " ")
    assert cut(more) == " ".join(words) + " "


def test_the_end_of_the_answer_ends_its_last_chunk() -> None:
    assert cut(speech("and that is all", spoken_before=True)) is None
    assert cut(speech("and that is all", spoken_before=True, closed=True)) == "and that is all"
    assert speech("  ", closed=True).done
