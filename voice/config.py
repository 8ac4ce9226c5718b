"""The voice assistant's JSON config (`audio_configs/*.json`), validated by pydantic.

Keys starting with "//" are comments (JSON has none of its own) and are dropped at any
level. The original mlx-harmony's flat `moshi-config` layout is read too: its fields are
mapped onto the sections below and the ones with no counterpart are reported as ignored.
"""

from __future__ import annotations

import json
from contextlib import suppress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlx_harmony.llm.config import PromptConfig, read_json
from mlx_harmony.llm.errors import ConfigError, error_line, first_error
from mlx_harmony.llm.messages import AnswerNow
from mlx_harmony.voice.turn_policy import HOLD_WORDS

DEFAULT_STT = "kyutai/stt-1b-en_fr-mlx"
DEFAULT_TTS = "kyutai/tts-1.6b-en_fr"
DEFAULT_VOICE = "expresso/ex03-ex01_happy_001_channel1_334s.wav"
DEFAULT_POCKET_TTS = "mlx-community/pocket-tts"
DEFAULT_POCKET_VOICE = "alba"
# Each backend's model and voice, where the config names none (or the other's default).
BACKEND_DEFAULTS = {
    "kyutai": (DEFAULT_TTS, DEFAULT_VOICE),
    "pocket": (DEFAULT_POCKET_TTS, DEFAULT_POCKET_VOICE),
}
# What an answer meant to be heard should be like (added to the developer instructions).
SPOKEN_STYLE = (
    "You are speaking with the user: your answer is read aloud by a text-to-speech voice. "
    "Answer in short spoken sentences. Do not use markdown, tables, lists or code unless the "
    "user asks for them. Write numbers, units, symbols and abbreviations as they are said "
    'aloud ("twenty-one degrees", not "21°C").'
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LlmSection(_Section):
    model: str | None = Field(None, description="Hugging Face repo id or local folder")
    profile: str | None = Field(None, description="profile name from `profiles`")
    profiles: str | None = Field(None, description="profiles JSON file")
    prompt_config: str | None = Field(None, description="prompt config JSON file")
    chat_log: str | None = Field(None, description="chat log to resume or create")
    prefill_while_listening: bool = Field(
        True, description="prefill the words heard so far while the user is still speaking"
    )
    spoken_style: str | None = Field(
        SPOKEN_STYLE, description="developer instructions added in voice mode (null: none)"
    )
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        "low", description="voice mode's effort unless the prompt config or a flag sets one"
    )
    reasoning: Literal["auto", "skip"] = Field(
        "auto", description="skip: answer at once on the final channel, with no reasoning"
    )

    def reply_start(self) -> AnswerNow | None:
        """How an answer is made to start: at once where reasoning is skipped."""
        return AnswerNow() if self.reasoning == "skip" else None


class SttSection(_Section):
    model: str = Field(DEFAULT_STT, description="Kyutai STT repo id or local folder")
    quantize: Literal[4, 8] | None = Field(None, description="quantize the LM to 4 or 8 bits")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy transcript")


class TtsSection(_Section):
    backend: Literal["kyutai", "pocket"] = Field(
        "kyutai",
        description="kyutai: Kyutai TTS 1.6B (streams word by word, needs a fast GPU for full "
        "quality); pocket: Kyutai Pocket TTS (100M: keeps up on smaller machines, speaks "
        "clause by clause, clones a voice from a WAV file)",
    )
    model: str = Field(
        DEFAULT_TTS, description="repo id or local folder (default: the backend's own model)"
    )
    voice: str = Field(
        DEFAULT_VOICE,
        description="kyutai: a voice name in voice_repo or an embedding file; pocket: a voice "
        "name (--list-voices), an embedding file, or a WAV file of a few seconds of someone "
        "speaking, whose voice is cloned",
    )
    voice_repo: str = Field("kyutai/tts-voices", description="kyutai: repo id or folder of voices")
    voice_cache: str | None = Field(
        None,
        description="pocket: folder that keeps voices cloned from WAV files (default: "
        "cloned-voices/ beside the config file, or ~/.cache/mlx-harmony/cloned-voices)",
    )
    quantize: Literal[4, 8] | None = Field(None, description="quantize the LM to 4 or 8 bits")
    temperature: float | None = Field(
        None,
        ge=0.0,
        description="sampling temperature of the voice (default: the model's own, "
        "0.6 for Kyutai TTS, 0.7 for Pocket TTS)",
    )
    cfg_coef: float = Field(2.0, description="kyutai: CFG strength the model was distilled for")
    codebooks: Annotated[int, Field(ge=2)] | Literal["auto"] | None = Field(
        "auto",
        description="kyutai: audio codebooks to generate: auto = the most that this machine "
        "synthesizes realtime_margin times faster than real time; a number fixes it; null: "
        "all the model has (fewer = faster, coarser sound)",
    )
    min_codebooks: int = Field(
        8, ge=2, description="auto never goes below this (coarser speech is hard to follow)"
    )
    realtime_margin: float = Field(
        1.2, ge=1.0, description="auto keeps synthesis this many times faster than playback"
    )
    playout_buffer: bool = Field(
        True,
        description="where synthesis is slower than playback, hold an answer back until "
        "it can play to the end without a gap (off: start at once, with gaps)",
    )
    own_thread: bool = Field(
        False,
        description="synthesize on a thread of its own, beside the language model and the "
        "STT (off: they take turns on the loop's thread; on an NVIDIA GPU on was slower beside "
        "the fused kernels and ran dry less beside the compiled depformer, see "
        "docs/performance.md)",
    )
    fused_depformer: Literal["auto", "off"] = Field(
        "auto",
        description="kyutai: auto runs the depformer (a frame's per-codebook passes) as "
        "fused CUDA kernels where MLX runs on an NVIDIA GPU and the model is not quantized "
        "(the same tokens in a third of the time at 32 codebooks); off: MLX's compiled "
        "operations everywhere",
    )
    padding_between: int = Field(1, ge=0, description="kyutai: pause steps forced between words")
    greeting: bool = Field(True, description="speak the prompt config's greeting at start")

    @model_validator(mode="before")
    @classmethod
    def _backend_defaults(cls, data: Any) -> Any:
        """A backend's own model and voice where none is named, or where the other
        backend's default is (as a config switched with `--set tts.backend=pocket` has)."""
        if not isinstance(data, dict):
            return data
        backend = data.get("backend", "kyutai")
        if backend not in BACKEND_DEFAULTS:
            return data  # the field's own error says what is allowed
        model, voice = BACKEND_DEFAULTS[backend]
        others = [d for b, d in BACKEND_DEFAULTS.items() if b != backend]
        data = dict(data)
        if data.get("model") in (None, *(m for m, _ in others)):
            data["model"] = model
        # Only TTS 1.6B's default voice is unmistakable: a voice named "alba" may be one
        # of a folder of Kyutai voices.
        if data.get("voice") is None or (backend == "pocket" and data["voice"] == DEFAULT_VOICE):
            data["voice"] = voice
        return data

    @property
    def voice_name(self) -> str:
        """The voice as clients of the servers see it: a voice file's name without the
        folders (a local path is nobody else's business), else the name as configured."""
        path = Path(self.voice).expanduser()
        return path.stem if path.is_absolute() else self.voice

    @model_validator(mode="after")
    def _kyutai_only(self) -> TtsSection:
        if self.backend == "pocket" and isinstance(self.codebooks, int):
            raise ValueError(
                "codebooks: Pocket TTS has no codebooks to choose (its audio is one "
                'continuous latent a frame); leave it "auto"'
            )
        return self


class AudioSection(_Section):
    input_device: str | int | None = Field(None, description="name (substring) or index")
    output_device: str | int | None = Field(None, description="name (substring) or index")
    block_ms: int = Field(80, ge=10, le=500, description="microphone block length")
    reopen_seconds: float = Field(1.0, gt=0, description="retry period for a lost device")
    use_stt: bool = Field(True, description="hear questions through the microphone")
    use_tts: bool = Field(True, description="speak the answers")
    echo_cancellation: Literal["auto", "on", "off"] = Field(
        "auto",
        description="remove the assistant's own voice from the microphone (WebRTC AEC3); "
        "auto: on when both microphone and speaker are in use",
    )


class EndpointingSection(_Section):
    detector: Literal["energy", "silero"] = Field(
        "silero",
        description="silero: Silero's speech probability on blocks above energy_threshold "
        "(robust to room noise); energy: the block level alone",
    )
    energy_threshold: float = Field(0.01, gt=0, description="block RMS that counts as speech")
    speech_threshold: float = Field(
        0.5, gt=0, lt=1, description="silero speech probability that counts as speech"
    )
    hits: int = Field(2, ge=1, description="speech blocks in a row that start an utterance")
    silence_ms: int = Field(700, ge=50, description="silence that ends an utterance")
    min_speech_ms: int = Field(200, ge=0, description="shorter utterances are dropped")
    max_utterance_s: float = Field(15.0, gt=0, description="an utterance is cut after this")
    warmup_blocks: int = Field(2, ge=0, description="blocks ignored after opening the mic")
    semantic: Literal["auto", "off"] = Field(
        "auto",
        description="end the turn when the STT predicts a pause (models with pause heads, "
        "e.g. the -candle weights); silence_ms stays the fallback",
    )
    pause_threshold: float = Field(
        0.6, gt=0, lt=1, description="smoothed pause probability that ends the turn"
    )
    pause_ignore_ms: int = Field(
        960, ge=0, description="the start of an utterance, where pause predictions are ignored"
    )
    speculate_ms: int | None = Field(
        250,
        ge=0,
        description="after this much silence the answer is started (generated and "
        "synthesized, not played) and played when the end of the turn is confirmed; speech "
        "before then drops it. null or 0 = off",
    )
    pause_speculate_threshold: float | None = Field(
        0.4,
        gt=0,
        lt=1,
        description="with an STT that predicts pauses, the smoothed pause probability that "
        "starts the answer early (as speculate_ms does), below pause_threshold; null = off",
    )
    turn_model: str | None = Field(
        "smart-turn-v3.2",
        description="the acoustic end-of-turn model: smart-turn-v3.2 (pipecat's, from its "
        "package or the hub) or an ONNX file of the same shape; null = silence_ms alone",
    )
    end_threshold: float = Field(
        0.2, gt=0, lt=1, description="fused end-of-turn probability that ends the turn"
    )
    min_wait_ms: int = Field(
        500, ge=0, description="silence before the fused probability may end the turn"
    )
    max_wait_ms: int = Field(
        1500,
        ge=50,
        description="with a turn model, the silence that ends the turn whatever the model "
        "says (silence_ms is the rule without one)",
    )
    speculate_threshold: float | None = Field(
        0.1,
        gt=0,
        lt=1,
        description="fused probability that starts the answer early (as speculate_ms "
        "does), below end_threshold; null = off",
    )
    text_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the chat model's own end-of-message probability in the "
        "fused probability (log-odds; the acoustic model's is 1); 0 = not computed",
    )
    hold_words: list[str] = Field(
        default_factory=lambda: list(HOLD_WORDS),
        description="a transcript ending on one of these words holds the turn until "
        "max_wait_ms (e.g. 'and', 'um'); [] = off",
    )

    @model_validator(mode="after")
    def _speculate_before_the_end(self) -> EndpointingSection:
        if self.speculate_ms and self.speculate_ms >= self.silence_ms:
            raise ValueError(
                f"speculate_ms ({self.speculate_ms}) must be shorter than silence_ms "
                f"({self.silence_ms})"
            )
        if self.min_wait_ms >= self.max_wait_ms:
            raise ValueError(
                f"min_wait_ms ({self.min_wait_ms}) must be shorter than max_wait_ms "
                f"({self.max_wait_ms})"
            )
        spec = self.speculate_threshold
        if spec is not None and spec >= self.end_threshold:
            raise ValueError(
                f"speculate_threshold ({spec:g}) must be below end_threshold "
                f"({self.end_threshold:g})"
            )
        early = self.pause_speculate_threshold
        if early is not None and early >= self.pause_threshold:
            raise ValueError(
                f"pause_speculate_threshold ({early:g}) must be below pause_threshold "
                f"({self.pause_threshold:g})"
            )
        return self


DEFAULT_BACKCHANNELS = [
    "mm-hmm", "mhm", "mm", "hmm", "uh-huh", "uh huh", "yeah", "yes", "yep", "right",
    "okay", "ok", "sure", "i see", "got it", "oh", "ah", "wow", "cool", "nice", "alright",
    "all right", "exactly", "true",
]  # fmt: skip


class BargeInSection(_Section):
    enabled: bool | None = Field(
        None, description="speech over the answer interrupts it; default: on with echo cancellation"
    )
    min_speech_ms: int = Field(240, ge=0, description="speech over the assistant that counts")
    echo_guard_ms: int = Field(
        300,
        ge=0,
        description="without echo cancellation, how long after playback the mic stays deaf",
    )
    backchannels: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BACKCHANNELS),
        description="said over the answer, these do not interrupt it ('mm-hmm', 'yeah'): "
        "the answer stops once the words heard hold interrupt_min_words others (or a stop "
        "phrase); [] = any speech interrupts at once",
    )
    interrupt_min_words: int = Field(
        1, ge=1, description="words besides backchannels that make speech an interruption"
    )


DEFAULT_WAKE_PHRASES = ["hey harmony", "okay harmony"]
DEFAULT_STOP_PHRASES = [
    "stop", "stop it", "be quiet", "quiet", "that's enough", "cancel", "never mind",
]  # fmt: skip


class ActivationSection(_Section):
    mode: Literal["always", "wake_phrase", "push_to_talk"] = Field(
        "always",
        description="always: answer any speech; wake_phrase: only speech that starts with a "
        "wake phrase (or follows an answer); push_to_talk: only after Enter (or `ctl listen`)",
    )
    wake_phrases: list[str] = Field(
        DEFAULT_WAKE_PHRASES, min_length=1, description="matched forgivingly in the transcript"
    )
    follow_up_s: float = Field(
        8.0, ge=0, description="after an answer or the wake phrase alone, no wake phrase needed"
    )
    stop_phrases: list[str] = Field(
        DEFAULT_STOP_PHRASES, description="said alone, they stop the answer instead of asking"
    )
    earcons: bool | None = Field(
        None, description="short tones when it starts and stops listening; default: unless always"
    )
    earcon_volume: float = Field(0.2, ge=0, le=1, description="loudness of the earcons, 0-1")


class DisplaySection(_Section):
    show_reasoning: bool = Field(False, description="print the model's reasoning")
    status: bool | None = Field(
        None, description="state changes on their own lines; default: only on a terminal"
    )


class VoiceConfig(_Section):
    llm: LlmSection = LlmSection()
    stt: SttSection = SttSection()
    tts: TtsSection = TtsSection()
    audio: AudioSection = AudioSection()
    endpointing: EndpointingSection = EndpointingSection()
    barge_in: BargeInSection = BargeInSection()
    activation: ActivationSection = ActivationSection()
    display: DisplaySection = DisplaySection()

    @model_validator(mode="before")
    @classmethod
    def _activation_shorthand(cls, data: Any) -> Any:
        """`"activation": "wake_phrase"` is short for `{"mode": "wake_phrase"}`."""
        if isinstance(data, dict) and isinstance(data.get("activation"), str):
            return {**data, "activation": {"mode": data["activation"]}}
        return data


RETIRED_SECTIONS = ("chunking",)

SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation for name, field in VoiceConfig.model_fields.items()
}

# The original tool's flat moshi-config: field → (section, field), or None = ignored.
SEED_FIELDS: dict[str, tuple[str, str] | None] = {
    "stt_model_path": ("stt", "model"),
    "stt_max_seconds": ("endpointing", "max_utterance_s"),
    "stt_vad_threshold": ("endpointing", "speech_threshold"),
    "stt_vad_hits": ("endpointing", "hits"),
    "stt_silence_threshold": ("endpointing", "energy_threshold"),
    "stt_silence_ms": ("endpointing", "silence_ms"),
    "stt_min_speech_ms": ("endpointing", "min_speech_ms"),
    "stt_block_ms": ("audio", "block_ms"),
    "stt_warmup_blocks": ("endpointing", "warmup_blocks"),
    "tts_model_path": ("tts", "model"),
    "tts_voice_path": ("tts", "voice"),
    # The answer is spoken word by word as it is written: no chunks to size.
    "tts_chunk_chars": None,
    "tts_chunk_sentences": None,
    "tts_chunk_min_chars": None,
    "barge_in": ("barge_in", "enabled"),
    "enabled": None,
    "stt_config_path": None,
    "tts_config_path": None,
    "stt_silence": None,
    "tts_stream": None,
    "use_stt": ("audio", "use_stt"),
    "use_tts": ("audio", "use_tts"),
    "smoke_test": None,
    "barge_in_window_seconds": None,
}
# Fields whose value is translated rather than copied (see from_seed_layout).
SEED_SPECIAL = ("stt_vad", "quantize")


def _strip_comments(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_comments(v) for k, v in value.items() if not str(k).startswith("//")}
    if isinstance(value, list):
        return [_strip_comments(v) for v in value]
    return value


def is_seed_layout(raw: dict[str, Any]) -> bool:
    return any(k in raw for k in ("stt_model_path", "tts_model_path", "stt_block_ms"))


def from_seed_layout(raw: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """Map the original flat layout onto sections; return (data, ignored field names)."""
    data: dict[str, dict[str, Any]] = {}
    ignored = []
    for key, value in raw.items():
        if key in SEED_SPECIAL:
            continue
        if key not in SEED_FIELDS:
            raise ConfigError(f"{source}: field '{key}': not a field of the original layout")
        target = SEED_FIELDS[key]
        if target is None:
            ignored.append(key)
        elif value is not None:
            data.setdefault(target[0], {})[target[1]] = value
    if raw.get("stt_vad"):
        data.setdefault("endpointing", {})["detector"] = "silero"
    elif "stt_vad" in raw:
        data.setdefault("endpointing", {})["detector"] = "energy"
    if raw.get("quantize") is not None:
        data.setdefault("stt", {})["quantize"] = raw["quantize"]
        data.setdefault("tts", {})["quantize"] = raw["quantize"]
    return data, ignored


def parse_voice_config(raw: Any, source: str = "<voice config>") -> tuple[VoiceConfig, list[str]]:
    """Validate a config object; return it and the names of ignored fields."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    raw = _strip_comments(raw)
    ignored: list[str] = []
    if is_seed_layout(raw):
        raw, ignored = from_seed_layout(raw, source)
    # Earlier versions cut the answer into chunks for the TTS; it now takes words as they
    # come, so a config that still sizes chunks loads, with the section named as ignored.
    for old in RETIRED_SECTIONS:
        if old in raw:
            raw = {k: v for k, v in raw.items() if k != old}
            ignored.append(old)
    try:
        return VoiceConfig.model_validate(raw), ignored
    except ValidationError as e:
        raise ConfigError(error_line(source, e)) from None


def load_voice_config(path: Path | str) -> tuple[VoiceConfig, list[str]]:
    path = Path(path)
    raw = read_json(path)
    config, ignored = parse_voice_config(raw, str(path))
    seed = isinstance(raw, dict) and is_seed_layout(raw)
    return resolve_paths(config, path, seed), ignored


# The original layout's `*_path` fields are folders and files, never hub ids.
SEED_PATHS = (("stt", "model"), ("tts", "model"), ("tts", "voice"))


def resolve_paths(config: VoiceConfig, anchor: Path, seed: bool = False) -> VoiceConfig:
    """Relative file references in a config mean beside that config (if they exist there;
    in the original layout always, as that tool read them)."""
    for section, name in SEED_PATHS if seed else ():
        sec = getattr(config, section)
        value = getattr(sec, name)
        if value and not Path(value).expanduser().is_absolute():
            setattr(sec, name, str(anchor.parent.absolute() / value))
    for section, name in (
        ("llm", "profiles"),
        ("llm", "prompt_config"),
        ("llm", "model"),
        ("stt", "model"),
        ("tts", "model"),
        ("tts", "voice"),
        ("tts", "voice_repo"),
    ):
        sec = getattr(config, section)
        value = getattr(sec, name)
        if value and not Path(value).is_absolute():
            beside = anchor.parent / value
            if beside.exists():
                setattr(sec, name, str(beside))
    # Voices cloned from WAV files are kept beside the config that names them.
    cache = config.tts.voice_cache
    if cache is None or not Path(cache).expanduser().is_absolute():
        config.tts.voice_cache = str(anchor.parent.absolute() / (cache or "cloned-voices"))
    return config


def check_local_paths(config: VoiceConfig, source: str) -> None:
    """Every model and voice given as a path (absolute: a hub id never is) exists: said in
    one line before anything loads, not after the chat model and a hub's retries."""
    wanted = []
    if config.audio.use_stt:
        wanted.append(("stt", "model"))
    if config.audio.use_tts:
        wanted += [("tts", "model"), ("tts", "voice")]
    for section, name in wanted:
        value = getattr(getattr(config, section), name)
        if (
            value
            and Path(value).expanduser().is_absolute()
            and not Path(value).expanduser().exists()
        ):
            raise ConfigError(
                f"{source}: field '{section}.{name}': {value}: no such file or folder"
            )


def apply_override(config: VoiceConfig, dotted: str, value: Any) -> VoiceConfig:
    """Set `section.field` from the command line, validated like the file."""
    section, _, name = dotted.partition(".")
    if section not in SECTIONS or name not in SECTIONS[section].model_fields:
        raise ConfigError(f"--set {dotted}: no such setting")
    current = getattr(config, section).model_dump()
    # From the command line every value is text: as JSON it may be a list or null
    # (`--set barge_in.backchannels=[]`, `--endpointing-turn-model null`), tried first;
    # numbers stay text (pydantic reads "450" for an int, and "3" stays a device name).
    candidates = [value]
    if isinstance(value, str):
        with suppress(ValueError):
            parsed = json.loads(value)
            if parsed is None or isinstance(parsed, list | dict):
                candidates.insert(0, parsed)
    error = None
    for candidate in candidates:
        try:
            updated = SECTIONS[section].model_validate({**current, name: candidate})
        except ValidationError as e:
            error = error or e
            continue
        return config.model_copy(update={section: updated})
    assert error is not None
    raise ConfigError(f"{dotted}: {first_error(error)[1]}") from None


def spoken_prompt(prompt: PromptConfig, llm: LlmSection) -> PromptConfig:
    """The prompt config as voice mode uses it: the spoken style added to the developer
    instructions, and the voice default effort unless the prompt config or a flag set one."""
    updates: dict[str, Any] = {}
    if llm.spoken_style:
        parts = [prompt.developer_instructions, llm.spoken_style]
        updates["developer_instructions"] = "\n\n".join(p for p in parts if p)
    if llm.reasoning_effort and "reasoning_effort" not in prompt.model_fields_set:
        updates["reasoning_effort"] = llm.reasoning_effort
    return prompt.model_copy(update=updates)
