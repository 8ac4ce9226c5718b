"""mlx-harmony-bench: engine vs plain mlx-lm, multi-turn cache reuse, Kyutai real-time factors.

Writes results.json, one CSV per table and a PNG plot into --out, and prints the tables
with ratios against the peer measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_harmony.llm.cli.common import DEFAULT_MODEL, run_main
from mlx_harmony.llm.config import SamplingParams, read_json
from mlx_harmony.llm.errors import ConfigError

if TYPE_CHECKING:  # MLX and mlx-lm are imported when a benchmark runs, not for --help
    from mlx_harmony.llm.engine import Engine

QUESTIONS = Path(__file__).parent / "data" / "alpaca_eval_english.json"


def load_prompts(path: Path | None, count: int) -> list[str]:
    raw = read_json(path or QUESTIONS)
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: expected a non-empty JSON list of prompts")
    prompts = []
    for i, item in enumerate(raw):
        text = item.get("instruction") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                f"{path}: item {i}: expected a string or an object with 'instruction'"
            )
        prompts.append(text)
    return prompts[:count]


def machine() -> dict:
    import mlx.core as mx

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _median(rows: list[dict], side: str, key: str) -> float | None:
    values = [r[key] for r in rows if r["side"] == side and r[key] is not None]
    return statistics.median(values) if values else None


def summarize(results: dict) -> dict:
    summary: dict = {}
    single = results.get("single_turn", [])
    if single:
        for key in ("prefill_tps", "decode_tps", "ttft"):
            ours, peer = _median(single, "engine", key), _median(single, "mlx-lm", key)
            summary[f"{key}_engine"] = ours
            summary[f"{key}_mlx_lm"] = peer
            summary[f"{key}_ratio"] = ours / peer if ours and peer else None
    listening = {r["side"]: r for r in results.get("listening", [])}
    if listening:
        summary["listening_ttft_ended"] = listening["ended"]["ttft"]
        summary["listening_ttft_listening"] = listening["listening"]["ttft"]
        summary["listening_fed_tokens_ended"] = (
            listening["ended"]["prompt_tokens"] - listening["ended"]["cached_tokens"]
        )
        summary["listening_fed_tokens_listening"] = (
            listening["listening"]["prompt_tokens"] - listening["listening"]["cached_tokens"]
        )
    multi = results.get("multi_turn", [])
    for side in ("engine", "no-reuse"):
        turns = [r for r in multi if r["side"] == side]
        if len(turns) > 1:
            summary[f"multi_turn_{side}_last_over_first_ttft"] = (
                turns[-1]["ttft"] / turns[0]["ttft"]
            )
            summary[f"multi_turn_{side}_last_prompt_tokens"] = turns[-1]["prompt_tokens"]
    return summary


def write_outputs(out: Path, results: dict, with_plot: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for table in ("single_turn", "multi_turn", "listening", "kyutai", "voice"):
        rows = results.get(table) or []
        if rows:
            with (out / f"{table}.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    if with_plot:
        plot(out / "plot.png", results)


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    single = results.get("single_turn", [])
    for side, marker in (("engine", "o"), ("mlx-lm", "x")):
        rows = [r for r in single if r["side"] == side]
        axes[0].scatter([r["prompt_tokens"] for r in rows], [r["decode_tps"] for r in rows],
                        marker=marker, label=side)  # fmt: skip
    axes[0].set(xlabel="prompt tokens", ylabel="decode tokens/s", title="Single turns")
    axes[0].legend()
    multi = results.get("multi_turn", [])
    for side in ("engine", "no-reuse"):
        rows = [r for r in multi if r["side"] == side]
        axes[1].plot([r["index"] + 1 for r in rows], [r["ttft"] * 1000 for r in rows],
                     marker="o", label=side)  # fmt: skip
    axes[1].set(xlabel="turn", ylabel="time to first token (ms)", title="Multi-turn")
    axes[1].legend()
    fig.suptitle(f"{Path(results['model']).name} on {results['machine']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_report(results: dict) -> None:
    s = results["summary"]
    where = results["machine"]
    print(f"model {results['model']} on {where['device']} (mlx {where['mlx']})")
    if "decode_tps_ratio" in s:
        print("single turns (medians)      engine      mlx-lm   ratio")
        for key, label in (("prefill_tps", "prefill tokens/s"), ("decode_tps", "decode tokens/s"),
                           ("ttft", "time to first token s")):  # fmt: skip
            print(f"  {label:<24}{s[key + '_engine']:>9.3f}  {s[key + '_mlx_lm']:>9.3f}  "
                  f"{s[key + '_ratio']:>6.2f}x")  # fmt: skip
    for side in ("engine", "no-reuse"):
        key = f"multi_turn_{side}_last_over_first_ttft"
        if key in s:
            tokens = s[f"multi_turn_{side}_last_prompt_tokens"]
            print(f"multi-turn {side:<9} last/first time to first token: {s[key]:.2f}x "
                  f"(last prompt {tokens} tokens)")  # fmt: skip
    if "listening_ttft_ended" in s:
        print(
            f"spoken turn, time to first token: {s['listening_ttft_ended'] * 1000:.0f} ms "
            f"({s['listening_fed_tokens_ended']} tokens to prefill at the end of speech), "
            f"{s['listening_ttft_listening'] * 1000:.0f} ms with the words prefilled while "
            f"listening ({s['listening_fed_tokens_listening']} left)"
        )
    vs = results.get("voice_summary")
    if vs:
        from mlx_harmony.bench.voice_latency import STAGES

        labels = vs["labels"]
        width = max(14, *(len(label) + 2 for label in labels))
        if vs.get("tts"):
            t = vs["tts"]
            codebooks = f"{t['codebooks']} of {t['of']} codebooks, " if t["codebooks"] else ""
            print(f"text to speech: {codebooks}{t['rate']:.2f}x real time")
        print(f"voice-to-voice latency (medians, ms)  {''.join(f'{x:>{width}}' for x in labels)}")
        counts = (
            "speculative_turns", "speculations_dropped", "ended_by_detector", "underruns",
            "text_gaps", "jitter_frames",
        )  # fmt: skip
        for key in (*STAGES, *counts):
            cells = [vs[f"{label}_{key}"] for label in labels]
            text = "".join(
                f"{'-':>{width}}" if v is None
                else f"{v:>{width}.1f}" if isinstance(v, float) else f"{v:>{width}}"
                for v in cells
            )  # fmt: skip
            print(f"  {key.removesuffix('_ms'):<36}{text}")
        if vs.get("realtime_after_speech_stopped_ms") is not None:
            # Beside the daemon's first variant: from the end of speech to its first sound.
            label = labels[0]
            stopped, end = (
                vs["realtime_after_speech_stopped_ms"],
                vs["realtime_after_speech_end_ms"],
            )
            local = vs[f"{label}_first_audio_ms"]
            print(
                f"realtime API: first audio delta {stopped:.0f} ms after speech_stopped, "
                f"{end:.0f} ms after the end of speech (daemon, {label}: first sound "
                f"{local:.0f} ms after it; {end / local:.2f}x)"
            )
    for r in results.get("kyutai", []):
        first = f", first audio {r['first_audio_s']:.2f}s" if r["first_audio_s"] else ""
        tts = ""
        if r.get("codebooks") is not None:
            skip = " skip" if r.get("skip_delay_depformer") else ""
            skip += " compiled" if r.get("compile_depformer") else ""
            fused = r.get("fused_depformer")
            skip += f" fused-{fused}" if fused and fused != "off" else ""
            tts = f" {r['codebooks']}cb{skip}"
        print(
            f"{r['model']}{tts} q{r['quantize'] or 16} step {r['step_ms_median']:.1f} ms "
            f"(p90 {r['step_ms_p90']:.1f}), real-time factor {r['real_time_factor']:.2f}{first}"
        )


def load_engine(model: str) -> tuple[Engine, dict[int, float]]:
    """The engine, and the logit bias both sides run with (random weights never stop)."""
    from mlx_harmony.llm.engine import Engine

    if not model.startswith("random:"):
        return Engine.load(model), {}
    from mlx_harmony.bench.harmony_tokenizer import STOP_IDS
    from mlx_harmony.bench.shapes import GPT_OSS_20B, random_gpt_oss, scaled_down
    from mlx_harmony.llm.vocab import ensure_vocab

    shapes = {"gpt-oss-20b": GPT_OSS_20B, "gpt-oss-small": scaled_down(GPT_OSS_20B)}
    name = model.removeprefix("random:")
    if name not in shapes:
        raise ConfigError(f"--model {model}: known shapes are {', '.join(shapes)}")
    vocab = ensure_vocab()
    if vocab is None:
        raise ConfigError("the o200k vocabulary is needed to build a GPT-OSS tokenizer")
    folder = Path.home() / ".cache" / "mlx-harmony" / "bench-tokenizer"
    engine = random_gpt_oss(shapes[name], folder, vocab / "o200k_base.tiktoken")
    return engine, {t: -1e9 for t in STOP_IDS}


PREFILL_VARIANTS = {"both": (True, False), "on": (True,), "off": (False,)}
# The turn detector: the config's, on (as configured), off (the silence rule), or both
# (the silence rule first: the first variant of a process pays CUDA's compilation).
TURN_MODEL_VARIANTS = {"config": (None,), "on": (None,), "off": (False,), "both": (False, None)}
# The TTS on a thread of its own (tts.own_thread) or on the loop's: "both" runs the thread
# first (an answer with gaps cuts codebooks for the variants after it, never back).
TTS_THREAD_VARIANTS = {"config": (None,), "on": (True,), "off": (False,), "both": (True, False)}


def speculate_variants(choice: str, configured: int | None) -> tuple[int | None, ...]:
    """`endpointing.speculate_ms` for each variant: the config's, off, both (off first: the
    first variant of a process pays MLX's kernel compilation on CUDA), or a list of
    milliseconds (`0,250,160`: 0 is off)."""
    on = configured or 250
    named = {"config": (None,), "on": (on,), "off": (0,), "both": (0, on)}
    if choice in named:
        return named[choice]
    try:
        values = tuple(int(v) for v in choice.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 0:
        raise SystemExit(
            f"--voice-speculate: {choice!r} is not config, on, off, both or a list of "
            "milliseconds such as 0,250,160"
        )
    return values


def _json_or_text(value: str) -> object:
    """A setting's value as JSON where it is JSON (8, true, null), else the text."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def voice_sampling(
    model: str, engine: Engine, bias: dict[int, float], max_tokens: int
) -> SamplingParams:
    """Greedy answers of `max_tokens`; on random weights, in plain words (what they write
    otherwise may be all symbols: nothing would be spoken)."""
    if model.startswith("random:"):
        from mlx_harmony.bench.shapes import plain_words_bias

        bias = bias | plain_words_bias(engine)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logit_bias=bias)


def voice_latency(
    args: argparse.Namespace, engine: Engine, bias: dict[int, float]
) -> tuple[list[dict], dict]:
    from mlx_harmony.bench import voice_latency as vl
    from mlx_harmony.llm.cli.common import Setup
    from mlx_harmony.llm.config import PromptConfig
    from mlx_harmony.voice.config import VoiceConfig, apply_override, load_voice_config

    config = load_voice_config(args.voice_config)[0] if args.voice_config else VoiceConfig()
    for setting in args.voice_set:
        name, _, value = setting.partition("=")
        config = apply_override(config, name, _json_or_text(value))
    sampling = voice_sampling(args.model, engine, bias, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        if args.voice_random:
            from mlx_harmony.bench.kyutai import random_voice_models

            # Random weights never write Harmony headers: the answer is forced onto the
            # final channel (what llm.reasoning "skip" does), or nothing would be spoken.
            config = apply_override(config, "llm.reasoning", "skip")
            stt, tts = random_voice_models(
                Path(tmp), vl.QUESTIONS[0], config.tts, config.stt.quantize
            )
        else:
            from rich.console import Console

            from mlx_harmony.voice.cli import load_voice_models

            stt, tts = load_voice_models(config, Console(stderr=True))
        prompt = PromptConfig(sampling=sampling)
        records = vl.run(
            config, Setup(args.model, prompt, None), engine, stt, tts, args.voice_rounds,
            devices=args.voice_devices, one_chat=args.voice_one_chat,
            variants=tuple(
                (prefill, speculate, detector, thread)
                for thread in TTS_THREAD_VARIANTS[args.voice_tts_thread]
                for detector in TURN_MODEL_VARIANTS[args.voice_turn_model]
                for prefill in PREFILL_VARIANTS[args.voice_prefill]
                for speculate in speculate_variants(
                    args.voice_speculate, config.endpointing.speculate_ms
                )
            ),
        )  # fmt: skip
        realtime = []
        if args.voice_realtime:
            from mlx_harmony.bench import realtime as rt

            clips = [vl.spoken(q) for q in vl.QUESTIONS]
            setup = Setup(args.model, prompt, None)
            realtime = rt.run(config, setup, engine, stt, tts, clips, args.voice_rounds)
    summary = vl.summarize(records)
    if tts.speed is not None:
        summary["tts"] = tts.speed.as_log()
    if realtime:
        for key in ("after_speech_stopped_ms", "after_speech_end_ms"):
            summary[f"realtime_{key}"] = statistics.median(getattr(r, key) for r in realtime)
        words = [r.first_word_ms for r in realtime if r.first_word_ms is not None]
        summary["realtime_first_word_ms"] = statistics.median(words) if words else None
        summary["realtime"] = [r.row() for r in realtime]
    return [r.row() for r in records], summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-harmony-bench", description=__doc__)
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="repo id or folder (mlx-lm format), or random:gpt-oss-20b / random:gpt-oss-small "
        "for that shape with random weights",
    )
    p.add_argument("--prompts", type=Path, help="JSON list of prompts (default: AlpacaEval)")
    p.add_argument("--questions", type=int, default=20, help="how many prompts to run")
    p.add_argument("--max-tokens", type=int, default=256, help="per answer")
    p.add_argument("--turns", type=int, default=10, help="multi-turn conversation length")
    p.add_argument("--filler", type=int, default=300, help="context words added per turn")
    p.add_argument("--kyutai", action="store_true", help="also time Kyutai TTS/STT real shapes")
    p.add_argument("--kyutai-frames", type=int, default=25, help="frames timed per model")
    p.add_argument(
        "--kyutai-codebooks",
        default="32",
        help="TTS codebook counts to time, e.g. 32,24,16,8 (each with every --kyutai-levers)",
    )
    p.add_argument("--kyutai-levers", default="plain,skip,skip+compile",
                   help="TTS variants: plain, skip, compile, or both joined by +")  # fmt: skip
    p.add_argument("--quantize", type=int, choices=(4, 8), action="append", default=None,
                   help="Kyutai quantizations to time besides bf16 (repeatable)")  # fmt: skip
    p.add_argument("--voice", action="store_true",
                   help="voice-to-voice latency through virtual audio devices (Linux)")  # fmt: skip
    p.add_argument("--voice-config", type=Path, help="voice config for --voice (STT/TTS models)")
    p.add_argument("--voice-rounds", type=int, default=3, help="spoken turns per variant")
    p.add_argument("--voice-devices", choices=("auto", "pulse", "file"), default="auto",
                   help="PulseAudio's virtual devices, or paced file devices (no sound "
                   "server needed; auto: PulseAudio where installed)")  # fmt: skip
    p.add_argument("--voice-random", action="store_true",
                   help="Kyutai STT 1B and TTS 1.6B at their published shapes with random "
                   "weights (the transcript scripted, the answer forced to the final "
                   "channel)")  # fmt: skip
    p.add_argument("--voice-prefill", choices=("both", "on", "off"), default="both",
                   help="with prefill while listening, without, or both (default)")  # fmt: skip
    p.add_argument("--voice-speculate", default="config",
                   help="speculative start (endpointing.speculate_ms) as configured "
                   "(default), on, off, both in one process, or milliseconds for each "
                   "variant (0,250,160)")  # fmt: skip
    p.add_argument("--voice-turn-model", choices=tuple(TURN_MODEL_VARIANTS), default="config",
                   help="the turn detector: as configured, off (silence), or both")  # fmt: skip
    p.add_argument("--voice-tts-thread", choices=tuple(TTS_THREAD_VARIANTS), default="config",
                   help="the TTS on a thread of its own (tts.own_thread): as configured, "
                   "on, off, or both")  # fmt: skip
    p.add_argument("--voice-one-chat", action="store_true",
                   help="a variant's rounds as one chat (else a new chat each)")  # fmt: skip
    p.add_argument("--voice-realtime", action="store_true",
                   help="also ask over /v1/realtime, in the same process")  # fmt: skip
    p.add_argument("--voice-set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="a voice config setting for --voice (repeatable)")  # fmt: skip
    p.add_argument("--skip", choices=("single", "multi", "listening"), action="append", default=[])
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    return p


def _main() -> int:
    args = build_parser().parse_args()
    from mlx_harmony.bench.engine import listening_prefill, multi_turn, single_turns

    prompts = load_prompts(args.prompts, 10_000)
    engine, bias = load_engine(args.model)
    results: dict = {"model": args.model, "machine": machine(), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}  # fmt: skip
    if "single" not in args.skip:
        rows = single_turns(engine, prompts[: args.questions], args.max_tokens, bias)
        results["single_turn"] = [r.row() for r in rows]
    if "multi" not in args.skip:
        rows = multi_turn(engine, prompts, args.turns, args.max_tokens, args.filler, bias)
        results["multi_turn"] = [r.row() for r in rows]
    if args.kyutai:
        from mlx_harmony.bench.kyutai import bench_stt, bench_tts_levers, bench_tts_moshi

        kyutai = []
        for q in [None, *(args.quantize or [])]:
            kyutai.append(bench_tts_moshi(args.kyutai_frames, q).row())
            for record in bench_tts_levers(
                args.kyutai_frames, q, args.kyutai_codebooks, args.kyutai_levers
            ):
                kyutai.append(record.row())
            kyutai.append(bench_stt(args.kyutai_frames, q).row())
        results["kyutai"] = kyutai
    if "listening" not in args.skip:
        rows = listening_prefill(
            engine, prompts, min(args.turns, 6), args.max_tokens, args.filler, bias=bias
        )
        results["listening"] = [r.row() for r in rows]
    if args.voice:
        results["voice"], results["voice_summary"] = voice_latency(args, engine, bias)
    results["summary"] = summarize(results)
    write_outputs(args.out, results, with_plot=not args.no_plot)
    print_report(results)
    print(f"wrote {args.out}/results.json, CSV tables and plot.png")
    return 0


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()
