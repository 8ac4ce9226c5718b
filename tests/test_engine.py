"""The engine on a tiny GPT-OSS trained to speak Harmony, and on a ChatML model."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import stream_generate

from mlx_harmony.llm.config import PromptConfig, SamplingParams
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.engine import Engine, collect
from mlx_harmony.llm.errors import ConfigError, RuntimeFailure
from mlx_harmony.llm.messages import (
    AnswerNow,
    CallFunction,
    ChatMessage,
    MessageDone,
    TextDelta,
    TurnDone,
)
from tests.support.tiny_models import CHATML_TURNS, HARMONY_TURNS

GREEDY = PromptConfig(sampling=SamplingParams(temperature=0, max_tokens=80))


def turn_of(user: str):
    return next(t for t in HARMONY_TURNS if t.user == user and not t.history)


def test_harmony_turn_streams_analysis_then_final(engine: Engine) -> None:
    events = list(engine.stream(Conversation([ChatMessage("user", "Hello")], GREEDY)))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    channels = [d.channel for d in deltas]
    # Analysis first, then final; <|end|> between them did not stop generation.
    assert channels == sorted(channels, key=["analysis", "final"].index)
    assert {"analysis", "final"} <= set(channels)
    done = events[-1]
    assert isinstance(done, TurnDone) and done.finish_reason == "stop"
    assert done.tokens[-1] == 200002  # <|return|>
    assert 200007 in done.tokens  # <|end|> closed the analysis and generation went on
    t = turn_of("Hello")
    assert [(m.channel, m.content) for m in done.messages] == [
        ("analysis", t.analysis),
        ("final", t.final),
    ]
    assert "".join(d.text for d in deltas if d.channel == "final") == t.final
    msgs = [e for e in events if isinstance(e, MessageDone)]
    assert [m.message.channel for m in msgs] == ["analysis", "final"]
    # The reasoning's tokens, counted by the decoder as they came: the analysis text
    # (and its header's tail), none of the final answer's.
    analysis = len(engine.tokenizer.encode(t.analysis, add_special_tokens=False))
    final = len(engine.tokenizer.encode(t.final, add_special_tokens=False))
    assert analysis <= done.stats.reasoning_tokens <= done.stats.generated_tokens - final


def test_first_final_words_arrive_before_the_turn_ends(engine: Engine) -> None:
    seen_final_at = None
    for i, event in enumerate(
        engine.stream(Conversation([ChatMessage("user", "Tell me a joke")], GREEDY))
    ):
        if isinstance(event, TextDelta) and event.channel == "final" and seen_final_at is None:
            seen_final_at = i
        if isinstance(event, TurnDone):
            end_at = i
    assert seen_final_at is not None and end_at - seen_final_at > 5
    assert engine_stats_ok(event)


def engine_stats_ok(done: TurnDone) -> bool:
    s = done.stats
    return 0 < s.time_to_first_token <= s.time_to_first_final <= s.total_seconds


@pytest.mark.parametrize("user", ["Hello", "What is the capital of France?"])
def test_greedy_equals_mlx_lm_generate(engine: Engine, user: str) -> None:
    history = [ChatMessage("user", user)]
    prompt = engine.render(history, GREEDY)
    ours = collect(engine.stream(Conversation(history, GREEDY))).tokens
    theirs = []
    for r in stream_generate(engine.model, engine.tokenizer, mx.array(prompt), max_tokens=80):
        theirs.append(r.token)
        if r.token in (200002, 200012):
            break
    assert list(ours) == theirs


def _conversation(engine: Engine, users: list[str]) -> list[TurnDone]:
    history: list[ChatMessage] = []
    turns = []
    for user in users:
        history.append(ChatMessage("user", user))
        done = collect(engine.stream(Conversation(history, GREEDY)))
        history += done.messages
        turns.append(done)
    return turns


@pytest.mark.slow
def test_multi_turn_reuses_cache_and_matches_recomputation(gpt_oss_path) -> None:
    users = ["Hello", "Thanks", "What is the capital of France?", "Tell me a joke"]
    cached = Engine.load(str(gpt_oss_path))
    turns = _conversation(cached, users)
    # From scratch: a fresh engine for every turn, same history.
    history: list[ChatMessage] = []
    for user, turn in zip(users, turns, strict=True):
        history.append(ChatMessage("user", user))
        fresh = Engine.load(str(gpt_oss_path))
        again = collect(fresh.stream(Conversation(history, GREEDY)))
        assert again.tokens == turn.tokens
        assert again.stats.cached_tokens == 0
        history += again.messages
    assert turns[1].messages[-1].content == "You are welcome!"
    for turn in turns[1:]:
        # Only the new turn is prefilled: all but the final answer and new user message.
        fed = turn.stats.prompt_tokens - turn.stats.cached_tokens
        assert fed < 40, turn.stats
    # After turn 3 the live cache is past the 128-token sliding window and cannot be
    # trimmed back: turn 4 reused the checkpoint taken before turn 3's last prompt token.
    before = turns[-2].stats
    assert before.prompt_tokens + before.generated_tokens > 128
    assert turns[-1].stats.cached_tokens == before.prompt_tokens - 1


def test_past_analysis_is_dropped_from_the_next_prompt(engine: Engine) -> None:
    history = [ChatMessage("user", "Hello")]
    history += collect(engine.stream(Conversation(history, GREEDY))).messages
    history.append(ChatMessage("user", "Thanks"))
    text = engine.format.encoding.decode(engine.render(history, GREEDY))
    assert turn_of("Hello").final in text
    assert turn_of("Hello").analysis not in text


def test_call_token_ends_the_turn_as_a_tool_call(engine: Engine) -> None:
    forced = GREEDY.model_copy(
        update={"sampling": SamplingParams(temperature=0, logit_bias={200012: 1e4})}
    )
    done = collect(engine.stream(Conversation([ChatMessage("user", "Hello")], forced)))
    assert done.finish_reason == "tool_call"
    assert done.tokens == (200012,)


def test_should_stop_cancels_and_keeps_partial_answer(engine: Engine) -> None:
    count = 0

    def stop() -> bool:
        nonlocal count
        count += 1
        return count >= 12

    history = [ChatMessage("user", "What is the capital of France?")]
    done = collect(engine.stream(Conversation(history, GREEDY), should_stop=stop))
    assert done.finish_reason == "cancelled"
    assert len(done.tokens) == 12
    # The next turn still matches a from-scratch run.
    follow = [*history, *done.messages, ChatMessage("user", "Hello")]
    fresh = Engine(engine.model, engine.tokenizer, "fresh")
    assert (
        collect(engine.stream(Conversation(follow, GREEDY))).tokens
        == collect(fresh.stream(Conversation(follow, GREEDY))).tokens
    )


def test_exception_mid_generation_leaves_cache_consistent(engine: Engine) -> None:
    history = [ChatMessage("user", "Tell me a joke")]
    stream = engine.stream(Conversation(history, GREEDY))
    for _ in range(5):
        next(stream)
    with pytest.raises(KeyboardInterrupt):
        stream.throw(KeyboardInterrupt)
    done = collect(engine.stream(Conversation(history, GREEDY)))
    assert done.messages[-1].content == turn_of("Tell me a joke").final
    assert done.stats.cached_tokens > 0


def test_max_tokens_ends_with_length(engine: Engine) -> None:
    short = GREEDY.model_copy(update={"sampling": SamplingParams(temperature=0, max_tokens=7)})
    done = collect(engine.stream(Conversation([ChatMessage("user", "Hello")], short)))
    assert done.finish_reason == "length" and len(done.tokens) == 7
    assert done.messages[-1].channel == "analysis"  # the open message is flushed


def test_context_limit_drops_oldest_exchanges(engine: Engine) -> None:
    history = [
        ChatMessage("user", "Hello"),
        ChatMessage("assistant", "Hello! How can I help you today?", "final"),
        ChatMessage("user", "Tell me a joke"),
    ]
    full = len(engine.render(history, GREEDY))
    limited = GREEDY.model_copy(update={"max_context_tokens": full + 79})
    tokens = engine.render(history, limited, max_tokens=80)
    assert len(tokens) < full
    assert "Hello!" not in engine.format.encoding.decode(tokens)
    tiny = GREEDY.model_copy(update={"max_context_tokens": 256})
    with pytest.raises(ConfigError, match="max_context_tokens=256"):
        engine.render(history[-1:], tiny, max_tokens=1000)


def test_a_tokenizer_that_outruns_the_model_is_refused(engine: Engine, monkeypatch) -> None:
    # The penalty's scatter would write past the logits (MLX has no bounds check).
    monkeypatch.setattr(Engine, "vocab_size", property(lambda self: 100))
    penalty = GREEDY.model_copy(update={"sampling": SamplingParams(repetition_penalty=1.2)})
    with pytest.raises(RuntimeFailure, match="does not match the weights"):
        collect(engine.stream(Conversation([ChatMessage("user", "Hi")], penalty)))


def test_a_long_chat_is_cut_to_the_context_in_a_few_renders(engine: Engine, monkeypatch) -> None:
    exchanges = 64
    history = []
    for i in range(exchanges):
        history += [
            ChatMessage("user", f"Question number {i}?"),
            ChatMessage("assistant", f"Answer number {i}.", "final"),
        ]
    history.append(ChatMessage("user", "Tell me a joke"))
    full = len(engine.render(history, GREEDY))
    limited = GREEDY.model_copy(update={"max_context_tokens": full // 2})
    # The fewest exchanges dropped that make it fit, found one by one.
    expected = next(
        tokens
        for drop in range(1, exchanges + 1)
        if len(tokens := engine.render(history[2 * drop :], GREEDY)) <= full // 2
    )
    renders = []
    real = engine.format.render
    monkeypatch.setattr(engine.format, "render", lambda *a: renders.append(1) or real(*a))
    assert engine.render(history, limited) == expected
    assert len(renders) <= 9  # log2(64) + 2, not one per dropped exchange


def test_chat_template_model_answers_and_stops(chatml_engine: Engine) -> None:
    chatml_engine.reset()
    assert not chatml_engine.harmony
    history: list[ChatMessage] = []
    for user, answer in CHATML_TURNS:
        history.append(ChatMessage("user", user))
        done = collect(chatml_engine.stream(Conversation(history, GREEDY)))
        assert done.finish_reason == "stop"
        assert [(m.channel, m.content) for m in done.messages] == [("final", answer)]
        assert done.stats.reasoning_tokens == 0  # no think block: no reasoning
        history += done.messages
    assert done.stats.cached_tokens > 0


def test_missing_model_folder_is_one_line_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"model .*nothing: folder does not exist"):
        Engine.load(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        Engine.load(str(tmp_path / "empty"))


def test_an_answer_is_started_in_each_formats_own_tokens(
    engine: Engine, chatml_engine: Engine
) -> None:
    """AnswerNow("The") is the final channel's header in Harmony, plain text in a chat
    template: either way the answer, and nothing else, begins with it."""
    question = [ChatMessage("user", "What is the capital of France?")]
    for model in (engine, chatml_engine):
        reply = collect(model.stream(Conversation(question, GREEDY), start=AnswerNow("The")))
        assert {m.channel for m in reply.messages} == {"final"}  # no reasoning first
        assert reply.messages[0].content.startswith("The")
    # A call cannot be forced in a template's syntax: the model is left to answer.
    said = collect(chatml_engine.stream(Conversation(question, GREEDY), start=CallFunction("f")))
    assert said.messages and not said.messages[0].recipient


def test_closing_the_stream_before_any_token_keeps_the_cache_exact(engine: Engine) -> None:
    history = [ChatMessage("user", "What is the capital of France?")]
    prefix = AnswerNow("The")
    stream = engine.stream(Conversation(history, GREEDY), start=prefix)
    assert isinstance(next(stream), TextDelta)  # from the forced prefix, before any step
    stream.close()
    again = collect(engine.stream(Conversation(history, GREEDY), start=prefix))
    fresh = Engine(engine.model, engine.tokenizer, "fresh")
    expected = collect(fresh.stream(Conversation(history, GREEDY), start=prefix))
    assert again.tokens == expected.tokens


def test_prefill_while_the_user_speaks_leaves_little_to_do_at_the_end(engine: Engine) -> None:
    from datetime import datetime

    now = datetime(2026, 11, 25, 12, 0)
    question = "What is the capital of France?"
    words = question.split()
    cached = 0
    for n in range(1, len(words) + 1):  # the transcript grows word by word
        partial = [ChatMessage("user", " ".join(words[:n]))]
        grown = engine.prefill(Conversation(partial, GREEDY, now=now))
        assert grown >= cached  # each word only adds to what is cached
        cached = grown
    done = collect(engine.stream(Conversation([ChatMessage("user", question)], GREEDY, now=now)))
    # Only the last word, the end of the message and the assistant header were left.
    assert done.stats.prompt_tokens - done.stats.cached_tokens <= 8
    assert done.stats.cached_tokens == cached
    engine.reset()
    fresh = collect(engine.stream(Conversation([ChatMessage("user", question)], GREEDY, now=now)))
    assert done.tokens == fresh.tokens  # the speculative prefill changes nothing but speed


def test_prefill_in_steps_feeds_a_chunk_at_a_time_and_can_be_left_half_way(
    engine: Engine,
) -> None:
    from datetime import datetime

    now = datetime(2026, 11, 25, 12, 0)
    long_question = "Tell me about " + " ".join(f"city number {i}," for i in range(40)) + " please"
    partial = [ChatMessage("user", long_question)]
    sizes = list(engine.prefill_steps(Conversation(partial, GREEDY, now=now), step=16))
    assert len(sizes) > 3 and all(b - a <= 16 for a, b in zip([0, *sizes], sizes, strict=False))
    engine.reset()
    steps = engine.prefill_steps(Conversation(partial, GREEDY, now=now), step=16)
    half = [next(steps), next(steps)][-1]
    steps.close()  # newer words came: the rest of this feed is not wanted
    done = collect(
        engine.stream(Conversation([ChatMessage("user", long_question + " now")], GREEDY, now=now))
    )
    assert done.stats.cached_tokens == half  # what was fed is reused
    engine.reset()
    fresh = collect(
        engine.stream(Conversation([ChatMessage("user", long_question + " now")], GREEDY, now=now))
    )
    assert done.tokens == fresh.tokens


def test_prefill_of_a_transcript_that_changed_its_mind_is_undone(engine: Engine) -> None:
    from datetime import datetime

    now = datetime(2026, 11, 25, 12, 0)
    engine.prefill(Conversation([ChatMessage("user", "What is the weather in")], GREEDY, now=now))
    question = "What is the capital of France?"
    done = collect(engine.stream(Conversation([ChatMessage("user", question)], GREEDY, now=now)))
    engine.reset()
    fresh = collect(engine.stream(Conversation([ChatMessage("user", question)], GREEDY, now=now)))
    assert done.tokens == fresh.tokens
    assert 0 < done.stats.cached_tokens < fresh.stats.prompt_tokens


def test_a_dropped_speculative_turn_is_rolled_back_to_what_was_prefilled(
    engine: Engine, monkeypatch
) -> None:
    """A turn started before the user finished (speculative start) and then dropped: after
    `rollback` the next turn reuses the words prefilled before it. Here the cache cannot
    be trimmed, as GPT-OSS's sliding-window layers cannot once a chat passes their window:
    without the rollback the next turn would prefill everything again."""
    from datetime import datetime

    monkeypatch.setattr("mlx_harmony.llm.prompt_cache.can_trim_prompt_cache", lambda cache: False)
    now = datetime(2026, 11, 25, 12, 0)
    heard = Conversation([ChatMessage("user", "What is the capital of")], GREEDY, now=now)
    prefilled = engine.prefill(heard)
    mark = engine.mark()
    collect(engine.stream(heard))  # the speculative answer, then dropped
    engine.rollback(mark)
    question = Conversation(
        [ChatMessage("user", "What is the capital of France?")], GREEDY, now=now
    )
    done = collect(engine.stream(question))
    assert done.stats.cached_tokens == prefilled > 0
    engine.reset()
    assert collect(engine.stream(question)).tokens == done.tokens


def test_xtc_never_cuts_the_tokens_that_shape_an_answer(engine: Engine) -> None:
    """As in the original tool: the ends of a turn and of a message, and the newline."""
    newline = engine.tokenizer.encode("\n", add_special_tokens=False)
    assert {200002, 200012, 200007, *newline} <= set(engine.xtc_protected)


def test_loading_wires_the_models_memory_where_the_device_recommends_a_size(
    gpt_oss_path, monkeypatch
) -> None:
    """Apple silicon's recommended working set, as mlx-lm wires it while generating."""
    wired: list[int] = []
    info = mx.device_info()
    monkeypatch.setattr(mx, "device_info", lambda: {**info, "max_recommended_working_set_size": 7})
    monkeypatch.setattr(mx, "set_wired_limit", lambda size: wired.append(size) or 0)
    Engine.load(str(gpt_oss_path))
    assert wired == [7]


class _Counted:
    """The model, with the length of every chunk it is called on noted."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, []  # (tokens fed, tokens cached before)

    def __call__(self, inputs, cache):
        self.calls.append((inputs.shape[1], cache[0].offset))
        return self.model(inputs, cache=cache)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def test_a_warmed_up_engine_answers_as_a_fresh_one(gpt_oss_path) -> None:
    """The warm-up runs the model as a conversation does (the prompt in one chunk, words
    prefilled as said, answer tokens, a chunk past the sliding window), then leaves no trace:
    the first real turn is a fresh engine's, nothing reused, the same tokens from the
    same seed."""
    from mlx_harmony.llm.engine import load_model

    seeded = PromptConfig(sampling=SamplingParams(temperature=1.5, seed=7, max_tokens=40))
    history = [ChatMessage("user", "Hello")]
    fresh = collect(Engine.load(str(gpt_oss_path)).stream(Conversation(history, seeded)))
    model, tokenizer = load_model(str(gpt_oss_path))
    counted = _Counted(model)
    warmed = Engine(counted, tokenizer, "warmed")
    warmed.warmup(seeded.model_copy(update={"max_context_tokens": 256}))  # the least allowed
    fed = [n for n, _ in counted.calls]
    assert fed.count(1) >= 12  # four answers
    assert max(fed) > 64 and 1 < min(n for n in fed if n > 1) < 16
    assert any(n >= 16 and cached > 128 for n, cached in counted.calls)
    again = collect(warmed.stream(Conversation(history, seeded)))
    assert again.stats.cached_tokens == 0
    assert again.tokens == fresh.tokens


@pytest.mark.parametrize("fixture", ["engine", "chatml_engine"])
@pytest.mark.heavy
def test_end_of_turn_probability_is_the_models_own_and_leaves_the_cache_exact(
    fixture: str, request
) -> None:
    """The chat model's text signal for turn-taking: the probability of the token that
    closes the user's message, after its words — the same number a plain forward pass
    over the whole prompt gives — and the turn answered afterwards is unchanged."""
    from datetime import datetime

    engine: Engine = request.getfixturevalue(fixture)
    now = datetime(2026, 11, 25, 12, 0)
    question = "What is the capital of France?"
    p_partial = None
    for n in (3, 6):  # the transcript as it grows (the prefill having caught up)
        partial = Conversation(
            [ChatMessage("user", " ".join(question.split()[:n]))], GREEDY, now=now
        )
        engine.prefill(partial)
        p = engine.end_of_turn_probability(partial)
        tokens = engine._render(GREEDY, partial.history, now, [])
        ends = engine._render(
            GREEDY, [ChatMessage("user", f"{partial.history[0].content} x")], now, []
        )
        k = next(i for i, (a, b) in enumerate(zip(tokens, ends, strict=False)) if a != b)
        logits = engine.model(mx.array(tokens[:k])[None])[0, -1].astype(mx.float32)
        assert p == pytest.approx(mx.softmax(logits)[tokens[k]].item(), rel=1e-3, abs=1e-6)
        p_partial = p if n == 3 else p_partial
    assert p_partial is not None and 0 <= p_partial <= 1
    done = collect(engine.stream(Conversation([ChatMessage("user", question)], GREEDY, now=now)))
    engine.reset()
    fresh = collect(engine.stream(Conversation([ChatMessage("user", question)], GREEDY, now=now)))
    assert done.tokens == fresh.tokens
    assert engine.end_of_turn_probability(Conversation([], GREEDY, now=now)) is None


def test_a_gpt_oss_model_answers_without_its_tokenizer_files(gpt_oss_path, tmp_path) -> None:
    """openai-harmony's encoding renders and reads GPT-OSS's tokens: mlx-lm's tokenizer
    (27 MB of JSON, seconds of every start) is not loaded until something asks for it."""
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(gpt_oss_path / name)
    engine = Engine.load(str(tmp_path))
    turn = collect(engine.stream(Conversation([ChatMessage("user", "Hello")], GREEDY)))
    assert turn.messages[-1].content == turn_of("Hello").final
    with pytest.raises(ConfigError, match=f"model {tmp_path}: cannot load"):
        engine.tokenizer  # noqa: B018 (the property loads it)
