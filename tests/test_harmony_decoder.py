"""The Harmony decoder on output that breaks the format: what can be recovered is, and no
special-token text is ever shown, spoken or stored."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_harmony.llm.harmony import HarmonyFormat
from mlx_harmony.llm.messages import MessageDone, TextDelta


@pytest.fixture(scope="module")
def harmony(vocab_dir: Path) -> HarmonyFormat:
    return HarmonyFormat()


def _decode(harmony: HarmonyFormat, completion: str) -> tuple[list[tuple], list[tuple]]:
    """(channel, text) of every delta and of every finished message."""
    decoder = harmony.decoder()
    events = []
    for token in harmony.encoding.encode(completion, allowed_special="all"):
        events += decoder.feed(token)
    events += decoder.finish()
    deltas = [(e.channel, e.text) for e in events if isinstance(e, TextDelta)]
    done = [(e.message.channel, e.message.content) for e in events if isinstance(e, MessageDone)]
    return deltas, done


@pytest.mark.parametrize(
    ("completion", "messages"),
    [
        (  # a reserved token inside the answer
            "<|channel|>final<|message|>Hello<|reserved_201070|> there<|return|>",
            [("final", "Hello there")],
        ),
        (  # <|message|> twice, then a second message properly begun
            "<|channel|>final<|message|>Hi<|message|> more<|end|><|start|>assistant"
            "<|channel|>final<|message|>Again<|return|>",
            [("final", "Hi more"), ("final", "Again")],
        ),
        (  # the reasoning never ended: the answer must not stay hidden in it
            "<|channel|>analysis<|message|>plan<|channel|>final<|message|>Answer<|return|>",
            [("analysis", "plan"), ("final", "Answer")],
        ),
        (
            "<|channel|>analysis<|message|>plan<|start|>assistant<|channel|>final<|message|>"
            "Answer<|return|>",
            [("analysis", "plan"), ("final", "Answer")],
        ),
    ],
)
def test_broken_output_is_recovered_without_special_token_text(
    harmony: HarmonyFormat, completion: str, messages: list[tuple]
) -> None:
    deltas, done = _decode(harmony, completion)
    assert done == messages
    assert not any("<|" in text for _, text in deltas + done), deltas
    spoken = "".join(text for channel, text in deltas if channel == "final")
    assert spoken == "".join(text for channel, text in messages if channel == "final")


def test_well_formed_output_is_unchanged(harmony: HarmonyFormat) -> None:
    _, done = _decode(
        harmony,
        "<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Paris.<|return|>",
    )
    assert done == [("analysis", "Simple."), ("final", "Paris.")]


def test_each_piece_of_text_says_what_it_is(harmony: HarmonyFormat) -> None:
    """Consumers act on a delta's kind, never on Harmony's channels: reasoning, a preamble
    to the user, a tool call's arguments, the answer."""

    def kinds(completion: str) -> list[str]:
        decoder = harmony.decoder()
        events = []
        for token in harmony.encoding.encode(completion, allowed_special="all"):
            events += decoder.feed(token)
        events += decoder.finish()
        seen = [e.kind for e in events if isinstance(e, TextDelta)]
        return [k for i, k in enumerate(seen) if i == 0 or seen[i - 1] != k]

    assert kinds(
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
        "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant"
        "<|channel|>commentary to=functions.weather <|constrain|>json<|message|>"
        '{"city": "Paris"}<|call|>'
    ) == ["reasoning", "preamble", "tool_arguments"]
    assert kinds("<|channel|>final<|message|>Sunny.<|return|>") == ["answer"]
