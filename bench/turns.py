"""End of turn, measured as eot-bench measures it: false cut-offs against waiting time.

    python -m mlx_harmony.bench.turns [--eot-bench PATH] [--language en] [--limit N]
                          [--model PATH] [--json PATH]

Each turn is played causally through each detector: at every silence of at least 100 ms,
every 100 ms into it, the detector scores the audio (and the words) heard so far. The last
silence of a turn is its true end; every earlier one is a pause the assistant must listen
through. A policy — a threshold on the score, a minimum wait before acting on it and a
maximum wait after which the turn ends anyway (`voice.turn_policy.Policy`) — is then swept:
a turn is *cut off* when the policy fires during one of its pauses; its *latency* is how
long the policy waits after the true end. Reported per detector, as eot-bench reports
(LiveKit, `livekit/eot-bench`, Apache-2.0): the lowest cut-off rate at 300 and 600 ms mean
latency, the lowest mean latency at 5% and 10% cut-offs, with the silence rule (score
always 1: the minimum wait alone decides) as the baseline row of the same run, and the
product's default policy.

Data: turns spoken here by espeak-ng (voices and speeds; hesitations of 0.3 to 1.5 s in the
middle of sentences, after "and", "um", "that", inside lists and numbers, and between
sentences), or, with `--eot-bench PATH`, rows of LiveKit's dataset
(`livekit/eot-bench-data`: parquet with `id`, `language`, `audio`, `silence_spans` and
optionally `words`) as downloaded from the hub. Synthetic speech is a weak test of
prosody: espeak lets the pitch fall at every break, so an acoustic model hears "finished"
where a person would not; the real dataset is the measure that counts.

Detectors: `silence` (the baseline), `smart-turn` (the acoustic model alone), `fused` (the
daemon's rule: acoustic + hold words, + the chat model's text signal with `--model`). With
`--model`, the text signal's weight is fitted by logistic regression on the scored points.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_harmony.voice.config import EndpointingSection
from mlx_harmony.voice.smart_turn import RATE
from mlx_harmony.voice.turn_policy import Fusion, Policy, logit

GRID_S = 0.1  # eot-bench's inference interval
MIN_SPAN_S = 0.1  # silences shorter than this are not decision points
MIN_HOLD_S, MAX_HOLD_S = 0.2, 5.0  # eot-bench's filter on mid-turn pauses
MAX_WAIT_S = 3.0  # the longest timeout swept: eot spans are scored this far
TRANSCRIPT_LAG_S = 0.25  # the daemon takes the STT's transcript (a flushed peek) at 250 ms
THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 2)
MIN_WAITS = np.round(np.arange(0.1, 1.51, 0.1), 2)
MAX_WAITS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)

# "|" is a hesitation; its pause length cycles through PAUSES.
SCRIPTS = [
    "What is the weather like in Paris tomorrow?",
    "Set a timer for ten minutes.",
    "Can you tell me | how long it takes to boil an egg?",
    "So I was thinking that | we could go to the beach on Saturday.",
    "Add eggs, milk, and | bread to my shopping list.",
    "Remind me to call my mother and | to book the dentist.",
    "I would like to know um | what time the pharmacy closes.",
    "Play some music by | the Beatles.",
    "What is twenty | five times four?",
    "Turn off the lights in the kitchen. | And lock the front door.",
    "How far is it from Berlin to | Munich by train?",
    "Tell me a joke about | cats.",
    "My flight leaves at | seven thirty in the morning, can you wake me at five?",
    "Who wrote the book | the old man and the sea?",
    "I need a recipe for dinner, | something with chicken and | rice.",
    "Translate good morning into French.",
    "Is it going to rain today? | Should I take an umbrella?",
    "Book a table for | four people at eight.",
    "What's the difference between a crocodile and | an alligator?",
    "Send a message to Anna saying that | I will be late.",
    "Explain how vaccines work.",
    "Can you recommend a good movie? | Something funny.",
    "The meeting is on Tuesday, | no wait, | on Wednesday.",
    "Convert one hundred dollars to | euros.",
    "Um | what's the capital of Australia?",
    "How many calories are in an apple?",
    "Call the plumber because | the sink is leaking again.",
    "Read me the news headlines.",
    "What should I cook tonight if | I only have pasta and | tomatoes?",
    "Spell the word necessary.",
]
VOICES = [("en-us", 150), ("en+f3", 175), ("en-gb", 135), ("en-us+m3", 190)]
PAUSES = (0.3, 0.5, 0.8, 1.1, 1.5)
TAIL_S = MAX_WAIT_S + 0.5


@dataclass
class Turn:
    id: str
    language: str
    audio: np.ndarray  # 16 kHz mono float32
    spans: list[tuple[float, float]]  # silences >= 100 ms; the last is the true end
    words: list[tuple[str, float, float]] = field(default_factory=list)

    def transcript(self, t: float, lag: float) -> str | None:
        if not self.words:
            return None
        return " ".join(w for w, _, end in self.words if end <= t - lag)


# ---------------------------------------------------------------------------- data
def silences(audio: np.ndarray, threshold: float = 1e-3, frame_s: float = 0.01) -> list:
    """Spans of at least MIN_SPAN_S where the 10 ms frame RMS stays below `threshold`,
    after the first speech."""
    n = int(frame_s * RATE)
    frames = audio[: len(audio) // n * n].reshape(-1, n)
    quiet = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) < threshold
    spans, i = [], int(np.argmin(quiet)) if not quiet.all() else len(quiet)
    while i < len(quiet):
        if not quiet[i]:
            i += 1
            continue
        j = i
        while j < len(quiet) and quiet[j]:
            j += 1
        if (j - i) * frame_s >= MIN_SPAN_S:
            spans.append((round(i * frame_s, 3), round(j * frame_s, 3)))
        i = j
    return spans


def _espeak(ssml: str, voice: str, speed: int, folder: Path) -> np.ndarray:
    import soxr

    wav = folder / "turn.wav"
    subprocess.run(
        ["espeak-ng", "-m", "-v", voice, "-s", str(speed), "-w", str(wav), ssml], check=True
    )
    import soundfile

    audio, rate = soundfile.read(str(wav), dtype="float32")
    return soxr.resample(audio, rate, RATE).astype(np.float32)


def synthetic_turns(limit: int | None = None) -> list[Turn]:
    turns, k = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for v, (voice, speed) in enumerate(VOICES):
            for s, script in enumerate(SCRIPTS):
                parts = [p.strip() for p in script.split("|")]
                pauses = [PAUSES[(k + i) % len(PAUSES)] for i in range(len(parts) - 1)]
                k += 1
                ssml = "".join(
                    p + (f' <break time="{int(d * 1000)}ms"/> ' if i < len(pauses) else "")
                    for i, (p, d) in enumerate(zip(parts, [*pauses, 0.0], strict=True))
                )
                audio = _espeak(f"<speak>{ssml}</speak>", voice, speed, Path(tmp))
                start = max(0, _first_sound(audio) - int(0.2 * RATE))
                audio = np.concatenate([audio[start:], np.zeros(int(TAIL_S * RATE), np.float32)])
                spans = silences(audio)
                words = _word_times(parts, pauses, spans)
                turns.append(Turn(f"espeak-{v}-{s}", "en", audio, spans, words))
                if limit and len(turns) >= limit:
                    return turns
    return turns


def _first_sound(audio: np.ndarray) -> int:
    loud = np.flatnonzero(np.abs(audio) > 1e-3)
    return int(loud[0]) if len(loud) else 0


def _word_times(
    parts: list[str], pauses: list[float], spans: list[tuple[float, float]]
) -> list[tuple[str, float, float]]:
    """Word timings: each part's words spread (by length) over the speech between the
    breaks that follow the parts, a break being the first silence at least 90% as long as
    the pause asked for."""
    breaks, after = [], 0.0
    for d in pauses:
        span = next((sp for sp in spans if sp[0] >= after and sp[1] - sp[0] >= 0.9 * d), None)
        if span is None:
            return []
        breaks.append(span)
        after = span[1]
    edges = [0.0, *[x for b in breaks for x in b], spans[-1][0] if spans else 0.0]
    words = []
    for i, part in enumerate(parts):
        begin, end = edges[2 * i], edges[2 * i + 1]
        tokens = part.split()
        sizes = np.cumsum([len(t) + 1 for t in tokens], dtype=float)
        bounds = begin + (end - begin) * np.concatenate([[0.0], sizes / sizes[-1]])
        words += [(t, float(bounds[j]), float(bounds[j + 1])) for j, t in enumerate(tokens)]
    return words


def eot_bench_turns(path: Path, language: str, limit: int | None) -> list[Turn]:
    """Rows of `livekit/eot-bench-data` (one parquet file, or a folder of them)."""
    try:
        import pyarrow.parquet as pq
        import soundfile
        import soxr
    except ImportError as e:
        raise SystemExit(f"--eot-bench needs {e.name}: uv pip install pyarrow soundfile") from None
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"--eot-bench {path}: no parquet files")
    turns = []
    for file in files:
        try:
            rows = pq.read_table(file).to_pylist()
        except Exception as e:  # pyarrow's errors name the problem; no traceback needed
            raise SystemExit(f"--eot-bench {file}: not a parquet file ({e})") from None
        for row in rows:
            missing = {"id", "language", "audio", "silence_spans"} - set(row)
            if missing:
                raise SystemExit(f"--eot-bench {file}: rows lack {', '.join(sorted(missing))}")
            if row["language"] != language:
                continue
            audio, rate = _decode(row["audio"], soundfile)
            audio = soxr.resample(audio, rate, RATE).astype(np.float32) if rate != RATE else audio
            spans = [(float(s["start"]), float(s["end"])) for s in row["silence_spans"]]
            spans = [s for s in spans if s[1] - s[0] >= MIN_SPAN_S]
            if not spans:
                continue
            # The turn's end is followed by silence for as long as a policy may wait.
            tail = int((spans[-1][0] + TAIL_S) * RATE) - len(audio)
            if tail > 0:
                audio = np.concatenate([audio, np.zeros(tail, np.float32)])
            words = [
                (str(w.get("word") or w.get("text") or ""), float(w["start"]), float(w["end"]))
                for w in row.get("words") or []
            ]
            turns.append(Turn(str(row["id"]), language, audio, spans, words))
            if limit and len(turns) >= limit:
                return turns
    return turns


def _decode(audio: dict, soundfile) -> tuple[np.ndarray, int]:
    if audio.get("array") is not None:
        return np.asarray(audio["array"], dtype=np.float32), int(audio["sampling_rate"])
    data, rate = soundfile.read(io.BytesIO(audio["bytes"]), dtype="float32", always_2d=True)
    return data.mean(axis=1), rate


# ---------------------------------------------------------------------------- scoring
@dataclass
class Scores:
    """One detector's scores: per span, p at silence 0.1, 0.2, … s (NaN past its end)."""

    turn: list[int]
    eot: np.ndarray  # bool per span
    duration: np.ndarray  # the span's length (eot spans: MAX_WAIT_S)
    p: np.ndarray  # (spans, grid)


def decision_points(turns: list[Turn]) -> Iterator[tuple[int, int, bool, float, float]]:
    """(turn, span, is_eot, start, duration) for every span eot-bench scores."""
    for t, turn in enumerate(turns):
        for s, (start, end) in enumerate(turn.spans):
            eot = s == len(turn.spans) - 1
            length = end - start
            if not eot and not MIN_HOLD_S <= length <= MAX_HOLD_S:
                continue
            yield t, s, eot, start, MAX_WAIT_S if eot else length


def score(turns: list[Turn], detector: Callable[[Turn, list[float]], list[float]]) -> Scores:
    grid = round(MAX_WAIT_S / GRID_S)
    rows, eots, durations, ps = [], [], [], []
    for t, _s, eot, start, length in decision_points(turns):
        steps = [k for k in range(1, grid + 1) if k * GRID_S <= length + 1e-9]
        p = np.full(grid, np.nan)
        if steps:
            p[: len(steps)] = detector(turns[t], [start + k * GRID_S for k in steps])
        rows.append(t)
        eots.append(eot)
        durations.append(length)
        ps.append(p)
    return Scores(rows, np.array(eots), np.array(durations), np.array(ps))


def smart_turn_detector(model) -> Callable[[Turn, list[float]], list[float]]:
    from mlx_harmony.voice.smart_turn import last_seconds, log_mel

    def detect(turn: Turn, times: list[float]) -> list[float]:
        feats = np.stack([log_mel(last_seconds(turn.audio[: int(t * RATE)])) for t in times])
        (out,) = model.session.run(None, {"input_features": feats})
        return [float(x) for x in np.asarray(out).reshape(-1)]

    return detect


# ---------------------------------------------------------------------------- sweep
@dataclass
class Outcome:
    policy: Policy
    cutoff: float  # share of turns cut off during one of their pauses
    latency: float  # mean wait after the true end, seconds
    detected: float  # share of true ends the score fired on before the maximum wait


def evaluate(scores: Scores, policy: Policy, n_turns: int) -> Outcome:
    fire = _fire_times(scores, policy)
    cut = set()
    for i in np.flatnonzero(~scores.eot & (fire < scores.duration - 1e-9)):
        cut.add(scores.turn[i])
    ends = fire[scores.eot]
    return Outcome(
        policy,
        len(cut) / max(n_turns, 1),
        float(ends.mean()) if len(ends) else 0.0,
        float(np.mean(ends < policy.max_wait_s - 1e-9)) if len(ends) else 0.0,
    )


def _fire_times(scores: Scores, policy: Policy) -> np.ndarray:
    grid = (np.arange(scores.p.shape[1]) + 1) * GRID_S
    ok = (scores.p >= policy.threshold) & (grid[None] >= policy.min_wait_s - 1e-9)
    first = np.where(ok.any(axis=1), grid[np.argmax(ok, axis=1)], np.inf)
    return np.minimum(first, policy.max_wait_s)


def sweep(scores: Scores, n_turns: int, silence_only: bool = False) -> list[Outcome]:
    thresholds = [1.0] if silence_only else THRESHOLDS
    out = []
    for th in thresholds:
        for lo in MIN_WAITS:
            for hi in MAX_WAITS:
                if hi >= lo:
                    out.append(evaluate(scores, Policy(float(th), float(lo), float(hi)), n_turns))
    return out


def operating_points(outcomes: list[Outcome]) -> dict[str, Outcome | None]:
    def best(pool: list[Outcome], key) -> Outcome | None:
        return min(pool, key=key) if pool else None

    points = {}
    for ms in (300, 600):
        pool = [o for o in outcomes if o.latency <= ms / 1000 + 1e-9]
        points[f"cutoff@{ms}ms"] = best(pool, lambda o: (o.cutoff, o.latency))
    for pct in (5, 10):
        pool = [o for o in outcomes if o.cutoff <= pct / 100 + 1e-9]
        points[f"latency@{pct}%"] = best(pool, lambda o: (o.latency, o.cutoff))
    return points


# ---------------------------------------------------------------------------- fusion
def fit_text_weight(acoustic: Scores, text: Scores) -> Fusion:
    """Logistic regression of eot-vs-pause on (logit acoustic, logit text) over every
    scored point (Newton's method: three weights need no library)."""
    mask = ~np.isnan(acoustic.p) & ~np.isnan(text.p)
    xa = np.vectorize(logit)(acoustic.p[mask])
    xt = np.vectorize(logit)(text.p[mask])
    y = np.broadcast_to(acoustic.eot[:, None], acoustic.p.shape)[mask].astype(float)
    x = np.stack([np.ones_like(xa), xa, xt], axis=1)
    w = np.zeros(3)
    for _ in range(50):
        p = 1 / (1 + np.exp(-x @ w))
        hess = x.T @ (x * (p * (1 - p))[:, None]) + 1e-3 * np.eye(3)
        w -= np.linalg.solve(hess, x.T @ (p - y))
    return Fusion(acoustic_weight=float(w[1]), text_weight=float(w[2]), bias=float(w[0]))


def default_policy() -> Policy:
    e = EndpointingSection()
    return Policy(e.end_threshold, e.min_wait_ms / 1000, e.max_wait_ms / 1000)


# ---------------------------------------------------------------------------- report
def _cell(o: Outcome | None, which: str) -> str:
    if o is None:
        return "-"
    value = f"{o.cutoff:.1%}" if which == "cutoff" else f"{o.latency * 1000:.0f} ms"
    p = o.policy
    return f"{value} ({p.threshold:g}/{p.min_wait_s:g}/{p.max_wait_s:g})"


def table(results: dict[str, dict]) -> str:
    lines = [
        "| detector | cut-offs @ 300 ms | cut-offs @ 600 ms | latency @ 5% | latency @ 10% "
        "| default policy: cut-offs, latency |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        pts, d = r["points"], r["default"]
        lines.append(
            f"| {name} | {_cell(pts['cutoff@300ms'], 'cutoff')} "
            f"| {_cell(pts['cutoff@600ms'], 'cutoff')} | {_cell(pts['latency@5%'], 'latency')} "
            f"| {_cell(pts['latency@10%'], 'latency')} "
            f"| {d.cutoff:.1%}, {d.latency * 1000:.0f} ms |"
        )
    lines.append("(threshold/min wait/max wait of each operating point, seconds)")
    return "\n".join(lines)


def _as_json(o: Outcome | None) -> dict | None:
    if o is None:
        return None
    return {
        "cutoff": o.cutoff, "latency_s": o.latency, "detected": o.detected,
        "threshold": o.policy.threshold, "min_wait_s": o.policy.min_wait_s,
        "max_wait_s": o.policy.max_wait_s,
    }  # fmt: skip


def run(
    turns: list[Turn], detectors: list[str], model: str | None = None, lag: float = TRANSCRIPT_LAG_S
) -> dict[str, dict]:
    n = len(turns)
    default = default_policy()
    results: dict[str, dict] = {}
    cache: dict[str, Scores] = {}

    def acoustic() -> Scores:
        if "smart-turn" not in cache:
            from mlx_harmony.voice.smart_turn import SmartTurn

            cache["smart-turn"] = score(turns, smart_turn_detector(SmartTurn.load(threads=2)))
        return cache["smart-turn"]

    for name in detectors:
        if name == "silence":
            s = score(turns, lambda _turn, times: [1.0] * len(times))
            outcomes = sweep(s, n, silence_only=True)
        elif name == "smart-turn":
            s = acoustic()
            outcomes = sweep(s, n)
        elif name == "fused":
            fusion = Fusion()
            text = None
            if model:
                text = score(turns, text_detector(model, lag))
                fusion = fit_text_weight(acoustic(), text)
            s = fused_scores(turns, acoustic(), text, fusion, lag)
            outcomes = sweep(s, n)
            results.setdefault("_fusion", {}).update(
                acoustic_weight=fusion.acoustic_weight, text_weight=fusion.text_weight,
                bias=fusion.bias,
            )  # fmt: skip
        else:
            raise SystemExit(f"--detectors: unknown detector {name!r}")
        results[name] = {
            "points": operating_points(outcomes),
            "default": evaluate(s, default if name != "silence" else _silence(default), n),
        }
    return results


def _silence(p: Policy) -> Policy:
    """The silence rule of today's config: the turn ends after `silence_ms`."""
    return Policy(1.0, EndpointingSection().silence_ms / 1000, p.max_wait_s)


def fused_scores(
    turns: list[Turn], acoustic: Scores, text: Scores | None, fusion: Fusion, lag: float
) -> Scores:
    p = np.full_like(acoustic.p, np.nan)
    points = list(decision_points(turns))
    for i, (t, _s, _eot, start, _length) in enumerate(points):
        for k in range(p.shape[1]):
            a = acoustic.p[i, k]
            if np.isnan(a):
                continue
            words = turns[t].transcript(start + (k + 1) * GRID_S, lag)
            tp = None if text is None else float(text.p[i, k])
            p[i, k] = fusion.probability(float(a), tp, words)
    return Scores(acoustic.turn, acoustic.eot, acoustic.duration, p)


def text_detector(model: str, lag: float) -> Callable[[Turn, list[float]], list[float]]:
    """The chat model's probability that the user's message ends after the words heard."""
    from mlx_harmony.llm.backends import load_engine
    from mlx_harmony.llm.conversation import Conversation
    from mlx_harmony.llm.messages import ChatMessage

    engine = load_engine(model)
    memo: dict[str, float] = {}

    def detect(turn: Turn, times: list[float]) -> list[float]:
        out = []
        for t in times:
            words = turn.transcript(t, lag) or ""
            if words not in memo:
                p = engine.end_of_turn_probability(Conversation([ChatMessage("user", words)]))
                memo[words] = 0.5 if p is None else p
            out.append(memo[words])
        return out

    return detect


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m mlx_harmony.bench.turns", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--eot-bench", type=Path, help="eot-bench-data parquet file or folder")
    ap.add_argument("--language", default="en", help="eot-bench rows of this language")
    ap.add_argument("--limit", type=int, help="only the first N turns")
    ap.add_argument("--detectors", default="silence,smart-turn,fused")
    ap.add_argument("--model", help="chat model for the text signal (path or repo id)")
    ap.add_argument("--transcript-lag", type=float, default=TRANSCRIPT_LAG_S)
    ap.add_argument("--json", type=Path, help="write the operating points here")
    args = ap.parse_args(argv)
    if args.eot_bench:
        turns = eot_bench_turns(args.eot_bench, args.language, args.limit)
        source = f"eot-bench rows ({args.eot_bench}, {args.language})"
    else:
        turns = synthetic_turns(args.limit)
        source = "espeak-ng turns (synthetic prosody: see the module's note)"
    if not turns:
        raise SystemExit("no turns to score")
    pauses = sum(1 for *_, eot, _s, _l in decision_points(turns) if not eot)
    print(f"{len(turns)} turns, {pauses} mid-turn pauses, from {source}")
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    results = run(turns, detectors, args.model, args.transcript_lag)
    fusion = results.pop("_fusion", None)
    print(table(results))
    d = default_policy()
    print(
        f"default policy: threshold {d.threshold:g}, min wait {d.min_wait_s:g} s, "
        f"max wait {d.max_wait_s:g} s (silence row: {EndpointingSection().silence_ms} ms)"
    )
    if fusion:
        print(f"fusion: {fusion}")
    if args.json:
        data = {
            name: {
                "points": {k: _as_json(v) for k, v in r["points"].items()},
                "default": _as_json(r["default"]),
            }
            for name, r in results.items()
        }
        data["_meta"] = {"turns": len(turns), "pauses": pauses, "source": source, "fusion": fusion}
        args.json.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
