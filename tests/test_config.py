"""Prompt configs and profiles: the original tool's files load; bad ones fail in one line."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mlx_harmony.llm.config import ignored_fields, load_profiles, load_prompt_config
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.harmony import HarmonyFormat
from mlx_harmony.llm.messages import ChatMessage

DATA = Path(__file__).parent / "data"
NOW = datetime(2026, 11, 25, 14, 30, tzinfo=timezone(timedelta(hours=1), "CET"))


def test_original_prompt_config_loads_with_sampling_defaults() -> None:
    cfg = load_prompt_config(DATA / "prompt-config.example.json")
    assert cfg.reasoning_effort == "medium"
    assert cfg.sampling.temperature == 0.8 and cfg.sampling.top_k == 40
    assert cfg.sampling.seed is None  # -1 meant random
    assert cfg.max_context_tokens == 4096
    assert ignored_fields(DATA / "prompt-config.example.json") == ["logs_dir", "mlock"]


def test_placeholders_expand() -> None:
    cfg = load_prompt_config(DATA / "prompt-config.example.json")
    identity = cfg.expand(cfg.system_model_identity, NOW)
    assert (
        identity == "You are Dave (also Dave) on 2026-11-25 at 14:30 CET (local time, 13:30 UTC)."
    )
    assert (
        cfg.expand(cfg.developer_instructions, NOW) == "Address the user as Morgan and be concise."
    )
    assert (
        cfg.expand("<|DATETIME|> {unknown} <|NOPE|>", NOW) == "2026-11-25 14:30 {unknown} <|NOPE|>"
    )
    # Any case, as the original tool matched them; and its <|TIME|> and <|TIMEA|>.
    assert cfg.expand("<|date|> <|User|> <|TIME|> <|timea|>", NOW) == (
        "2026-11-25 Morgan 14:30 2:30 PM"
    )


def test_prompt_config_reaches_the_harmony_prompt(vocab_dir: Path) -> None:
    cfg = load_prompt_config(DATA / "prompt-config.example.json")
    fmt = HarmonyFormat()
    text = fmt.encoding.decode(fmt.render(cfg, [ChatMessage("user", "Hi")], NOW))
    assert "You are Dave (also Dave) on 2026-11-25" in text
    assert "Reasoning: medium" in text
    assert "Knowledge cutoff: 2025-01" in text
    assert "Current date: 2026-11-25" in text
    assert "Address the user as Morgan and be concise." in text
    assert "What's the weather like?" in text  # example dialogues come first


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"temperature": -0.5}, "field 'sampling.temperature': Input should be greater"),
        ({"reasoning_effort": "extreme"}, "field 'reasoning_effort'"),
        ({"top_k": "many"}, "field 'sampling.top_k'"),
        ({"colour": "blue"}, "field 'colour': Extra inputs are not permitted"),
        (
            {"example_dialogues": [[{"role": "robot", "content": "x"}]]},
            "example_dialogues.0.0.role",
        ),
    ],
)
def test_bad_field_names_file_and_field(tmp_path: Path, patch: dict, expected: str) -> None:
    raw = json.loads((DATA / "prompt-config.example.json").read_text())
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps({**raw, **patch}))
    with pytest.raises(ConfigError) as err:
        load_prompt_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "a folder, not a file"),
        (b"\xff\xfe{}", "not UTF-8 text (byte 0)"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"temperature": 0.5, "sampling": 5}', "field 'sampling': expected an object"),
        (b'{"sampling": [1, 2]}', "field 'sampling': Input should be a valid dictionary"),
        (b'{"sampling": {"seed": 1180591620717411303424}}', "field 'sampling.seed'"),
        (b'{"placeholders": "city"}', "field 'placeholders'"),
        (b"null", "expected a JSON object"),
    ],
)
def test_odd_config_files_are_one_line_and_left_as_they_are(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "prompt.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_prompt_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg
    if content is not None:
        assert path.read_bytes() == content


def test_broken_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"temperature": 0.5,,}')
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON \(line 1"):
        load_prompt_config(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_prompt_config(tmp_path / "none.json")


def test_profiles_resolve_prompt_config_beside_the_file(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "p.json").write_text("{}")
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps({"small": {"model": "~/m", "prompt_config": "configs/p.json"}}))
    loaded = load_profiles(profiles)
    assert loaded["small"].prompt_config == str(tmp_path / "configs" / "p.json")
    profiles.write_text(json.dumps({"small": {"modle": "x"}}))
    with pytest.raises(ConfigError, match="profile 'small': field 'model'"):
        load_profiles(profiles)


def test_original_profiles_file_loads() -> None:
    profiles = load_profiles(DATA / "profiles.example.json")
    assert profiles["gpt-oss-20b"].max_context_tokens == 131072


def _resolve(tmp_path: Path, *argv: str):
    from mlx_harmony.llm.cli.common import add_model_options, resolve

    parser = __import__("argparse").ArgumentParser()
    add_model_options(parser)
    return resolve(parser.parse_args(list(argv)), lambda w: None)


def test_tools_in_a_prompt_config_and_their_one_line_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps({"tools": {"python": True, "apply_patch": True}}))
    tools = load_prompt_config(cfg).tools
    assert tools.python is not None and tools.python.timeout_s == 30 and tools.apply_patch
    assert tools.browser is None and tools.enabled
    cfg.write_text(json.dumps({"tools": {"browser": {"backend": "folder"}}}))
    with pytest.raises(ConfigError, match=r"p\.json: field 'tools\.browser': .*needs 'folder'"):
        load_prompt_config(cfg)
    cfg.write_text(json.dumps({"tools": {"python": {"timeout_s": 0}}}))
    with pytest.raises(ConfigError, match=r"field 'tools\.python\.timeout_s': .*greater than 0"):
        load_prompt_config(cfg)


def test_tool_flags_and_profile_tools(tmp_path: Path) -> None:
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps({"tools": {"python": {"timeout_s": 5}}}))
    setup = _resolve(tmp_path, "--prompt-config", str(cfg), "--tools", "python,apply_patch")
    assert setup.prompt.tools.python.timeout_s == 5  # the configured limits are kept
    assert setup.prompt.tools.apply_patch and setup.prompt.tools.browser is None
    assert not _resolve(
        tmp_path, "--prompt-config", str(cfg), "--tools", "none"
    ).prompt.tools.enabled
    with pytest.raises(ConfigError, match="--tools: unknown tool 'calc'"):
        _resolve(tmp_path, "--tools", "python,calc")
    profiles = tmp_path / "profiles.json"
    profiles.write_text(
        json.dumps({"p": {"model": "m", "prompt_config": "p.json", "tools": {"browser": True}}})
    )
    tools = _resolve(tmp_path, "--profiles", str(profiles), "--profile", "p").prompt.tools
    assert tools.browser is not None and tools.python is None  # the profile's replace them


def test_remote_profiles(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.json"
    remote = {"base_url": "http://gpu:8000/v1", "api_key_env": "K"}
    profiles.write_text(json.dumps({"big": {"model": "openai/gpt-oss-120b", "remote": remote}}))
    setup = _resolve(tmp_path, "--profiles", str(profiles), "--profile", "big")
    assert setup.remote is not None and setup.remote.base_url == "http://gpu:8000/v1"
    assert setup.model == "openai/gpt-oss-120b"
    flag = _resolve(
        tmp_path, "--profiles", str(profiles), "--profile", "big", "--remote", "https://x/v1"
    )
    assert flag.remote.base_url == "https://x/v1" and flag.remote.api_key_env == "K"
    with pytest.raises(ConfigError, match="--remote 'gpu:8000': expected an http"):
        _resolve(tmp_path, "--remote", "gpu:8000")
    profiles.write_text(json.dumps({"big": {"model": "m", "remote": {"base_url": "gpu"}}}))
    with pytest.raises(ConfigError, match=r"profile 'big': field 'remote\.base_url'"):
        load_profiles(profiles)
