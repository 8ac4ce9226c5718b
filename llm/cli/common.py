"""What every command shares: model/profile/config options, sampling overrides, errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_origin

from pydantic import ValidationError

from mlx_harmony.llm import mlx_env
from mlx_harmony.llm.config import (
    PromptConfig,
    RemoteConfig,
    SamplingParams,
    ignored_fields,
    load_profiles,
    load_prompt_config,
)
from mlx_harmony.llm.debug_log import DebugLog
from mlx_harmony.llm.debug_log import default_path as default_debug_path
from mlx_harmony.llm.errors import ConfigError, HarmonyError, first_error
from mlx_harmony.llm.tools.config import BrowserToolConfig, PythonToolConfig, ToolsConfig

if TYPE_CHECKING:
    from rich.console import Console

    from mlx_harmony.llm.session import Opened

DEFAULT_MODEL = "mlx-community/gpt-oss-20b-MXFP4-Q8"


class Renamed(argparse.Action):
    """An option the original mlx-harmony spelled differently: taken, with a one-line note."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        if option_string != self.option_strings[0]:
            print(f"note: {option_string} is {self.option_strings[0]} here", file=sys.stderr)
        setattr(namespace, self.dest, values)


class Unused(argparse.Action):
    """An option of the original mlx-harmony that does nothing here: accepted, and said so."""

    def __init__(self, *args: Any, why: str, **kwargs: Any) -> None:
        super().__init__(*args, nargs=0, **kwargs)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        print(f"note: {option_string} is ignored: {self.why}", file=sys.stderr)


def _token_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected token ids such as 11,12") from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and prompt")
    g.add_argument(
        "--model", help=f"Hugging Face repo id or local folder (default {DEFAULT_MODEL})"
    )
    g.add_argument("--profile", help="profile name from --profiles")
    g.add_argument(
        "--profiles",
        "--profiles-file",
        action=Renamed,
        type=Path,
        help="profiles JSON: name → model + prompt_config",
    )
    g.add_argument("--prompt-config", type=Path, help="prompt config JSON")
    g.add_argument(
        "--max-context-tokens", type=int, metavar="N", help="override the config's context limit"
    )
    g.add_argument("--lazy", action="store_true", default=None, help="load weights lazily")
    d = parser.add_argument_group("debug log")
    d.add_argument(
        "--debug",
        action="store_true",
        help=f"write every prompt and raw response to {default_debug_path()}",
    )
    d.add_argument("--debug-file", type=Path, metavar="PATH", help="…to this file instead")
    d.add_argument("--debug-tokens", choices=["in", "out", "both"], help="…with the token ids too")
    g.add_argument(
        "--mlock",
        action=Unused,
        why="MLX keeps the model's weights resident (wired on Apple silicon) by itself",
        help=argparse.SUPPRESS,
    )
    g.add_argument(
        "--remote",
        metavar="URL",
        help="generate on this OpenAI-compatible server (base URL ending in /v1); "
        "--model names the server's model",
    )
    g.add_argument(
        "--reasoning-effort", choices=["low", "medium", "high"], help="override the config's"
    )
    t = parser.add_argument_group("tools (GPT-OSS models; override the config's)")
    t.add_argument(
        "--tools",
        metavar="LIST",
        help="comma-separated built-in tools to enable: python, browser, apply_patch; or none",
    )
    t.add_argument(
        "--workspace", type=Path, help="folder the python tool runs in and apply_patch edits"
    )
    s = parser.add_argument_group("sampling (override the prompt config)")
    for name, field in SamplingParams.model_fields.items():
        if name == "logit_bias":
            s.add_argument("--logit-bias", metavar="ID=BIAS", action="append", default=None)
            continue
        kind = get_args(field.annotation) or (field.annotation,)
        typ = next(t for t in kind if t is not type(None))
        if get_origin(typ) is list:  # token ids: "1,2" or "12"
            s.add_argument(f"--{name.replace('_', '-')}", type=_token_ids, metavar="ID,ID")
        elif typ is bool:
            s.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction)
        else:
            s.add_argument(f"--{name.replace('_', '-')}", type=typ, metavar=typ.__name__.upper())


@dataclass
class Setup:
    model: str
    prompt: PromptConfig
    prompt_path: Path | None
    remote: RemoteConfig | None = None  # generate on this server instead of loading the model
    debug: DebugLog | None = None  # --debug: every prompt and response of the model


def resolve(args: argparse.Namespace, warn: Callable[[str], None]) -> Setup:
    """Model reference and prompt config from a profile, files and flags (flags win)."""
    model, prompt_path = args.model, args.prompt_config
    if args.profile:
        if not args.profiles:
            raise ConfigError("--profile needs --profiles FILE")
        profiles = load_profiles(args.profiles)
        if args.profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"{args.profiles}: no profile '{args.profile}' (known: {known})")
        profile = profiles[args.profile]
        model = model or profile.model
        if profile.prompt_config and not prompt_path:
            prompt_path = Path(profile.prompt_config)
    prompt = load_prompt_config(prompt_path) if prompt_path else PromptConfig()
    if prompt_path:
        for name in ignored_fields(prompt_path):
            warn(f"{prompt_path}: field '{name}' is not used by mlx-harmony and is ignored")
    if args.profile and profiles[args.profile].max_context_tokens and not prompt.max_context_tokens:
        prompt = prompt.model_copy(
            update={"max_context_tokens": profiles[args.profile].max_context_tokens}
        )
    if args.profile and profiles[args.profile].tools is not None:
        prompt = prompt.model_copy(update={"tools": profiles[args.profile].tools})
    if args.reasoning_effort:
        prompt = prompt.model_copy(update={"reasoning_effort": args.reasoning_effort})
    if getattr(args, "max_context_tokens", None):
        prompt = prompt.model_copy(update={"max_context_tokens": args.max_context_tokens})
    if getattr(args, "lazy", None):
        prompt = prompt.model_copy(update={"lazy": True})
    prompt = prompt.model_copy(update={"tools": apply_tool_flags(prompt.tools, args)})
    prompt = prompt.model_copy(update={"sampling": apply_overrides(prompt.sampling, args)})
    remote = profiles[args.profile].remote if args.profile else None
    if getattr(args, "remote", None):
        try:
            remote = RemoteConfig.model_validate(
                {**(remote.model_dump() if remote else {}), "base_url": args.remote}
            )
        except ValidationError:
            raise ConfigError(f"--remote {args.remote!r}: expected an http(s):// URL") from None
    debug = None
    if (
        getattr(args, "debug", False)
        or getattr(args, "debug_file", None)
        or getattr(args, "debug_tokens", None)
    ):
        debug = DebugLog(args.debug_file or default_debug_path(), args.debug_tokens)
    return Setup(model or DEFAULT_MODEL, prompt, prompt_path, remote, debug)


def apply_tool_flags(tools: ToolsConfig, args: argparse.Namespace) -> ToolsConfig:
    """`--tools a,b` enables exactly those tools (keeping their configured limits)."""
    updates: dict[str, Any] = {}
    if getattr(args, "tools", None) is not None:
        names = {n.strip() for n in args.tools.split(",") if n.strip()} - {"none"}
        unknown = names - {"python", "browser", "apply_patch"}
        if unknown:
            raise ConfigError(
                f"--tools: unknown tool '{sorted(unknown)[0]}' "
                "(known: python, browser, apply_patch)"
            )
        updates["python"] = (tools.python or PythonToolConfig()) if "python" in names else None
        updates["browser"] = (tools.browser or BrowserToolConfig()) if "browser" in names else None
        updates["apply_patch"] = "apply_patch" in names
    if getattr(args, "workspace", None) is not None:
        updates["workspace"] = str(args.workspace)
    return tools.model_copy(update=updates) if updates else tools


def apply_overrides(sampling: SamplingParams, args: argparse.Namespace) -> SamplingParams:
    updates: dict[str, Any] = {}
    for name in SamplingParams.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            updates[name] = value
    if updates.get("logit_bias") is not None:
        updates["logit_bias"] = parse_logit_bias(updates["logit_bias"])
    try:
        return SamplingParams.model_validate({**sampling.model_dump(), **updates})
    except ValidationError as e:
        where, msg = first_error(e)
        flag = where.replace("_", "-").replace(".", "-")  # as typed: --top-p
        raise ConfigError(f"--{flag}: {msg}") from None


def parse_logit_bias(items: list[str]) -> dict[int, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise ConfigError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS") from None
        if not sep:
            raise ConfigError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS")
    return out


def run_main(body: Callable[[], int | None]) -> None:
    """Run a command; a user error is one line on stderr and exit status 2."""
    mlx_env.configure()  # before MLX's first use, which reads them once
    try:
        sys.exit(body() or 0)
    except HarmonyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except KeyboardInterrupt:  # Ctrl-C: what was printed stays, no traceback
        sys.stdout.flush()
        print(file=sys.stderr)
        sys.exit(130)


def show_opened(opened: Opened, console: Console) -> None:
    """What reading a log found: its repairs, and where an old or repaired log was kept."""
    for note in opened.repairs:
        console.print(f"[yellow]repaired:[/] {opened.path}: {note}")
    if opened.backup:
        console.print(f"[dim]v{opened.version} log: kept the original as {opened.backup}[/]")
