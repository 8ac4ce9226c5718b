"""Voice configs: shipped examples, the original layout, one-line errors, overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.voice.cli import FLAG_SECTIONS, build_parser, voice_config
from mlx_harmony.voice.config import SECTIONS, VoiceConfig, apply_override, load_voice_config

ROOT = Path(__file__).parent.parent
SEED = ROOT.parent / "shared" / "data" / "seed-configs" / "moshi-config.example.json"


@pytest.mark.parametrize("path", sorted((ROOT / "audio_configs").glob("*.json")), ids=str)
def test_shipped_configs_load(path: Path) -> None:
    config, ignored = load_voice_config(path)
    assert ignored == []
    assert isinstance(config, VoiceConfig)


def test_default_example_spells_out_every_default() -> None:
    config, _ = load_voice_config(ROOT / "audio_configs" / "default.json")
    defaults = VoiceConfig()
    defaults.llm.model = config.llm.model  # the example names the default chat model
    # Voices cloned from WAV files are kept beside the config that names them.
    assert config.tts.voice_cache == str(ROOT.absolute() / "audio_configs" / "cloned-voices")
    defaults.tts.voice_cache = config.tts.voice_cache
    assert config == defaults


def test_each_tts_backend_brings_its_own_model_and_voice(tmp_path: Path) -> None:
    from mlx_harmony.voice.config import (
        DEFAULT_POCKET_TTS,
        DEFAULT_POCKET_VOICE,
        DEFAULT_TTS,
        DEFAULT_VOICE,
    )

    pocket = apply_override(VoiceConfig(), "tts.backend", "pocket").tts
    assert (pocket.model, pocket.voice) == (DEFAULT_POCKET_TTS, DEFAULT_POCKET_VOICE)
    assert VoiceConfig().tts.voice == DEFAULT_VOICE
    back = apply_override(VoiceConfig(tts={"backend": "pocket"}), "tts.backend", "kyutai").tts
    assert back.model == DEFAULT_TTS
    # What the user named stays: a WAV beside the config, the cache where they want it.
    (tmp_path / "me.wav").write_bytes(b"RIFF")
    path = tmp_path / "voice.json"
    path.write_text(
        json.dumps({"tts": {"backend": "pocket", "voice": "me.wav", "voice_cache": "kept"}})
    )
    config, _ = load_voice_config(path)
    assert config.tts.model == DEFAULT_POCKET_TTS
    assert config.tts.voice == str(tmp_path / "me.wav")
    assert config.tts.voice_cache == str(tmp_path.absolute() / "kept")


def test_a_kyutai_only_setting_with_pocket_tts_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "voice.json"
    path.write_text(json.dumps({"tts": {"backend": "pocket", "codebooks": 16}}))
    with pytest.raises(ConfigError) as e:
        load_voice_config(path)
    assert "field 'tts'" in str(e.value) and "codebooks: Pocket TTS has no codebooks" in str(
        e.value
    )
    assert "\n" not in str(e.value)


def test_the_original_moshi_config_is_read_and_its_unused_fields_named(tmp_path: Path) -> None:
    raw = json.loads(SEED.read_text()) if SEED.exists() else None
    if raw is None:
        pytest.skip("../shared/data is not beside this checkout")
    path = tmp_path / "moshi-config.json"
    path.write_text(json.dumps(raw))
    config, ignored = load_voice_config(path)
    # Its *_path fields are folders beside it, as the original read them: never hub ids.
    assert config.stt.model == str(tmp_path / raw["stt_model_path"])
    assert config.tts.voice == str(tmp_path / raw["tts_voice_path"])
    assert config.endpointing.silence_ms == raw["stt_silence_ms"]
    assert config.endpointing.energy_threshold == raw["stt_silence_threshold"]
    assert "tts_chunk_chars" in ignored  # the answer is spoken word by word now
    assert config.stt.quantize == config.tts.quantize == raw["quantize"]
    assert config.barge_in.enabled == raw["barge_in"]
    assert config.endpointing.detector == ("silero" if raw["stt_vad"] else "energy")
    assert "smoke_test" in ignored and "barge_in_window_seconds" in ignored


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"endpointing": {"silence_ms": "soon"}}, "field 'endpointing.silence_ms'"),
        ({"endpointing": {"detector": "psychic"}}, "field 'endpointing.detector'"),
        ({"tts": {"voise": "x"}}, "field 'tts.voise': Extra inputs are not permitted"),
        ({"stt": {"quantize": 3}}, "field 'stt.quantize'"),
        ({"stt_model_path": "m", "stt_silense_ms": 3}, "field 'stt_silense_ms'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_configs_name_the_file_and_field(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "voice.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as e:
        load_voice_config(path)
    assert str(path) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_invalid_json_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "voice.json"
    path.write_text('{"stt": {"model": "x",}}')
    with pytest.raises(ConfigError, match=r"voice\.json: not valid JSON \(line 1"):
        load_voice_config(path)


def test_relative_model_paths_are_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "models" / "stt").mkdir(parents=True)
    path = tmp_path / "voice.json"
    path.write_text(json.dumps({"stt": {"model": "models/stt"}, "tts": {"model": "org/repo"}}))
    config, _ = load_voice_config(path)
    assert config.stt.model == str(tmp_path / "models" / "stt")
    assert config.tts.model == "org/repo"  # not a folder there: a repo id stays as it is


def test_a_chunking_section_of_earlier_versions_loads_and_is_named_ignored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "voice.json"
    path.write_text(json.dumps({"chunking": {"min_chars": 30}, "barge_in": {"enabled": True}}))
    config, ignored = load_voice_config(path)
    assert ignored == ["chunking"] and config.barge_in.enabled


def test_every_field_can_be_overridden_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "voice.json"
    path.write_text(json.dumps({"endpointing": {"silence_ms": 900}}))
    args = build_parser().parse_args(
        [
            "--config", str(path), "--endpointing-silence-ms", "450", "--barge-in-enabled",
            "--audio-input-device", "3", "--set", "tts.voice=alba",
            "--set", "tts.padding_between=2", "--endpointing-turn-model", "null",
            "--set", "barge_in.backchannels=[]", "--endpointing-hold-words", '["and", "um"]',
        ]
    )  # fmt: skip
    config, _ = voice_config(args)
    assert config.endpointing.silence_ms == 450
    assert config.barge_in.enabled is True
    assert config.audio.input_device == "3"
    assert config.tts.voice == "alba"
    assert config.tts.padding_between == 2
    assert config.endpointing.turn_model is None  # JSON's null and lists, as in the file
    assert config.barge_in.backchannels == [] and config.endpointing.hold_words == ["and", "um"]
    fields = {f"{s}.{n}" for s, sec in VoiceConfig.model_fields.items() if s != "llm"
              for n in sec.annotation.model_fields}  # fmt: skip
    help_text = build_parser().format_help()
    for dotted in fields:
        assert "--" + dotted.replace(".", "-").replace("_", "-") in help_text


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("endpointing.silence", "3", "--set endpointing.silence: no such setting"),
        ("nothing.at_all", "3", "no such setting"),
        ("endpointing.hits", "0", "endpointing.hits: Input should be greater than or equal to 1"),
    ],
)
def test_bad_overrides_are_one_line_errors(dotted: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        apply_override(VoiceConfig(), dotted, value)
    assert message in str(e.value)


@pytest.mark.heavy
def test_the_command_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "voice.json"
    path.write_text(json.dumps({"barge_in": {"enabled": "maybe"}}))
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.voice.cli", "--config", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {path}: field 'barge_in.enabled': Input should be a valid boolean, "
        "unable to interpret input"
    ]


def test_voice_mode_speaks_plainly_and_thinks_briefly_unless_told_otherwise(
    tmp_path: Path,
) -> None:
    from mlx_harmony.llm.config import PromptConfig, load_prompt_config
    from mlx_harmony.voice.config import LlmSection, spoken_prompt

    plain = spoken_prompt(PromptConfig(developer_instructions="Be kind."), LlmSection())
    assert plain.developer_instructions.startswith("Be kind.\n\nYou are speaking with the user")
    assert "markdown" in plain.developer_instructions and plain.reasoning_effort == "low"
    chosen = tmp_path / "prompt.json"
    chosen.write_text(json.dumps({"reasoning_effort": "high"}))
    assert spoken_prompt(load_prompt_config(chosen), LlmSection()).reasoning_effort == "high"
    flag = PromptConfig().model_copy(update={"reasoning_effort": "medium"})  # --reasoning-effort
    assert spoken_prompt(flag, LlmSection()).reasoning_effort == "medium"
    off = spoken_prompt(PromptConfig(), LlmSection(spoken_style=None, reasoning_effort=None))
    assert off.developer_instructions is None and off.reasoning_effort == "medium"


@pytest.mark.heavy
def test_the_original_config_with_its_models_missing_is_one_line_before_anything_loads(
    tmp_path: Path,
) -> None:
    """Its relative model folders are not there: said at once (no hub retries, no chat
    model loaded first), naming the field and where it was looked for."""
    if not SEED.exists():
        pytest.skip("../shared/data is not beside this checkout")
    path = tmp_path / "moshi-config.json"
    path.write_text(SEED.read_text())
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.voice.cli", "--config", str(path), "--no-control"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        f"error: {path}: field 'stt.model': {tmp_path}/models/stt-2.6b-en-mlx: "
        "no such file or folder"
    )
    assert "Loading" not in out.stdout


def test_every_config_flag_says_its_type_default_and_meaning() -> None:
    """--help is generated from the config model: no bare VALUE, no flag without help."""
    actions = {a.dest: a for a in build_parser()._actions}
    for section in FLAG_SECTIONS:
        for name, field in SECTIONS[section].model_fields.items():
            action = actions[f"cfg__{section}__{name}"]
            assert action.metavar != "VALUE", (section, name)
            assert action.help and "(default: " in action.help, (section, name, action.help)
            assert field.description and field.description in action.help, (section, name)
    silence = actions["cfg__endpointing__silence_ms"]
    assert silence.metavar == "INT" and silence.help.endswith("(default: 700)")
    assert actions["cfg__endpointing__detector"].metavar == "{energy,silero}"
    assert actions["cfg__tts__codebooks"].metavar == "auto|INT"  # a word or a number


def test_servers_name_a_voice_file_without_its_folders(tmp_path: Path) -> None:
    from mlx_harmony.voice.config import TtsSection

    assert TtsSection(voice=str(tmp_path / "me.wav"), backend="pocket").voice_name == "me"
    kyutai = TtsSection(voice="expresso/ex03.wav")  # a name in the voice repo stays whole
    assert kyutai.voice_name == "expresso/ex03.wav"
