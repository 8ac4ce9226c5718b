"""Session fixtures: the offline Harmony vocabulary and tiny models, cached by content hash.

Model folders live in ~/.cache/mlx-harmony-tests (or $MLX_HARMONY_TEST_CACHE) so that a
second run skips training; the key changes whenever tests/support/tiny_models.py does.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.tiny_models import content_key

ROOT = Path(__file__).parent.parent
CACHE = Path(os.environ.get("MLX_HARMONY_TEST_CACHE", Path.home() / ".cache" / "mlx-harmony-tests"))
BUILD_TIMEOUT_S = 1800  # a fixture's training, on a slow machine with a cold cache


def _built_once(folder: Path, marker: str, command: Callable[[Path], list[str]]) -> Path:
    """`folder`, built by the command `command(temporary folder)` unless it already holds
    `marker`. Test workers run side by side (pytest-xdist): the first one builds, under
    a lock, and the others wait for it rather than train the same model again."""
    if not (folder / marker).is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(folder.with_name(folder.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / marker).is_file():
                tmp = folder.with_name(folder.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                subprocess.run(command(tmp), check=True, cwd=ROOT, timeout=BUILD_TIMEOUT_S)
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
    return folder


def _cached(name: str, *args: str) -> Path:
    folder = CACHE / f"{name}-{content_key(name)}"
    return _built_once(
        folder, "config.json",
        lambda tmp: [sys.executable, "-m", "tests.support.tiny_models", name, str(tmp), *args],
    )  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The product's own offline path: o200k_base unpacked from the bpe-openai wheel."""
    from mlx_harmony.llm.vocab import ensure_vocab

    os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))  # chat log locks
    folder = ensure_vocab()
    assert folder is not None
    return folder


@pytest.fixture(scope="session")
def gpt_oss_path(vocab_dir: Path) -> Path:
    return _cached("gpt-oss", str(vocab_dir))


@pytest.fixture(scope="session")
def gpt_oss_python_path(vocab_dir: Path) -> Path:
    """A tiny GPT-OSS that reads note.txt with the python tool and answers from it."""
    return _cached("gpt-oss-python", str(vocab_dir))


@pytest.fixture(scope="session")
def chatml_path() -> Path:
    return _cached("chatml")


def _built_by(module: str, name: str, marker: str) -> Path:
    """A folder built by `python -m tests.support.<module> FOLDER`, cached by the hash of
    that module's source."""
    import hashlib

    src = (ROOT / "tests" / "support" / f"{module}.py").read_bytes()
    folder = CACHE / f"{name}-{hashlib.sha256(src).hexdigest()[:16]}"
    return _built_once(
        folder, marker, lambda tmp: [sys.executable, "-m", f"tests.support.{module}", str(tmp)]
    )


@pytest.fixture(scope="session")
def voice_models() -> Path:
    """Tiny Kyutai STT and TTS folders (random weights, real file layouts)."""
    return _built_by("tiny_voice", "kyutai", "tts/config.json")


@pytest.fixture(scope="session")
def pocket_model() -> Path:
    """A tiny Pocket TTS folder in mlx-audio's published layout (random weights)."""
    return _built_by("tiny_pocket", "pocket", "config.json")


@pytest.fixture(scope="session")
def pocket_synthesizer(pocket_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """Greedy, with the folder's own voice (tests compare speech)."""
    from mlx_harmony.voice.pocket_tts import PocketSynthesizer
    from tests.support.tiny_pocket import VOICE

    cache = tmp_path_factory.mktemp("cloned-voices")
    tts = PocketSynthesizer.load(str(pocket_model), VOICE, cache, temperature=0.0)
    tts.warmup()
    return tts


@pytest.fixture(scope="session")
def transcriber(voice_models: Path):
    from mlx_harmony.voice.stt import Transcriber

    stt = Transcriber.load(str(voice_models / "stt"), max_seconds=16)
    stt.warmup()
    return stt


@pytest.fixture(scope="session")
def synthesizer(voice_models: Path):
    """Greedy, so that the same text gives the same speech (tests compare lengths)."""
    from mlx_harmony.voice.tts import Synthesizer

    tts = Synthesizer.load(
        str(voice_models / "tts"), "tiny-voice", str(voice_models / "tts" / "voices"),
        temperature=0.0,
    )  # fmt: skip
    tts.warmup()
    return tts


@pytest.fixture(scope="session")
def virtual_audio():
    """A private PulseAudio server with a virtual microphone and speaker (Linux)."""
    from mlx_harmony.bench.virtual_audio import VirtualAudio, missing_tools

    if sys.platform != "linux":
        pytest.skip("virtual audio devices are built with PulseAudio (Linux)")
    missing = missing_tools()
    assert not missing, f"install {', '.join(missing)} (scripts/run does)"
    server = VirtualAudio.start()
    server.activate()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gpt_oss_engine(gpt_oss_path: Path):
    from mlx_harmony.llm.engine import Engine

    return Engine.load(str(gpt_oss_path))


@pytest.fixture
def engine(gpt_oss_engine):
    """The shared tiny GPT-OSS engine with an empty conversation cache."""
    gpt_oss_engine.reset()
    return gpt_oss_engine


@pytest.fixture(scope="session")
def chatml_engine(chatml_path: Path):
    from mlx_harmony.llm.engine import Engine

    return Engine.load(str(chatml_path))


# The live voice tests' settings: short silences, the virtual devices, quick reopening.
VOICE_TEST_SETTINGS = {
    "endpointing.silence_ms": 400,
    "endpointing.warmup_blocks": 0,
    "audio.input_device": "pulse",
    "audio.output_device": "pulse",
    "audio.reopen_seconds": 0.3,
}


def _voice_assistant(
    engine, transcriber, synthesizer, path: Path, settings: dict,
    prompt=None, hears=True, speaks=True, turn_model=False, **devices,
):  # fmt: skip
    from mlx_harmony.llm.config import PromptConfig
    from mlx_harmony.llm.session import Session
    from mlx_harmony.voice.config import VoiceConfig, apply_override
    from mlx_harmony.voice.daemon import VoiceAssistant
    from mlx_harmony.voice.vad import make_detector
    from tests.support.voice_loop import Recorder

    config = VoiceConfig()
    for key, value in settings.items():
        config = apply_override(config, key, value)
    recorder = Recorder()
    prompt = prompt or PromptConfig(sampling={"temperature": 0.0})
    session = Session(engine, prompt, path, "tiny")
    session.new_chat()
    detector = make_detector(config.endpointing, 24_000)
    scorer = None
    if turn_model:  # the real Smart Turn, from pipecat's wheel
        from mlx_harmony.voice.smart_turn import SmartTurn
        from mlx_harmony.voice.turn_scorer import TurnScorer

        scorer = TurnScorer(SmartTurn.load(), 24_000)
        scorer.warmup()
    assistant = VoiceAssistant(
        config, engine, prompt, transcriber if hears else None,
        synthesizer if speaks else None, detector, session, recorder,
        turn_scorer=scorer, **devices,
    )  # fmt: skip
    return assistant, recorder


@pytest.fixture
def make_assistant(virtual_audio, engine, transcriber, synthesizer, tmp_path: Path):
    """A VoiceAssistant on the virtual devices with the tiny models, greedy; `hears` /
    `speaks` False leave out the STT / TTS, `prompt` replaces the prompt config, and
    dotted keyword arguments override config fields."""

    def make(prompt=None, hears: bool = True, speaks: bool = True, turn_model=False, **overrides):
        path = tmp_path / "voice-chat.json"
        assistant, recorder = _voice_assistant(
            engine, transcriber, synthesizer, path, VOICE_TEST_SETTINGS | overrides,
            prompt, hears, speaks, turn_model,
        )  # fmt: skip
        return assistant, recorder, path

    return make


@dataclass
class Clocked:
    """The voice loop with the tiny models on a microphone and speaker that run on the
    test's clock (`tests.support.scripted`): no sound server, no real-time waits."""

    assistant: Any
    rec: Any
    log_path: Path
    clock: Any
    mic: Any
    speaker: Any

    def run_until(self, done: Callable[[], bool], tick: float = 0.01) -> None:
        """Step the loop, `tick` of the clock a pass, until `done` (a pass count bounds it)."""
        from tests.support.scripted import run_until

        run_until(self.assistant.step, done, self.clock, tick, limit=50_000)

    def say(self, pcm) -> None:
        """Say `pcm` into the microphone and run the loop until it is all delivered."""
        self.mic.say(pcm)
        self.run_until(lambda: not self.mic.saying)

    def serve(self, scenario: Callable[[], None], timeout: float = 120) -> None:
        """Run `scenario` in a thread (a control-socket client, say) while the loop steps
        here on the clock until it returns; its failure is raised here."""
        import threading
        import time

        errors: list[BaseException] = []

        def play() -> None:
            try:
                scenario()
            except BaseException as e:
                errors.append(e)

        helper = threading.Thread(target=play)
        helper.start()
        deadline = time.monotonic() + timeout  # a hang guard, not a timing bound
        while helper.is_alive():
            assert time.monotonic() < deadline, "the scenario never finished"
            self.assistant.step()
            self.clock.now += 0.01
        helper.join()
        if errors:
            raise errors[0]

    def run_for(self, seconds: float) -> None:
        until = self.clock.now + seconds
        self.run_until(lambda: self.clock.now >= until)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.assistant.close()

    closed: bool = False


@pytest.fixture
def clocked_assistant(engine, transcriber, synthesizer, tmp_path: Path):
    """A VoiceAssistant as `make_assistant` gives, on devices that run on the test's
    clock; opened (close it, or let the test end)."""
    from tests.support.scripted import Clock, ClockedMic, ScriptedSpeaker

    made: list[Clocked] = []

    def make(
        prompt=None, engine=engine, transcriber=transcriber, tts=synthesizer, **overrides
    ) -> Clocked:
        clock = Clock()
        mic, speaker = ClockedMic(clock), ScriptedSpeaker(clock)
        settings = {**CLOCKED_SETTINGS, **overrides}
        path = tmp_path / "voice-chat.json"
        assistant, recorder = _voice_assistant(
            engine, transcriber, tts, path, settings, prompt,
            clock=clock, sleep=clock.sleep, mic=mic, speaker=speaker,
        )  # fmt: skip
        assistant.open()
        made.append(Clocked(assistant, recorder, path, clock, mic, speaker))
        return made[-1]

    yield make
    for clocked in made:
        clocked.close()


# The clocked voice tests' settings: no echo path to cancel.
CLOCKED_SETTINGS = {
    "endpointing.silence_ms": 400,
    "endpointing.warmup_blocks": 0,
    "audio.echo_cancellation": "off",
}


@pytest.fixture(scope="session")
def speech(tmp_path_factory):
    """Test speech from espeak-ng as 24 kHz samples: `speech(text, lead_silence)`."""
    from mlx_harmony.bench.virtual_audio import read_wav, speech_wav

    folder = tmp_path_factory.mktemp("speech")
    made: dict[tuple[str, float], object] = {}

    def say(text: str, lead_silence: float = 0.0):
        if (text, lead_silence) not in made:
            made[(text, lead_silence)] = read_wav(speech_wav(text, folder, lead_silence))
        return made[(text, lead_silence)]

    return say


# ---------------------------------------------------------------------------- test tiers
# The `unit` tier: no model fixture, no audio server, no process started — what a
# developer runs on every change (`scripts/run pytest -m unit`, about a minute). A test is
# in it unless it asks for one of these fixtures (directly or through another) or is
# marked `heavy`; a unit test that starts a process anyway fails (`_no_processes`), so the
# tier cannot quietly grow slow.
HEAVY_FIXTURES = {
    "gpt_oss_path", "gpt_oss_python_path", "chatml_path", "voice_models", "virtual_audio",
    "speech", "pocket_model",
}  # fmt: skip


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: half again as many workers as cores (the `--maxprocesses` cap still
    holds). A third of the suite's time is waiting (real-time audio, processes starting,
    two ranks talking over loopback), not computing: on two cores, three workers finish
    the whole suite about a minute and a half sooner than two."""
    cores = os.cpu_count() or 1
    return max(1, cores + cores // 2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        heavy = HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))
        if not heavy and item.get_closest_marker("heavy") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _no_processes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("unit") is None:
        return
    import multiprocessing.util
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError(
            "a unit test started a process: mark it @pytest.mark.heavy (tests/conftest.py)"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", refuse)
