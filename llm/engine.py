"""The chat engine: one loaded model, one conversation cache, turns streamed as events.

Generation is mlx-lm's `generate_step` on the model's own KV cache; the prompt format is
Harmony for GPT-OSS and the tokenizer's chat template for everything else. The engine
knows nothing of terminals, audio or HTTP: callers iterate `Engine.stream` and decide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import (
    DEFAULT_ALLOW_PATTERNS,
    load_tokenizer,
    maybe_set_recommended_wired_limit,
    snapshot_download,
)
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_harmony.llm.chat_template import ChatTemplateFormat
from mlx_harmony.llm.config import PromptConfig, SamplingParams
from mlx_harmony.llm.conversation import Conversation
from mlx_harmony.llm.debug_log import DebugLog
from mlx_harmony.llm.errors import ConfigError, RuntimeFailure
from mlx_harmony.llm.harmony import HarmonyFormat
from mlx_harmony.llm.messages import (
    ChatMessage,
    Event,
    FinishReason,
    GenerationStats,
    MessageDone,
    ReplyStart,
    TextDelta,
    Tool,
    TurnDone,
)
from mlx_harmony.llm.prompt_cache import ConversationCache, common_prefix
from mlx_harmony.llm.sampling import (
    Seeder,
    build_logits_processors,
    build_penalty_processors,
    build_sampler,
)

# mlx-lm's tokenizer, or how to load it when first asked for.
TokenizerSource = TokenizerWrapper | Callable[[], TokenizerWrapper]


def load_model(ref: str, *, lazy: bool = False) -> tuple[Any, TokenizerSource]:
    """Load a model from a local folder or a Hugging Face repo id, through mlx-lm.

    A GPT-OSS model's tokenizer is not loaded here but when first asked for (only the
    benchmark's plain mlx-lm peer does): openai-harmony's encoding renders and reads its
    tokens, and mlx-lm's load of its 27 MB tokenizer.json (parsed three times) took seconds
    of every start, on a CPU as long as the rest of the load."""
    local = Path(ref).expanduser()
    looks_local = ref.startswith(("/", ".", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        what = "does not exist" if not local.exists() else "has no config.json"
        raise ConfigError(f"model {ref}: folder {what}")
    try:
        # What mlx-lm's `load` fetches: the weights and every tokenizer file, for later.
        path = (
            local
            if looks_local
            else Path(snapshot_download(ref, allow_patterns=DEFAULT_ALLOW_PATTERNS))
        )
        model, config = mlx_lm_load_model(path, lazy)
    except (OSError, ValueError) as e:
        raise _cannot_load(ref, e) from e

    def tokenizer() -> TokenizerWrapper:
        try:
            return load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
        except (OSError, ValueError) as e:
            raise _cannot_load(ref, e) from e

    return model, tokenizer if getattr(model, "model_type", None) == "gpt_oss" else tokenizer()


def _cannot_load(ref: str, e: Exception) -> ConfigError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(f"model {ref}: cannot load ({first})")


# Tokens per prefill chunk (mlx-lm's default prefill_step_size).
PREFILL_STEP = 2048
# Spoken (prefilled word by word), then typed (one chunk), the conversation past GPT-OSS's
# 128-token sliding window by then: what Engine.warmup runs.
WARMUP_SPOKEN = (
    "Hello, can you hear me?",
    "I would like to plan a short walk in the park this afternoon before it gets dark, "
    "and then cook something simple for dinner with what is left in the kitchen.",
)
WARMUP_TYPED = (
    "Please suggest a route of about five kilometres with a bench halfway, and a recipe "
    "with rice, two eggs, an onion and some frozen peas that takes twenty minutes at most.",
    "Thank you. And if it rains, which museum or covered market nearby would be a good "
    "place to walk instead, and is it open on a Sunday afternoon?",
)


@dataclass
class _Clock:
    start: float
    first_token: float | None = None
    first_final: float | None = None
    last_token: float | None = None

    def since(self, t: float | None) -> float | None:
        return None if t is None else t - self.start


class Engine:
    def __init__(self, model: Any, tokenizer: TokenizerSource, model_id: str) -> None:
        self.model = model
        self._tokenizer = tokenizer
        self.model_id = model_id
        harmony = getattr(model, "model_type", None) == "gpt_oss"
        self.format = HarmonyFormat() if harmony else ChatTemplateFormat(self.tokenizer)
        self._cache = ConversationCache(model)
        self._seeder = Seeder()
        self.debug: DebugLog | None = None
        # XTC never cuts these (as the original tool did): the tokens that end a message or
        # a turn, and the newline that shapes the answer.
        self.xtc_protected = sorted({*self.format.structure_tokens, *self.format.newline_tokens})

    @property
    def tokenizer(self) -> TokenizerWrapper:
        """mlx-lm's tokenizer (a GPT-OSS model's is loaded on first use: `load_model`)."""
        if not isinstance(self._tokenizer, TokenizerWrapper):
            self._tokenizer = self._tokenizer()
        return self._tokenizer

    @classmethod
    def load(cls, ref: str, *, lazy: bool = False) -> Engine:
        model, tokenizer = load_model(ref, lazy=lazy)
        # On Apple silicon, keep the model's memory wired as mlx-lm does while it
        # generates (`wired_limit`); set once for the process here, since the engine lives
        # as long as the command does (a no-op where the device recommends no size).
        maybe_set_recommended_wired_limit()
        return cls(model, tokenizer, ref)

    @property
    def harmony(self) -> bool:
        return self.format.harmony

    def reset(self) -> None:
        """Forget the cached conversation (a new chat starts from an empty cache)."""
        self._cache.reset()

    def render(
        self,
        history: Sequence[ChatMessage],
        prompt: PromptConfig,
        max_tokens: int = 0,
        now: datetime | None = None,
        tools: Sequence[Tool] = (),
    ) -> list[int]:
        """The prompt's token ids, the oldest exchanges dropped (each: everything up to the
        next user message) as far as needed to fit `max_context_tokens`."""
        history = list(history)
        tokens = self._render(prompt, history, now, tools)
        limit = prompt.max_context_tokens
        if not limit or len(tokens) + max_tokens <= limit:
            return tokens
        users = [i for i, m in enumerate(history) if m.role == "user"]

        def fits(drop: int) -> list[int] | None:
            kept = self._render(prompt, history[users[drop] :], now, tools)
            return kept if len(kept) + max_tokens <= limit else None

        # Fewer exchanges never render longer, so the fewest to drop is found by bisection:
        # a few renders instead of one per dropped exchange (quadratic on long chats).
        low, high = 1, len(users) - 1  # dropping all but the last exchange is the most
        best = fits(high) if high >= 1 else None
        if best is None:
            raise ConfigError(
                f"max_context_tokens={limit}: the prompt needs {len(tokens)} tokens "
                f"plus max_tokens={max_tokens}; raise the limit or shorten the message"
            )
        while low < high:
            mid = (low + high) // 2
            if (kept := fits(mid)) is not None:
                best, high = kept, mid
            else:
                low = mid + 1
        return best

    def prompt_size(self, conversation: Conversation) -> int:
        c = conversation
        return len(self.render(c.history, c.prompt, 0, c.now, c.tools))

    def _render(
        self,
        prompt: PromptConfig,
        history: list[ChatMessage],
        now: datetime | None,
        tools: Sequence[Tool],
    ) -> list[int]:
        try:
            return self.format.render(prompt, history, now, tools)
        except (ValueError, TypeError, RuntimeError) as e:  # HarmonyError is a RuntimeError
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"cannot render the conversation: {first}") from e

    @property
    def vocab_size(self) -> int:
        args = getattr(self.model, "args", None)
        return getattr(args, "vocab_size", None) or len(self.tokenizer.vocab)

    def stream(
        self,
        conversation: Conversation,
        sampling: SamplingParams | None = None,
        should_stop: Callable[[], bool] | None = None,
        start: ReplyStart | None = None,
    ) -> Iterator[Event]:
        """Generate the assistant's turn after the conversation, yielding events as tokens
        arrive; `sampling` replaces the prompt config's own.

        `should_stop` is polled after every token; returning True ends the turn with
        finish_reason "cancelled" (Ctrl-C in the chat, barge-in in voice mode).
        `start` forces how the reply begins (the answer at once, or a call), rendered by
        the model's format.
        """
        history, prompt, now, tools = (
            conversation.history, conversation.prompt, conversation.now, conversation.tools
        )  # fmt: skip
        sampling = sampling or prompt.sampling
        if sampling.top_k >= self.vocab_size:
            # Keeping every token is no top-k at all (mlx-lm refuses k ≥ vocabulary).
            sampling = sampling.model_copy(update={"top_k": 0})
        bad = [t for t in sampling.logit_bias if not 0 <= t < self.vocab_size]
        if bad:
            raise ConfigError(
                f"logit_bias: token id {bad[0]} is outside the vocabulary", field="logit_bias"
            )
        prompt_tokens = self.render(history, prompt, sampling.max_tokens, now, tools)
        forced = self.format.reply_start(start) if start is not None else []
        prompt_tokens += forced
        if prompt_tokens and (top := max(prompt_tokens)) >= self.vocab_size:
            # The repetition penalty scatters into the logits at these ids; MLX does not
            # bounds-check, so an id past the model's vocabulary would corrupt memory.
            raise RuntimeFailure(
                f"the tokenizer made token id {top}, but the model has {self.vocab_size}"
                " tokens: the tokenizer does not match the weights"
            )
        clock = _Clock(time.perf_counter())
        mx.reset_peak_memory()
        cached = self._prefill(prompt_tokens)

        self._seeder.before_turn(sampling)
        stops = self.format.stop_tokens
        steps = generate_step(
            mx.array(prompt_tokens[-1:]),
            self.model,
            max_tokens=sampling.max_tokens,
            sampler=build_sampler(sampling, self.xtc_protected),
            logits_processors=[
                *build_logits_processors(sampling, prompt_tokens[:-1]),
                *build_penalty_processors(sampling, prompt_fed=1),
            ],
            prompt_cache=self._cache.cache,
        )
        decoder = self.format.decoder()
        done: list[ChatMessage] = []
        for token in forced:
            for event in decoder.feed(token):
                yield self._track(event, clock, done)
        finish: FinishReason = "length"
        generated: list[int] = []
        reasoning = 0
        try:
            for token, _ in steps:
                if not generated:  # the model has now consumed the last prompt token
                    self._cache.tokens.append(prompt_tokens[-1])
                self._cache.tokens.append(token)
                generated.append(token)
                clock.last_token = time.perf_counter()
                clock.first_token = clock.first_token or clock.last_token
                for event in decoder.feed(token):
                    yield self._track(event, clock, done)
                reasoning += decoder.reasoning
                if token in stops:
                    finish = "tool_call" if token in self.format.call_tokens else "stop"
                    break
                if should_stop is not None and should_stop():
                    finish = "cancelled"
                    break
        except GeneratorExit:
            # The consumer stopped listening at a yield: the cache matches its tokens.
            raise
        except BaseException:
            # Interrupted inside a model step: the live cache may hold a token that
            # `tokens` does not. The checkpoint is still exact. generate_step has already
            # queued the next step on that cache: let it finish before the cache is dropped.
            mx.synchronize(generation_stream)
            self._cache.drop_live()
            raise
        finally:
            steps.close()
            # generate_step leaves the last step's cache update pending on this thread's
            # stream; finish it here, so that another thread can continue the conversation.
            mx.eval([c.state for c in self._cache.cache])
        for event in decoder.finish():
            yield self._track(event, clock, done)
        # The turn's time ends with its last token, as mlx-lm counts it: the step
        # generate_step had already queued after it (waited for above) is not the answer's.
        end = clock.last_token or time.perf_counter()
        stats = GenerationStats(
            prompt_tokens=len(prompt_tokens),
            cached_tokens=cached,
            generated_tokens=len(generated),
            time_to_first_token=(clock.first_token or end) - clock.start,
            time_to_first_final=clock.since(clock.first_final),
            total_seconds=end - clock.start,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            reasoning_tokens=reasoning,
        )
        if self.debug is not None:
            self.debug.write(prompt_tokens, generated, self.format.decode, self.model_id)
        yield TurnDone(finish, tuple(done), tuple(generated), stats)

    def warmup(self, prompt: PromptConfig) -> bool:
        """Run a throwaway conversation through the real path, then forget it.

        MLX compiles kernels at their first use, one per kind of work and shape: on an NVIDIA
        GPU a fresh machine's first turns took minutes at gpt-oss-20b's shape, and a fresh
        process's first chunks still up to a second each. Run at start-up, so that the
        user's first question is not what pays. What a spoken conversation does: the
        prompt prefilled in one chunk, questions prefilled word by word while they are
        said, a few answer tokens, typed questions fed whole, the last once GPT-OSS's
        sliding-window layers have wrapped.
        """
        # No seed here: a seeded conversation still starts from its seed (Seeder re-seeds
        # when the seed changes).
        sampling = prompt.sampling.model_copy(update={"max_tokens": 4, "seed": None})
        # Its four questions are longer than the shortest context a user may set.
        prompt = prompt.model_copy(update={"max_context_tokens": None})
        history: list[ChatMessage] = []
        for question in (*WARMUP_SPOKEN, *WARMUP_TYPED):
            if question in WARMUP_SPOKEN:
                words = question.split()
                for n in range(2, len(words) + 1, 3):
                    said = [*history, ChatMessage("user", " ".join(words[:n]))]
                    for _ in self.prefill_steps(Conversation(said, prompt)):
                        pass
            history.append(ChatMessage("user", question))
            done = collect(self.stream(Conversation(history, prompt), sampling))
            history += done.messages
        self.reset()
        return True

    def prefill(self, conversation: Conversation) -> int:
        """Prefill what is already certain of a turn whose last message is still growing
        (a user still speaking, transcribed word by word); return the tokens now cached.

        The last word is left out (it may still grow), and so is whatever the renderer puts
        after the message; a later `stream` with the same `now` then feeds only the rest.
        """
        for _ in self.prefill_steps(conversation):
            pass
        return len(self._cache.tokens)

    def prefill_steps(self, conversation: Conversation, step: int = PREFILL_STEP) -> Iterator[int]:
        """`prefill` as a generator the caller drives: each `next()` feeds at most `step`
        tokens and yields the tokens now cached, so a caller with other work to keep up
        (a microphone to drain) is never held for a whole long prompt. Left unfinished,
        the cache stays consistent: a later turn reuses what was fed."""
        history, prompt, now, tools = (
            conversation.history, conversation.prompt, conversation.now, conversation.tools
        )  # fmt: skip
        if not history:
            return
        last = history[-1]
        words = last.content.rstrip().rsplit(maxsplit=1)
        if len(words) < 2:
            return
        head = [*history[:-1], replace(last, content=words[0])]
        # What stays the same whatever follows the certain words: render two continuations.
        a = self._render(prompt, head, now, tools)
        b = self._render(prompt, [*head[:-1], replace(last, content=f"{words[0]} x")], now, tools)
        yield from self._fill(a[: common_prefix(a, b)], step)

    def end_of_turn_probability(self, conversation: Conversation) -> float | None:
        """The model's probability that the user's last message ends where it does: of the
        token that closes it in the rendered prompt (`<|end|>` in Harmony, the template's
        end-of-turn token otherwise), after its last word. A turn-taking signal read from
        logits the prefill nearly computes anyway: only the tokens past the cache are run,
        and the cache's checkpoint is left as it was (the live cache is trimmed back by the
        next prefill)."""
        history = conversation.history
        if not history or history[-1].role != "user" or not history[-1].content.strip():
            return None
        last = replace(history[-1], content=history[-1].content.rstrip())
        prompt, now, tools = conversation.prompt, conversation.now, conversation.tools
        a = self._render(prompt, [*history[:-1], last], now, tools)
        b = self._render(
            prompt, [*history[:-1], replace(last, content=f"{last.content} x")], now, tools
        )
        n = common_prefix(a, b)
        if n == 0 or n >= len(a):
            return None
        cached = self._cache.reuse(a[:n])  # keeps the last token back: its logits are needed
        with mx.stream(generation_stream):
            logits = self.model(mx.array(a[cached:n])[None], cache=self._cache.cache)[0, -1]
            p = mx.softmax(logits.astype(mx.float32))[a[n]]
            mx.eval(p, [c.state for c in self._cache.cache])
        self._cache.tokens += a[cached:n]
        return float(p.item())

    def mark(self) -> object:
        """The conversation's cache as it is now, for `rollback` after a turn that is then
        dropped (a speculative answer the user talked over): what was prefilled before it
        is kept, not fed again."""
        return self._cache.saved()

    def rollback(self, mark: object) -> None:
        self._cache.restore(mark)  # type: ignore[arg-type]

    def _prefill(self, prompt_tokens: list[int]) -> int:
        """Feed all but the last prompt token into the cache; return how many were reused."""
        return self._cache_upto(prompt_tokens[:-1])

    def _cache_upto(self, tokens: list[int]) -> int:
        """Make the cache hold exactly `tokens`, reusing what it can, and checkpoint there;
        return how many were reused."""
        steps = self._fill(tokens, PREFILL_STEP)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def _fill(self, tokens: list[int], step: int) -> Generator[int, None, int]:
        """`_cache_upto` one chunk of at most `step` tokens per `next()` (yielding the
        tokens cached); its return value is how many were reused."""
        cached = self._cache.reuse([*tokens, -1])  # reuse() keeps a prompt's last token back
        fill = tokens[cached:]
        # generate_step's own prefill loop, without the token it always samples after it:
        # the logits are never evaluated, so the vocabulary head is not computed.
        for i in range(0, len(fill), step):
            chunk = fill[i : i + step]
            with mx.stream(generation_stream):
                self.model(mx.array(chunk)[None], cache=self._cache.cache)
                mx.eval([c.state for c in self._cache.cache])
            self._cache.tokens += chunk
            if i + step < len(fill):
                yield len(self._cache.tokens)
        self._cache.checkpoint()
        yield len(self._cache.tokens)
        return cached

    @staticmethod
    def _track(event: Event, clock: _Clock, done: list[ChatMessage]) -> Event:
        if isinstance(event, TextDelta) and event.kind == "answer":
            clock.first_final = clock.first_final or time.perf_counter()
        elif isinstance(event, MessageDone):
            done.append(event.message)
        return event


def collect(events: Iterator[Event]) -> TurnDone:
    """Run a turn to its end and return its summary (for one-shot callers and tests)."""
    *_, last = events
    assert isinstance(last, TurnDone)
    return last
