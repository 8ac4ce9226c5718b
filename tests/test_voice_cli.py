"""The installed commands: mlx-harmony-voice (voice, text fallback, signals) and hotmic."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_harmony.bench.virtual_audio import non_silent_seconds, read_wav, sox_stat, wait_recorded
from tests.support.tiny_voice import HEARD

ROOT = Path(__file__).parent.parent
ANSWER = "The capital of France is Paris. It is also the largest city in the country."


class Running:
    """A command whose output lines can be waited for while it runs."""

    started: list[Running] = []  # noqa: RUF012 (ended after each test, see below)

    def __init__(self, args: list[str], env: dict[str, str], stdin: str | None = None) -> None:
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
        )  # fmt: skip
        Running.started.append(self)
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line with {text!r}: {self.lines}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"exited before {text!r}: {self.lines}")
            self.lines.append(line)
            if text in line:
                return line

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code


@pytest.fixture(autouse=True)
def no_command_outlives_its_test():
    """A test that fails while its command runs must not leave it running (it would take
    the CPU from every test after it)."""
    yield
    while Running.started:
        proc = Running.started.pop().proc
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def voice_env(virtual_audio) -> dict[str, str]:
    return {**virtual_audio.env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


@pytest.fixture
def voice_config_file(tmp_path: Path, voice_models: Path, gpt_oss_path: Path) -> Path:
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps({"temperature": 0.0}))
    config = {
        "llm": {"model": str(gpt_oss_path), "prompt_config": "prompt.json"},
        "stt": {"model": str(voice_models / "stt")},
        "tts": {
            "model": str(voice_models / "tts"),
            "voice": "tiny-voice",
            "voice_repo": str(voice_models / "tts" / "voices"),
        },
        "audio": {"input_device": "pulse", "output_device": "pulse"},
        "endpointing": {"silence_ms": 400, "warmup_blocks": 0},
        "display": {"status": True},  # state lines although the output is not a terminal
    }
    path = tmp_path / "voice.json"
    path.write_text(json.dumps(config))
    return path


VOICE = [sys.executable, "-m", "mlx_harmony.voice.cli"]


def ask_aloud(virtual_audio, env, config: Path, log: Path, folder: Path) -> Running:
    """Start the voice command and ask it the question through the virtual microphone."""
    question = virtual_audio.say("What is the capital of France?", folder, lead_silence=0.3)
    run = Running([*VOICE, "--config", str(config), "--chat", str(log)], env)
    run.wait_for("Warmed up the model in")  # before it listens: kernels compile first
    run.wait_for("Listening.")
    virtual_audio.play_into_mic(question).wait()
    return run


@pytest.mark.slow
def test_voice_command_answers_aloud_and_stops_cleanly_on_sigterm(
    virtual_audio, voice_env, voice_config_file, tmp_path
) -> None:
    log = tmp_path / "chat.json"
    run = ask_aloud(virtual_audio, voice_env, voice_config_file, log, tmp_path)
    assert run.wait_for("You:") == f"You: {HEARD}"
    run.wait_for("ms after speech end")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0
    assert any(ANSWER in line for line in run.lines), "\n".join(run.lines)
    assert run.lines[-1] == f"Chat saved to {log}", "\n".join(run.lines[-60:])
    saved = json.loads(log.read_text())
    final = saved["chats"][saved["active_chat_id"]]["messages"][-1]
    assert final["content"] == ANSWER and "first_audio_ms" in final["voice_timings"]


@pytest.mark.slow
def test_the_sound_server_going_away_and_coming_back_is_survived(
    virtual_audio, voice_env, voice_config_file, tmp_path
) -> None:
    """Run as a command of its own: PortAudio's ALSA thread of a stream whose server
    vanished can be left spinning (and printing) after the stream is abandoned; here it
    ends with the process instead of running beside every later test."""
    question = virtual_audio.say("What is the capital of France?", tmp_path, lead_silence=0.3)
    log = tmp_path / "chat.json"
    run = Running([*VOICE, "--config", str(voice_config_file), "--chat", str(log)], voice_env)
    run.wait_for("Listening.")
    virtual_audio.shutdown_server()
    run.wait_for("waiting for audio device")
    virtual_audio.restart_server()
    run.wait_for("audio devices are back")
    run.wait_for("● listening")
    virtual_audio.play_into_mic(question).wait()
    assert run.wait_for("You:") == f"You: {HEARD}"
    run.wait_for("ms after speech end")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0
    # Answered in full (read from the chat log: a notice of the devices may split the
    # answer's line on the console).
    saved = json.loads(log.read_text())
    final = saved["chats"][saved["active_chat_id"]]["messages"][-1]
    assert final["content"] == ANSWER, "\n".join(run.lines)


@pytest.mark.slow
def test_sigint_while_speaking_saves_what_was_heard(
    virtual_audio, voice_env, voice_config_file, tmp_path
) -> None:
    log = tmp_path / "chat.json"
    run = ask_aloud(virtual_audio, voice_env, voice_config_file, log, tmp_path)
    run.wait_for("● speaking")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 0
    saved = json.loads(log.read_text())
    messages = saved["chats"][saved["active_chat_id"]]["messages"]
    assert messages[0]["content"] == HEARD
    assert messages[-1]["voice_timings"]["interrupted"] is True


def listening(env, config: Path, tmp_path: Path) -> tuple[Running, Path, Path]:
    """The assistant started with a chat log and a control socket of the test's own,
    once it listens; and those two paths."""
    log, sock = tmp_path / "chat.json", tmp_path / "run" / "voice.sock"
    run = Running(
        [*VOICE, "--config", str(config), "--chat", str(log), "--control-socket", str(sock)],
        env,
    )
    run.wait_for("Listening.")
    return run, log, sock


@pytest.mark.slow
def test_a_running_assistant_takes_typed_lines_and_ctl_commands(
    voice_env, voice_config_file, tmp_path
) -> None:
    run, log, sock = listening(voice_env, voice_config_file, tmp_path)
    # One assistant per socket: a second one is refused before it loads anything.
    second = subprocess.run(
        [*VOICE, "--config", str(voice_config_file), "--control-socket", str(sock)],
        env=voice_env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert second.returncode == 2
    assert second.stderr.strip() == (
        f"error: another mlx-harmony-voice is running (control socket {sock})"
    )

    def ctl(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*VOICE, "ctl", "--socket", str(sock), *words],
            env=voice_env, cwd=ROOT, capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    asked = ctl("ask", "What is the capital of France?")
    assert asked.returncode == 0 and asked.stdout.strip() == ANSWER
    run.wait_for("ms after")
    assert run.proc.stdin is not None
    run.proc.stdin.write("What is the capital of France?\n")
    run.proc.stdin.flush()
    run.wait_for("ms after")
    status = ctl("status")
    assert status.returncode == 0
    assert "state: listening" in status.stdout and f"chat log: {log}" in status.stdout
    assert f"config: {voice_config_file}" in status.stdout
    refused = ctl("say")
    assert refused.returncode == 2 and "'say' needs a non-empty 'text'" in refused.stderr
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0
    assert not sock.exists()
    saved = json.loads(log.read_text())
    messages = saved["chats"][saved["active_chat_id"]]["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "What is the capital of France?",
        "What is the capital of France?",
    ]
    gone = ctl("status")
    assert gone.returncode == 2 and gone.stderr.startswith("error: no assistant is running")


@pytest.mark.slow
def test_an_assistant_killed_mid_turn_keeps_a_whole_log_and_frees_it(
    voice_env, voice_config_file, tmp_path
) -> None:
    """kill -9 while a second typed question is answered and saved: the log parses and
    keeps the first turn, and the log is free for the next process at once."""
    run, log, _ = listening(voice_env, voice_config_file, tmp_path)
    assert run.proc.stdin is not None
    run.proc.stdin.write("What is the capital of France?\n")
    run.proc.stdin.flush()
    run.wait_for("ms after")
    deadline = time.monotonic() + 60
    while not (log.exists() and "capital" in log.read_text()):  # saved after the turn
        assert time.monotonic() < deadline, "the first turn was never saved"
        time.sleep(0.05)
    run.proc.stdin.write("What is the capital of France?\n")
    run.proc.stdin.flush()
    run.proc.kill()
    run.proc.wait()
    saved = json.loads(log.read_text())
    messages = saved["chats"][saved["active_chat_id"]]["messages"]
    assert messages[0]["content"] == "What is the capital of France?"
    assert ANSWER in [m["content"] for m in messages], run.lines  # what it said, if not
    migrated = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.llm.cli.migrate", str(log)],
        env=voice_env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert migrated.returncode == 0 and "already schema v2" in migrated.stdout


def test_with_a_log_file_errors_land_there_with_a_time(voice_env, tmp_path) -> None:
    broken = tmp_path / "voice.json"
    broken.write_text('{"endpointing": {"silence_ms": "soon"}}')
    logfile = tmp_path / "logs" / "voice.log"
    out = subprocess.run(
        [*VOICE, "--config", str(broken), "--log-file", str(logfile)],
        env=voice_env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and out.stdout == out.stderr == ""
    (line,) = logfile.read_text().splitlines()
    stamp, message = line[:19], line[20:]
    assert time.strptime(stamp, "%Y-%m-%d %H:%M:%S")
    assert message.startswith(f"error: {broken}: field 'endpointing.silence_ms'")


def test_list_voices_names_the_voices_of_the_repo(voice_env, voice_models) -> None:
    out = subprocess.run(
        [*VOICE, "--list-voices", "--tts-voice-repo", str(voice_models / "tts" / "voices")],
        env=voice_env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    kyutai, pocket = out.stdout.strip().split("\n\n")
    assert kyutai.startswith("kyutai (configured): Kyutai TTS")
    assert kyutai.splitlines()[1:] == ["  tiny-voice"]
    # The other backend's too, from its model's catalog (nothing downloaded to list them).
    assert pocket.startswith("pocket: Pocket TTS mlx-community/pocket-tts")
    assert "  alba" in pocket.splitlines()


def test_no_usable_microphone_falls_back_to_the_text_chat(
    voice_env, voice_config_file, tmp_path
) -> None:
    run = Running(
        [*VOICE, "--config", str(voice_config_file), "--chat", str(tmp_path / "c.json"),
         "--audio-input-device", "no-such-microphone"],
        voice_env, stdin="What is the capital of France?\n\\quit\n",
    )  # fmt: skip
    assert run.finish(timeout=180) == 0
    out = "\n".join(run.lines)
    assert "No usable audio device: no input device matching 'no-such-microphone'" in out
    assert "Falling back to the text chat." in out
    assert "Resumed" not in out  # a new log, not one of 0 messages
    assert ANSWER in out


def test_text_mode_needs_no_voice_models(voice_env, voice_config_file, tmp_path) -> None:
    run = Running(
        [*VOICE, "--config", str(voice_config_file), "--text", "--stt-model", "/nonexistent",
         "--chat", str(tmp_path / "c.json")],
        voice_env, stdin="What is the capital of France?\n\\quit\n",
    )  # fmt: skip
    assert run.finish(timeout=180) == 0
    assert ANSWER in "\n".join(run.lines)


def test_list_devices(voice_env) -> None:
    out = subprocess.run(
        [*VOICE, "--list-devices"], env=voice_env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "pulse" in out.stdout and "< default input, > default output" in out.stdout


# ---------------------------------------------------------------------- hotmic

HOTMIC = [sys.executable, "-m", "mlx_harmony.voice.hotmic", "--seconds", "2.5"]


def test_hotmic_says_working_when_the_microphone_hears_speech(
    virtual_audio, voice_env, tmp_path
) -> None:
    speech = virtual_audio.say("Testing, one, two, three.", tmp_path, lead_silence=0.4)
    run = Running([*HOTMIC, "--device", "pulse"], voice_env)
    run.wait_for("Listening for")
    virtual_audio.play_into_mic(speech)
    assert run.finish() == 0
    assert run.lines[-1].startswith("working: pulse works")
    assert any("dBFS" in line for line in run.lines)  # the live meter


@pytest.mark.slow
def test_hotmic_speaker_plays_a_tone_and_a_spoken_line(
    virtual_audio, voice_env, voice_config_file, tmp_path
) -> None:
    recording = tmp_path / "speaker.wav"
    recorder = virtual_audio.record_speaker(recording)
    try:
        out = subprocess.run(
            [*HOTMIC, "--speaker", "--config", str(voice_config_file)],
            env=voice_env, cwd=ROOT, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    finally:
        recorder.terminate()
        recorder.wait()
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("working: ")
    assert "played a tone and a spoken line" in out.stdout
    # The 0.4 s tone and the spoken line after it both reached the device.
    assert non_silent_seconds(read_wav(recording)) > 0.6


def test_hotmic_speaker_says_no_device(voice_env) -> None:
    out = subprocess.run(
        [*HOTMIC, "--speaker", "--no-voice", "--output-device", "hdmi-that-is-not-there"],
        env=voice_env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stdout.splitlines()[-1] == (
        "no device: no output device matching 'hdmi-that-is-not-there' (see --list-devices)"
    )


def test_hotmic_says_silent_for_a_microphone_that_delivers_zeros(voice_env) -> None:
    out = subprocess.run(
        [*HOTMIC, "--quiet"], env=voice_env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 1
    assert out.stdout.startswith("silent: ")
    assert "muted, or this program may not use it" in out.stdout


def test_hotmic_as_service_runs_the_check_under_the_service_manager(voice_env, tmp_path) -> None:
    """`systemd-run` is a script that notes its arguments and runs the command without a
    terminal (no user systemd instance runs on a test machine); the verdict and the exit
    status of the check that ran there come back."""
    fake = tmp_path / "bin" / "systemd-run"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\necho "$*" > "$CALLS"\n'
        'while [ "$1" != "--" ]; do shift; done; shift\nexec "$@" < /dev/null\n'
    )
    fake.chmod(0o755)
    env = {**voice_env, "PATH": f"{fake.parent}:{voice_env['PATH']}"}
    env["CALLS"] = str(tmp_path / "calls.txt")
    out = subprocess.run(
        [*HOTMIC, "--as-service"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stderr  # the virtual microphone delivers only zeros
    assert out.stdout.splitlines()[-1].startswith("silent: ")
    call = (tmp_path / "calls.txt").read_text()
    assert call.startswith("--user --wait --pipe --quiet --collect --unit=mlx-harmony-check-")
    assert call.rstrip().endswith("-m mlx_harmony.voice.hotmic --seconds 2.5 --quiet")


def test_hotmic_says_no_device(voice_env) -> None:
    out = subprocess.run(
        [*HOTMIC, "--quiet", "--device", "usb-mic-that-is-not-there"],
        env=voice_env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stdout.strip() == (
        "no device: no input device matching 'usb-mic-that-is-not-there' (see --list-devices)"
    )


@pytest.mark.heavy
def test_hotmic_without_any_sound_server_says_no_device(tmp_path) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path), "PULSE_RUNTIME_PATH": str(tmp_path)}
    env["PULSE_SERVER"] = f"unix:{tmp_path}/nothing-here"
    out = subprocess.run([*HOTMIC, "--quiet"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout.startswith("no device: ")


# ---------------------------------------------------------------------- raw streams


def test_speaker_plays_what_it_is_given(virtual_audio, tmp_path) -> None:
    from mlx_harmony.voice.audio_io import Speaker

    speaker = Speaker("pulse")
    speaker.open()
    recording = tmp_path / "tone.wav"
    recorder = virtual_audio.record_speaker(recording)
    try:
        wait_recorded(recording, 0.05)  # the recorder runs
        started = time.perf_counter()
        t = np.arange(24_000) / 24_000
        speaker.play((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
        while speaker.busy:
            time.sleep(0.05)
        wait_recorded(recording, time.perf_counter() - started + 0.3)  # and the latency
    finally:
        recorder.terminate()
        recorder.wait()
        speaker.close()
    assert speaker.first_sound_at is not None
    stats = sox_stat(recording)
    assert abs(stats["Rough frequency"] - 440) < 20
    assert np.abs(read_wav(recording)).max() > 0.2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "no input device matching 'nope'"),
        (99, "no audio device with index 99"),
    ],
)
def test_device_errors_are_one_line(virtual_audio, spec, message) -> None:
    from mlx_harmony.voice.audio_io import AudioError, resolve_device

    with pytest.raises(AudioError, match=message):
        resolve_device(spec, "input")


def test_a_missing_portaudio_library_is_one_line_with_the_fix(monkeypatch) -> None:
    import builtins

    from mlx_harmony.voice.audio_io import AudioError, sounddevice

    real_import = builtins.__import__

    def no_portaudio(name, *args, **kwargs):
        if name == "sounddevice":  # what sounddevice raises when libportaudio is absent
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_portaudio)
    monkeypatch.setattr("platform.system", lambda: "Linux")
    with pytest.raises(AudioError) as e:
        sounddevice()
    assert str(e.value) == (
        "the PortAudio library is missing: sudo apt install libportaudio2 (Debian/Ubuntu)"
    )


@pytest.mark.slow
def test_voice_serve_offers_the_realtime_api_and_the_page(voice_config_file) -> None:
    """`mlx-harmony-voice serve`: the HTTP server with the voice config's speech models,
    answering over /v1/realtime in words and audio, and the browser page at /."""
    import asyncio

    import httpx
    import openai

    from mlx_harmony.bench.live_server import free_port

    port, key = free_port(), "sk-serve"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [*VOICE, "serve", "--config", str(voice_config_file), "--port", str(port)]
    run = Running([*command, "--api-key", key], env)
    run.wait_for("Serving on http://")
    url = f"http://127.0.0.1:{port}"

    model = json.loads(voice_config_file.read_text())["llm"]["model"]

    async def ask() -> tuple[object, list]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        async with client.realtime.connect(model="gpt-realtime") as conn:
            refused = await conn.recv()  # a model this server does not serve, by name
        async with client.realtime.connect(model=model) as conn:
            events: list = []
            async for event in conn:
                events.append(event)
                if event.type == "session.created":
                    await conn.conversation.item.create(item={
                        "type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": HEARD}],
                    })  # fmt: skip
                    await conn.response.create()
                if event.type in ("response.done", "error"):
                    break
        return refused, events

    refused, events = asyncio.run(ask())
    assert refused.type == "error" and refused.error.code == "model_not_found"
    words = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    assert words == ANSWER, [e.type for e in events]
    assert any(e.type == "response.output_audio.delta" for e in events)
    assert 'src="/web/app.js"' in httpx.get(url + "/").text
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0


@pytest.mark.slow
def test_voice_wyoming_serves_home_assistant_until_sigterm(voice_config_file) -> None:
    import asyncio

    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info

    from mlx_harmony.bench.live_server import free_port

    uri = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = Running([*VOICE, "wyoming", "--config", str(voice_config_file), "--uri", uri], env)
    run.wait_for("Serving Wyoming on")

    async def describe() -> Info:
        async with AsyncTcpClient.from_uri(uri) as client:
            await client.write_event(Describe().event())
            event = await client.read_event()
            assert event is not None
            return Info.from_event(event)

    info = asyncio.run(describe())
    assert [v.name for p in info.tts for v in p.voices] == ["tiny-voice"]
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0


@pytest.mark.heavy
def test_help_ctl_and_service_do_not_load_the_models_code() -> None:
    """`mlx-harmony-voice --help`, `ctl` and `service` answer without importing MLX's
    language models, the speech models or the daemon (seconds of imports)."""
    check = (
        "import sys, mlx_harmony.voice.cli\n"
        "heavy = {'mlx_lm', 'transformers', 'moshi_mlx', 'mlx_harmony.voice.daemon',\n"
        "         'mlx_harmony.llm.engine'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"
