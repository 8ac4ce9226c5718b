"""Prompt configs, sampling parameters and profiles: pydantic models read from JSON.

Every load error becomes one `ConfigError` line naming the file, the field and the reason.
Files written for the original mlx-harmony are read as they are; fields it had that this
engine does not use are listed in IGNORED_FIELDS and reported, not rejected.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlx_harmony.llm.errors import ConfigError, error_line
from mlx_harmony.llm.tools.config import ToolsConfig

# Fields of the original tool's prompt config that have no effect here.
IGNORED_FIELDS = frozenset({"mlock", "logs_dir"})


# MLX's random seed is an unsigned 64-bit number.
MAX_SEED = 2**64 - 1


class SamplingParams(BaseModel):
    """Generation settings; defaults are GPT-OSS's recommended ones."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, le=1)
    top_k: int = Field(0, ge=0)
    min_tokens_to_keep: int = Field(1, ge=1)
    xtc_probability: float = Field(0.0, ge=0, le=1)
    xtc_threshold: float = Field(0.1, ge=0, le=0.5)
    xtc_special_tokens: list[int] | None = None  # besides the format's stop tokens
    repetition_penalty: float = Field(1.0, gt=0)
    repetition_context_size: int = Field(20, ge=1)
    # OpenAI's additive penalties over the answer so far: once per token seen (presence),
    # or per occurrence (frequency).
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    max_tokens: int = Field(1024, ge=1)
    seed: int | None = Field(None, le=MAX_SEED)  # negative: a random seed each run
    reseed_each_turn: bool = False

    @field_validator("seed", mode="before")
    @classmethod
    def _negative_seed_means_random(cls, v: Any) -> Any:
        return None if isinstance(v, int) and v < 0 else v


SAMPLING_FIELDS = frozenset(SamplingParams.model_fields)


class ExampleMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str


class PromptConfig(BaseModel):
    """What the model is told before the conversation, and how it samples by default."""

    model_config = ConfigDict(extra="forbid")

    system_model_identity: str | None = None
    reasoning_effort: Literal["low", "medium", "high"] = "medium"
    conversation_start_date: str | None = "<|DATE|>"
    knowledge_cutoff: str | None = "2024-06"
    developer_instructions: str | None = None
    assistant_greeting: str | None = None
    assistant_name: str = "Assistant"
    user_name: str = "User"
    example_dialogues: list[list[ExampleMessage]] = Field(default_factory=list)
    placeholders: dict[str, str] = Field(default_factory=dict)
    max_context_tokens: int | None = Field(None, ge=256)
    truncate_thinking: int | None = Field(None, ge=0)
    truncate_response: int | None = Field(None, ge=0)
    chats_dir: str | None = None
    lazy: bool = False
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    tools: ToolsConfig = Field(default_factory=ToolsConfig)

    @field_validator("reasoning_effort", mode="before")
    @classmethod
    def _lowercase_effort(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    def expand(self, text: str | None, now: datetime | None = None) -> str | None:
        """Fill `<|DATE|>`-style placeholders (any case, as the original tool did) and
        user-defined `{name}` ones."""
        if text is None:
            return None
        now = now or datetime.now().astimezone()
        utc = now.astimezone(UTC)
        names = {"assistant": self.assistant_name, "user": self.user_name, **self.placeholders}
        folded = {k.lower(): v for k, v in names.items()}
        times = {
            "DATE": now.strftime("%Y-%m-%d"),
            "DATETIME": now.strftime("%Y-%m-%d %H:%M"),
            "TIME": now.strftime("%H:%M"),
            "TIMEA": now.strftime("%I:%M %p").lstrip("0"),  # 12-hour clock, AM/PM
            "TIMEZ": now.strftime("%H:%M %Z"),
            "TIMEU": utc.strftime("%H:%M"),
        }

        def angle(m: re.Match[str]) -> str:
            key = m.group(1)
            return times.get(key.upper()) or folded.get(key.lower()) or m.group(0)

        text = re.sub(r"<\|([A-Za-z_]+)\|>", angle, text)
        return re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: names.get(m[1], m[0]), text)


class RemoteConfig(BaseModel):
    """A profile's `remote` section: generation on an OpenAI-compatible server."""

    model_config = ConfigDict(extra="forbid")
    base_url: str = Field(pattern=r"^https?://")  # e.g. http://gpu-box:8000/v1
    api_key_env: str | None = None  # name of the environment variable holding the key
    timeout_s: float = Field(120.0, gt=0)  # longest wait for the next piece of the answer
    connect_timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(3, ge=0, le=10)  # reconnects before any output arrived
    backoff_s: float = Field(0.5, ge=0)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str  # a Hugging Face repo id or folder; with `remote`, the server's model name
    prompt_config: str | None = None
    max_context_tokens: int | None = Field(None, ge=256)
    tools: ToolsConfig | None = None  # replaces the prompt config's tools
    remote: RemoteConfig | None = None


def read_json(path: Path) -> Any:
    """A JSON file's value; anything wrong with the file is one ConfigError naming it."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config or a log") from None
    except ValueError as e:  # int(): more digits than Python converts (4,300)
        raise ConfigError(f"{path}: not valid JSON ({str(e).split(';')[0]})") from None
    where = _lone_surrogate(value)
    if where is not None:
        raise ConfigError(
            f"{path}: text at {where or 'the top'} is not valid Unicode (a lone surrogate escape "
            "such as \\ud800): it could be neither shown nor saved"
        )
    return value


def _lone_surrogate(value: Any) -> str | None:
    """Where a string holds an unpaired surrogate (JSON's \\udXXX escapes allow one, UTF-8
    cannot hold it: printing or saving it fails), as a dotted path; None if nowhere."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                key = f"{where}.{k}" if where else str(k)
                if not _encodes(str(k)):
                    return where or "a key"
                stack.append((v, key))
        elif isinstance(item, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(item)]
        elif isinstance(item, str) and not _encodes(item):
            return where
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_prompt_config(raw: dict[str, Any], source: str = "<prompt config>") -> PromptConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    data = {k: v for k, v in raw.items() if k not in IGNORED_FIELDS}
    # Sampling fields may sit at the top level (the original tool's layout) or nested.
    flat = {k: data.pop(k) for k in list(data) if k in SAMPLING_FIELDS}
    if flat:
        nested = data.get("sampling", {})
        if not isinstance(nested, dict):
            raise ConfigError(f"{source}: field 'sampling': expected an object")
        data["sampling"] = {**flat, **nested}
    try:
        return PromptConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(error_line(source, e)) from None


def load_prompt_config(path: Path | str) -> PromptConfig:
    return parse_prompt_config(read_json(Path(path)), str(path))


def ignored_fields(path: Path | str) -> list[str]:
    raw = read_json(Path(path))
    return sorted(k for k in raw if k in IGNORED_FIELDS) if isinstance(raw, dict) else []


def load_profiles(path: Path | str) -> dict[str, Profile]:
    path = Path(path)
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object of profile name → profile")
    profiles = {}
    for name, entry in raw.items():
        try:
            profile = Profile.model_validate(entry)
        except ValidationError as e:
            raise ConfigError(error_line(f"{path}: profile '{name}'", e)) from None
        if profile.prompt_config:
            profile.prompt_config = str(_resolve_beside(path, profile.prompt_config))
        profiles[name] = profile
    return profiles


def _resolve_beside(anchor: Path, ref: str) -> Path:
    """A relative path in a config means beside that config, else the working folder."""
    p = Path(ref).expanduser()
    if p.is_absolute():
        return p
    beside = anchor.parent / p
    return beside if beside.exists() or not p.exists() else p
