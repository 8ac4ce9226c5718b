"""Each sampling parameter has the effect it must have.

The sampler-level tests draw many samples from a known distribution (fixed seed), so a
parameter that were dropped on the way to mlx-lm would change the counts; the engine-level
tests check the parameters that act on the conversation (seed, bias, penalties, limits).
"""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import pytest

from mlx_harmony.llm.config import PromptConfig, SamplingParams
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.engine import Engine, collect
from mlx_harmony.llm.messages import ChatMessage
from mlx_harmony.llm.sampling import build_logits_processors, build_sampler

# Five tokens with probabilities 0.5, 0.25, 0.15, 0.07, 0.03.
PROBS = mx.array([[0.5, 0.25, 0.15, 0.07, 0.03]])
LOGPROBS = mx.log(PROBS)


def draw(params: SamplingParams, n: int = 400, seed: int = 0) -> Counter[int]:
    mx.random.seed(seed)
    sampler = build_sampler(params)
    return Counter(int(sampler(LOGPROBS).item()) for _ in range(n))


def test_temperature_zero_is_greedy() -> None:
    assert draw(SamplingParams(temperature=0)) == Counter({0: 400})


def test_temperature_spreads_and_sharpens() -> None:
    normal = draw(SamplingParams(temperature=1.0))
    hot = draw(SamplingParams(temperature=3.0))
    cold = draw(SamplingParams(temperature=0.3))
    assert len(normal) >= 4
    assert hot[0] < normal[0] < cold[0]


def test_top_k_keeps_k_best() -> None:
    assert set(draw(SamplingParams(top_k=2))) == {0, 1}


def test_top_p_keeps_the_nucleus() -> None:
    # 0.5 + 0.25 = 0.75 ≥ 0.7: the two best tokens make the nucleus.
    assert set(draw(SamplingParams(top_p=0.7))) == {0, 1}
    assert len(draw(SamplingParams(top_p=1.0))) >= 4  # 1.0 means off


def test_min_p_and_min_tokens_to_keep() -> None:
    # min_p 0.4 keeps tokens with p ≥ 0.4 * 0.5 = 0.2: tokens 0 and 1.
    assert set(draw(SamplingParams(min_p=0.4))) == {0, 1}
    assert set(draw(SamplingParams(min_p=0.99, min_tokens_to_keep=3))) == {0, 1, 2}


def test_xtc_excludes_top_choices() -> None:
    # Every token above the threshold but the least likely of them is cut.
    counts = draw(SamplingParams(xtc_probability=1.0, xtc_threshold=0.1))
    assert counts[0] == 0 and counts[1] == 0 and counts[2] > 0
    assert draw(SamplingParams(xtc_probability=0.0, xtc_threshold=0.1))[0] > 0


def test_xtc_never_cuts_stop_tokens() -> None:
    mx.random.seed(0)
    sampler = build_sampler(
        SamplingParams(xtc_probability=1.0, xtc_threshold=0.1), special_tokens=[0]
    )
    assert any(int(sampler(LOGPROBS).item()) == 0 for _ in range(200))


def test_same_seed_same_draws() -> None:
    params = SamplingParams(temperature=1.0)
    assert draw(params, seed=7) == draw(params, seed=7)
    assert draw(params, seed=7) != draw(params, seed=8)


def test_logit_bias_forces_a_token() -> None:
    (proc,) = build_logits_processors(SamplingParams(logit_bias={4: 100.0}))
    out = proc(mx.array([1, 2]), mx.log(PROBS))
    assert int(mx.argmax(out).item()) == 4


def test_repetition_penalty_sees_the_prompt_tail() -> None:
    params = SamplingParams(repetition_penalty=10.0, repetition_context_size=4)
    # Ids stay inside the five-token vocabulary: MLX scatters without bounds checks, and
    # an id past the end corrupted the heap (the suite's intermittent native crash).
    (with_prompt,) = build_logits_processors(params, prompt_tail=[4, 4, 0])
    (without,) = build_logits_processors(params)
    generated = mx.array([3], dtype=mx.int32)
    # mlx-lm's penalty writes into the logits it is given: each call gets its own.
    assert int(mx.argmax(without(generated, mx.log(PROBS))).item()) == 0
    # Token 0 appeared in the prompt tail: penalised, so token 1 wins.
    assert int(mx.argmax(with_prompt(generated, mx.log(PROBS))).item()) == 1


# ------------------------------------------------------------------ on the engine

HOT = SamplingParams(temperature=5.0, max_tokens=12)
USER = [ChatMessage("user", "What is the capital of France?")]


def run(engine: Engine, sampling: SamplingParams) -> tuple[int, ...]:
    return collect(engine.stream(Conversation(USER, PromptConfig(sampling=sampling)))).tokens


def test_seed_makes_sampled_turns_repeatable(engine: Engine) -> None:
    seeded = HOT.model_copy(update={"seed": 3})
    first = run(engine, seeded)
    engine.reset()
    seeded_again = HOT.model_copy(update={"seed": 3})
    assert run(Engine(engine.model, engine.tokenizer, "b"), seeded_again) == first
    assert (
        run(Engine(engine.model, engine.tokenizer, "c"), HOT.model_copy(update={"seed": 4}))
        != first
    )


def test_reseed_each_turn(engine: Engine) -> None:
    once = HOT.model_copy(update={"seed": 5})
    each = HOT.model_copy(update={"seed": 5, "reseed_each_turn": True})
    e1 = Engine(engine.model, engine.tokenizer, "once")
    assert run(e1, once) != run(e1, once)  # the generator runs on between turns
    e2 = Engine(engine.model, engine.tokenizer, "each")
    assert run(e2, each) == run(e2, each)


def test_negative_seed_means_random() -> None:
    assert SamplingParams(seed=-1).seed is None


def test_repetition_penalty_changes_greedy_text(engine: Engine) -> None:
    plain = SamplingParams(temperature=0, max_tokens=40)
    penalised = plain.model_copy(update={"repetition_penalty": 50.0, "repetition_context_size": 64})
    assert run(engine, plain) != run(engine, penalised)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("min_p", 2),
        ("top_k", -1),
        ("max_tokens", 0),
        ("xtc_threshold", 0.9),
        ("repetition_penalty", 0),
    ],
)
def test_invalid_values_are_rejected(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_top_k_beyond_the_vocabulary_means_no_limit(engine: Engine) -> None:
    # mlx-lm refuses k ≥ vocabulary size; the engine treats it as "keep every token".
    seeded = SamplingParams(temperature=1.0, seed=9, max_tokens=6)
    huge = seeded.model_copy(update={"top_k": 10**9})
    assert run(Engine(engine.model, engine.tokenizer, "a"), huge) == run(
        Engine(engine.model, engine.tokenizer, "b"), seeded
    )


def test_presence_and_frequency_penalties_count_the_answer_only() -> None:
    """OpenAI's additive penalties: once per token the answer holds (presence), once per
    occurrence (frequency); the prompt's token handed to generate_step is not counted."""
    import mlx.core as mx

    from mlx_harmony.llm.config import SamplingParams
    from mlx_harmony.llm.sampling import build_penalty_processors

    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    logits = mx.zeros((1, 8))
    for proc in build_penalty_processors(params, prompt_fed=1):
        logits = proc(mx.array([7, 3, 3, 5]), logits)  # 7 is the prompt's last token
    assert logits.tolist()[0] == [0, 0, 0, -1.0, 0, -0.75, 0, 0]
    assert build_penalty_processors(SamplingParams(), prompt_fed=1) == []
