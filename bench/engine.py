"""Engine benchmarks: the question set through the engine and through plain mlx-lm.

Both sides get the same prompt token ids (the engine's own rendering) and greedy sampling,
so the ratios compare the generation machinery, not the prompts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_harmony.llm.config import PromptConfig, SamplingParams
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.engine import Engine, collect
from mlx_harmony.llm.messages import ChatMessage


@dataclass
class TurnRecord:
    """One prompt through one side. Times in seconds, rates in tokens per second."""

    side: str  # "engine" or "mlx-lm"
    index: int
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    prefill_tps: float
    ttft: float
    time_to_first_final: float | None
    decode_tps: float
    peak_memory_gb: float

    def row(self) -> dict:
        return asdict(self)


def engine_turn(
    engine: Engine,
    prompt: PromptConfig,
    history: list[ChatMessage],
    index: int,
    now: datetime | None = None,
) -> tuple[TurnRecord, list[ChatMessage]]:
    done = collect(engine.stream(Conversation(history, prompt, now=now)))
    s = done.stats
    record = TurnRecord(
        "engine", index, s.prompt_tokens, s.cached_tokens, s.generated_tokens, s.prefill_tps,
        s.time_to_first_token, s.time_to_first_final, s.decode_tps, s.peak_memory_gb,
    )  # fmt: skip
    return record, list(done.messages)


def peer_turn(
    engine: Engine, tokens: list[int], max_tokens: int, index: int, bias: dict[int, float]
) -> TurnRecord:
    """The same prompt through `mlx_lm.stream_generate` on the same model object."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = last_at = None
    last = None
    processors = make_logits_processors(logit_bias=bias) if bias else None
    for response in stream_generate(
        engine.model, engine.tokenizer, tokens, max_tokens=max_tokens,
        sampler=make_sampler(0.0), logits_processors=processors,
    ):  # fmt: skip
        last_at = time.perf_counter()
        first = first or last_at
        last = response
    assert last is not None and first is not None and last_at is not None
    # The decode rate as the engine's: tokens after the first over the time after it
    # (mlx-lm's own generation_tps counts the first token too, over the same time).
    after = last_at - first
    decode_tps = (last.generation_tokens - 1) / after if after > 0 else 0.0
    return TurnRecord(
        "mlx-lm", index, last.prompt_tokens, 0, last.generation_tokens, last.prompt_tps,
        first - start, None, decode_tps, last.peak_memory,
    )  # fmt: skip


def greedy_prompt(max_tokens: int, bias: dict[int, float]) -> PromptConfig:
    return PromptConfig(
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens, logit_bias=bias)
    )


def single_turns(
    engine: Engine, questions: list[str], max_tokens: int, bias: dict[int, float] | None = None
) -> list[TurnRecord]:
    """Each question as a fresh conversation through both sides. `bias` (token id → logit
    bias) applies to both, e.g. to keep random weights from stopping early.

    Every prompt runs once through each side untimed first: MLX compiles kernels for each
    new shape on some backends (CUDA), and whichever side met a length first would pay it.
    Both sides start each turn from an empty buffer cache, and take turns at going first
    (a GPU's clocks and a machine's other work change within a question's pair too).
    """
    bias = bias or {}
    prompt = greedy_prompt(max_tokens, bias)
    records = []
    for i, question in enumerate(questions):
        history = [ChatMessage("user", question)]
        tokens = engine.render(history, prompt, max_tokens)
        order = ("engine", "mlx-lm") if i % 2 == 0 else ("mlx-lm", "engine")
        for timed in (False, True):
            done: dict[str, TurnRecord] = {}
            for side in order:
                # Each side starts with MLX's buffer cache empty: whichever side inherits
                # the other's freed buffers is favoured (on the CPU the engine's first token
                # came 1.5x later than mlx-lm's this way, and even once both started alike).
                mx.clear_cache()
                if side == "engine":
                    engine.reset()
                    done[side] = engine_turn(engine, prompt, history, i)[0]
                else:
                    done[side] = peer_turn(engine, tokens, max_tokens, i, bias)
            if timed:
                records += [done["engine"], done["mlx-lm"]]
    engine.reset()
    return records


def multi_turn(
    engine: Engine,
    questions: list[str],
    turns: int,
    max_tokens: int,
    filler: int,
    bias: dict[int, float] | None = None,
) -> list[TurnRecord]:
    """A conversation of `turns` exchanges, reusing the engine's cache between turns
    ("engine") and starting every turn from an empty cache ("no-reuse").

    `filler` words of context (from all of `questions`) are added to each user message, so
    that the conversation grows past a few thousand tokens even with short answers. Each
    side runs the conversation twice and keeps the second (greedy: the same shapes), so
    that kernel compilation is not counted.
    """
    prompt = greedy_prompt(max_tokens, bias or {})
    words = " ".join(questions).split()
    records = []
    for side in ("engine", "no-reuse"):
        for timed in (False, True):
            engine.reset()
            history: list[ChatMessage] = []
            for i in range(turns):
                context = " ".join(words[i * filler : (i + 1) * filler])
                user = ChatMessage("user", f"{questions[i % len(questions)]}\n\nContext: {context}")
                history.append(user)
                if side == "no-reuse":
                    engine.reset()
                record, messages = engine_turn(engine, prompt, history, i)
                record.side = side
                if timed:
                    records.append(record)
                history += [m for m in messages if m.channel == "final"]
    engine.reset()
    return records


def listening_prefill(
    engine: Engine,
    questions: list[str],
    turns: int,
    max_tokens: int,
    filler: int,
    spoken_words: int = 40,
    bias: dict[int, float] | None = None,
) -> list[TurnRecord]:
    """Time to first token of a spoken turn after `turns - 1` earlier turns, without ("ended")
    and with ("listening") the words prefilled one by one while the user was speaking.

    The prefill calls happen before the clock starts, as they do while the user speaks; the
    clock starts when the whole transcript is known. Each side runs twice, the second timed.
    """
    prompt = greedy_prompt(max_tokens, bias or {})
    words = " ".join(questions).split()
    now = datetime.now()
    spoken = " ".join(words[-spoken_words:])
    records = []
    for side in ("ended", "listening"):
        for timed in (False, True):
            engine.reset()
            history: list[ChatMessage] = []
            for i in range(turns - 1):
                context = " ".join(words[i * filler : (i + 1) * filler])
                history.append(ChatMessage("user", f"{questions[i]}\n\nContext: {context}"))
                _, messages = engine_turn(engine, prompt, history, i, now)
                history += [m for m in messages if m.channel == "final"]
            if side == "listening":
                heard = spoken.split()
                for n in range(1, len(heard) + 1):
                    partial = ChatMessage("user", " ".join(heard[:n]))
                    engine.prefill(Conversation([*history, partial], prompt, now=now))
            record, _ = engine_turn(
                engine, prompt, [*history, ChatMessage("user", spoken)], turns - 1, now
            )
            record.side = side
            if timed:
                records.append(record)
    engine.reset()
    return records
