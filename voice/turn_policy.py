"""When a pause is the end of the turn: the signals fused into one probability, and the
policy that acts on it.

Pure functions, shared by the turn machine (`voice.turns`) and the benchmark that measures
them (`bench.turns`), so what is measured is what runs.

- The acoustic signal: Smart Turn's probability that the voice sounds finished.
- The text signal: the chat model's probability that the user's message ends after the
  words heard (read from the prefill's logits), where the engine offers it.
- Hold words: a transcript that ends on a word that cannot end a sentence ("and", "um",
  "the") holds the turn whatever the voice sounds like: speech synthesis and tired
  speakers alike let the pitch fall before "and…", which fools the acoustic model.

They are combined in log-odds: `logit(p) = bias + Σ weight·logit(signal)` over the signals
present; a hold word forces 0. The policy ends the turn once the silence is at least
`min_wait` and the fused probability reaches `threshold`, and always at `max_wait` (the
silence rule, which is also all there is when no signal is available).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

# Words that do not end an English sentence: conjunctions, articles and possessives, and
# fillers. Kept short on purpose: prepositions end many questions ("what is it for?"),
# and "that" or "so" end many statements.
HOLD_WORDS = (
    "and", "or", "but", "because", "if", "whether", "although", "unless", "than",
    "the", "a", "an", "my", "your", "our", "their", "of",
    "um", "uh", "erm", "er", "uhm", "hmm",
)  # fmt: skip

_EPS = 1e-4


def logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def last_word(text: str) -> str:
    words = re.findall(r"[a-z']+", text.lower().replace("\u2019", "'"))
    return words[-1] if words else ""


def ends_unfinished(text: str, hold_words: Iterable[str]) -> bool:
    """Whether `text` stops on a word that cannot end a sentence (or trails off: "…")."""
    stripped = text.rstrip()
    if stripped.endswith(("...", "\u2026", ",", "-")):
        return True
    return last_word(stripped) in set(hold_words)


@dataclass(frozen=True)
class Fusion:
    acoustic_weight: float = 1.0
    text_weight: float = 0.0
    bias: float = 0.0
    hold_words: tuple[str, ...] = HOLD_WORDS

    def probability(
        self, acoustic: float | None, text: float | None, transcript: str | None
    ) -> float | None:
        """The fused end-of-turn probability, or None when no signal is available."""
        if transcript and self.hold_words and ends_unfinished(transcript, self.hold_words):
            return 0.0
        terms = []
        if acoustic is not None and self.acoustic_weight:
            terms.append(self.acoustic_weight * logit(acoustic))
        if text is not None and self.text_weight:
            terms.append(self.text_weight * logit(text))
        if not terms:
            return None
        return sigmoid(self.bias + sum(terms))


@dataclass(frozen=True)
class Policy:
    """threshold / min_wait / max_wait: eot-bench's threshold / action delay / timeout."""

    threshold: float
    min_wait_s: float
    max_wait_s: float

    def decide(self, silence_s: float, fused: float | None) -> bool:
        """Whether a pause of `silence_s` so far, with this fused probability, ends the turn."""
        if silence_s >= self.max_wait_s:
            return True
        return fused is not None and silence_s >= self.min_wait_s and fused >= self.threshold
