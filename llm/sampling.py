"""SamplingParams → mlx-lm's sampler and logits processors."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
from mlx_lm.sample_utils import LogitsProcessor, Sampler, make_logits_processors, make_sampler

from mlx_harmony.llm.config import SamplingParams


def build_sampler(params: SamplingParams, special_tokens: Sequence[int] = ()) -> Sampler:
    return make_sampler(
        temp=params.temperature,
        top_p=params.top_p if params.top_p < 1 else 0.0,
        min_p=params.min_p,
        min_tokens_to_keep=params.min_tokens_to_keep,
        top_k=params.top_k,
        xtc_probability=params.xtc_probability,
        xtc_threshold=params.xtc_threshold,
        # XTC must never cut the tokens that shape the answer (ends, newline).
        xtc_special_tokens=[*special_tokens, *(params.xtc_special_tokens or [])],
    )


def build_logits_processors(
    params: SamplingParams, prompt_tail: Sequence[int] = ()
) -> list[LogitsProcessor]:
    """Logit bias and repetition penalty, seeing the prompt's last tokens as context.

    mlx-lm's processors only see the tokens handed to `generate_step`; with a reused KV
    cache that is just the uncached suffix, so the penalty would forget what the user
    just said. Each processor is given the prompt's tail in front of those tokens.
    """
    processors = make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1 else None,
        repetition_context_size=params.repetition_context_size,
    )
    if not prompt_tail or params.repetition_penalty == 1:
        return processors
    tail = mx.array(list(prompt_tail)[-params.repetition_context_size :])

    def with_context(proc: LogitsProcessor) -> LogitsProcessor:
        return lambda tokens, logits: proc(mx.concatenate([tail, tokens]), logits)

    return [with_context(p) for p in processors]


def build_penalty_processors(params: SamplingParams, prompt_fed: int) -> list[LogitsProcessor]:
    """OpenAI's presence and frequency penalties, over everything generated so far (the
    context size is the answer's whole length) and never the prompt: the first
    `prompt_fed` tokens `generate_step` hands the processors are the prompt's."""
    processors = make_logits_processors(
        presence_penalty=params.presence_penalty or None,
        presence_context_size=params.max_tokens,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=params.max_tokens,
    )

    def generated_only(proc: LogitsProcessor) -> LogitsProcessor:
        def apply(tokens: mx.array, logits: mx.array) -> mx.array:
            return proc(tokens[prompt_fed:], logits) if tokens.size > prompt_fed else logits

        return apply

    return [generated_only(p) for p in processors]


class Seeder:
    """Seeds MLX's generator: once per engine, or before every turn if asked."""

    def __init__(self) -> None:
        self._seeded: int | None = None

    def before_turn(self, params: SamplingParams) -> None:
        if params.seed is None:
            self._seeded = None
            return
        if params.reseed_each_turn or self._seeded != params.seed:
            mx.random.seed(params.seed)
            self._seeded = params.seed
