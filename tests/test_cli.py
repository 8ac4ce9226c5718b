"""The commands as a user runs them: chat in a pseudo-terminal, generate through pipes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from tests.support.in_process import Ran, run_command
from tests.support.tiny_models import HARMONY_TURNS

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow  # the chat runs in a pseudo-terminal, a process each
HELLO = HARMONY_TURNS[0]
FRANCE = HARMONY_TURNS[1]


def generate(*args: str, stdin: str = "") -> Ran:
    """mlx-harmony-generate, run in this process (`tests.support.in_process`)."""
    from mlx_harmony.llm.cli.generate import main

    return run_command(main, "mlx-harmony-generate", *args, stdin=stdin)


def test_generate_prints_only_the_answer(gpt_oss_path: Path) -> None:
    """As a user runs it: a process of its own, the answer on its stdout pipe."""
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.llm.cli.generate", FRANCE.user,
         "--model", str(gpt_oss_path), "--temperature", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == FRANCE.final + "\n"
    assert FRANCE.analysis not in out.stderr


def test_an_empty_turn_is_said_not_silent(gpt_oss_path: Path) -> None:
    # <|return|> forced as the first token: the model ends its turn without a message.
    args = ("--model", str(gpt_oss_path), "--temperature", "0", "--logit-bias", "200002=100")
    out = generate(FRANCE.user, *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert "(the model gave no answer: it ended its turn at once)" in out.stderr


def test_the_original_tools_options_are_taken(gpt_oss_path: Path, tmp_path: Path) -> None:
    """-p/--prompt, --profiles-file, --max-context-tokens, --lazy and --mlock as the
    original mlx-harmony spelled them: taken (renamed or unused ones with a note)."""
    args = ("--model", str(gpt_oss_path), "--temperature", "0", "--max-context-tokens", "4096")
    out = generate("-p", FRANCE.user, *args, "--lazy", "--mlock")
    assert out.returncode == 0, out.stderr
    assert out.stdout == FRANCE.final + "\n"
    assert "note: --mlock is ignored: MLX keeps the model's weights resident" in out.stderr
    small = generate("--prompt", FRANCE.user, *args[:4], "--max-context-tokens", "16")
    assert small.returncode == 2 and "max_context_tokens=16" in small.stderr
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps({"tiny": {"model": str(gpt_oss_path)}}))
    renamed = generate(HELLO.user, "--profiles-file", str(profiles), "--profile", "tiny",
                       "--temperature", "0")  # fmt: skip
    assert renamed.returncode == 0, renamed.stderr
    assert renamed.stdout == HELLO.final + "\n"
    assert "note: --profiles-file is --profiles here" in renamed.stderr


def test_server_reads_its_profiles_file_from_the_original_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlx_harmony.llm.cli.serve import main

    missing = tmp_path / "profiles.json"
    monkeypatch.setenv("MLX_HARMONY_PROFILES_FILE", str(missing))
    out = run_command(main, "mlx-harmony-server")
    assert out.returncode == 2 and out.stderr.strip() == f"error: {missing}: file not found"


def test_migrate_in_place_is_the_default_spelled_out(tmp_path: Path) -> None:
    from mlx_harmony.llm.cli.migrate import main

    log = tmp_path / "old.json"
    log.write_bytes((ROOT / "tests" / "data" / "chatlog-v1.json").read_bytes())
    out = run_command(main, "mlx-harmony-migrate-chat", "--in-place", str(log))
    assert out.returncode == 0 and "v1 → v2, 2 messages" in out.stdout
    both = run_command(
        main, "mlx-harmony-migrate-chat", "--in-place", str(log), "-o", str(tmp_path / "x.json")
    )
    assert both.returncode == 2 and "choose one" in both.stderr


def test_generate_reads_stdin_and_shows_reasoning_on_stderr(gpt_oss_path: Path) -> None:
    args = ("--model", str(gpt_oss_path), "--temperature", "0", "--reasoning", "stderr")
    out = generate(*args, "--stats", stdin=HELLO.user + "\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == HELLO.final + "\n"
    assert HELLO.analysis in out.stderr and "finish stop" in out.stderr
    # On a terminal both streams share a screen: the reasoning's line ends before the answer.
    assert out.stderr.startswith(HELLO.analysis.rstrip() + "\n"), out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hi", "--model", "/no/such/model"], "error: model /no/such/model: folder does not exist"),
        (["hi", "--top-p", "3", "--model", "x"], "error: --top-p: Input should be less than"),
        ([" ", "--model", "x"], "error: empty prompt"),
        (["hi", "--profile", "a"], "error: --profile needs --profiles FILE"),
        (["hi", "--seed", str(2**70), "--model", "x"], "error: --seed: Input should be less"),
    ],
)
def test_generate_errors_are_one_line(args: list[str], message: str) -> None:
    out = generate(*args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith(message)


def plain(screen: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", screen)


def spawn_chat(model: Path | None, log: Path, *extra: str) -> pexpect.spawn:
    named = ["--model", str(model)] if model is not None else []
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_harmony.llm.cli.chat", *named, "--chat", str(log), *extra],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )
    child.expect("You: ")
    return child


def say(child: pexpect.spawn, line: str, expect: str) -> None:
    child.sendline(line)
    child.expect_exact(expect)
    child.expect("You: ")


def test_chat_conversation_commands_save_and_resume(gpt_oss_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "chat.json"
    child = spawn_chat(gpt_oss_path, log, "--temperature", "0")
    child.sendline(HELLO.user)
    child.expect_exact(HELLO.final)
    assert HELLO.analysis in plain(child.before)  # reasoning is shown before the answer
    child.expect("You: ")
    say(child, "\\frobnicate", "Unknown command \\frobnicate")
    say(child, "\\set temperature=-1", "greater than or equal to 0")
    say(child, "\\set top_k=5", "top_k = 5")
    say(child, "\\show", "top_k: 5")
    say(child, "\\save " + str(tmp_path / "copy.json"), "Saved")
    child.sendline("\\quit")
    child.expect(pexpect.EOF)
    saved = json.loads((tmp_path / "copy.json").read_text())
    (chat,) = saved["chats"].values()
    assert [(m["role"], m.get("channel"), m["content"]) for m in chat["messages"]] == [
        ("user", None, HELLO.user),
        ("assistant", "analysis", HELLO.analysis),
        ("assistant", "final", HELLO.final),
    ]
    assert log.exists()  # autosaved after the turn, before \save moved the log

    # A new process resumes the log: the model answers "Thanks" as it learned to after
    # the greeting, which it can only do if the history came back.
    child = spawn_chat(gpt_oss_path, tmp_path / "copy.json", "--temperature", "0")
    assert "Resumed" in child.before
    say(child, "Thanks", "You are welcome!")
    say(child, "\\undo", "Removed the last exchange")
    say(child, "\\history", HELLO.final)
    child.sendeof()
    child.expect(pexpect.EOF)
    resumed = json.loads((tmp_path / "copy.json").read_text())
    (chat,) = resumed["chats"].values()
    assert len(chat["messages"]) == 3
    assert chat["metadata"]["last_model_path"] == str(gpt_oss_path)


def test_a_chat_killed_mid_turn_keeps_a_whole_log_and_frees_it(
    gpt_oss_path: Path, tmp_path: Path
) -> None:
    """kill -9 while the second turn is generated and saved: the log parses and keeps the
    first completed turn, and the next chat may open it at once (the kernel dropped the
    dead process's hold)."""
    log = tmp_path / "chat.json"
    child = spawn_chat(gpt_oss_path, log, "--temperature", "0")
    say(child, HELLO.user, HELLO.final)
    child.sendline("Thanks")
    child.expect_exact("Thanks")  # the line is in; the turn and its save are under way
    child.kill(signal.SIGKILL)
    child.wait()
    messages = json.loads(log.read_text())["chats"]
    (chat,) = messages.values()
    assert [m["content"] for m in chat["messages"][:3]] == [
        HELLO.user, HELLO.analysis, HELLO.final
    ]  # fmt: skip
    child = spawn_chat(gpt_oss_path, log, "--temperature", "0")
    assert "Resumed" in child.before
    child.sendeof()
    child.expect(pexpect.EOF)


def test_a_log_that_cannot_be_saved_keeps_the_chat_in_memory(
    gpt_oss_path: Path, tmp_path: Path
) -> None:
    """Its folder replaced by a file mid-chat: the turn is not lost, the user is told,
    and \\save PATH puts the whole conversation elsewhere."""
    folder = tmp_path / "logs"
    folder.mkdir()
    child = spawn_chat(gpt_oss_path, folder / "chat.json", "--temperature", "0")
    folder.rmdir()
    folder.write_text("now a file")
    child.sendline(HELLO.user)
    child.expect_exact(HELLO.final)
    child.expect_exact("kept in memory")
    child.expect("You: ")
    say(child, "\\save " + str(tmp_path / "rescued.json"), "Saved")
    child.sendline("\\quit")
    child.expect(pexpect.EOF)
    (chat,) = json.loads((tmp_path / "rescued.json").read_text())["chats"].values()
    assert [m["content"] for m in chat["messages"]] == [HELLO.user, HELLO.analysis, HELLO.final]


def test_resuming_a_log_brings_back_its_model_prompt_config_and_settings(
    gpt_oss_path: Path, tmp_path: Path
) -> None:
    log, prompt = tmp_path / "chat.json", tmp_path / "prompt.json"
    prompt.write_text(json.dumps({"assistant_name": "Dave"}))
    child = spawn_chat(
        gpt_oss_path, log, "--prompt-config", str(prompt), "--temperature", "0", "--top-k", "7"
    )
    child.sendline(HELLO.user)
    child.expect_exact(HELLO.final)
    child.expect("You: ")
    child.sendline("\\quit")
    child.expect(pexpect.EOF)

    child = spawn_chat(None, log, "--top-k", "9")  # no model named: the log's
    resumed = plain(child.before)
    assert f"model {gpt_oss_path}" in resumed
    assert f"You said: {HELLO.user}" in resumed and f"Dave: {HELLO.final}" in resumed
    child.sendline("\\show")
    child.expect("You: ")
    shown = plain(child.before)
    assert "temperature: 0.0" in shown  # from the log
    assert "top_k: 9" in shown  # the command line wins
    # A path longer than the line is folded onto the next one (the terminal's width).
    assert str(prompt) in re.sub(r"\s*\r\n", "", shown)
    child.sendeof()
    child.expect(pexpect.EOF)


def test_thinking_is_plain_text_with_no_markdown(gpt_oss_path: Path, tmp_path: Path) -> None:
    child = spawn_chat(gpt_oss_path, tmp_path / "chat.json", "--temperature", "0")
    for styled in (True, False):  # markdown (the default), then \markdown off
        child.sendline(HELLO.user)
        child.expect_exact(HELLO.final)
        thinking = child.before[child.before.index(HELLO.user) + len(HELLO.user) :]
        assert HELLO.analysis in plain(thinking)
        assert ("\x1b[" in thinking) is styled, repr(thinking)
        child.expect("You: ")
        if styled:
            say(child, "\\markdown off", "markdown off")
            say(child, "\\reset", "New chat")  # the same question, in a fresh chat
    child.sendline("\\quit")
    child.expect(pexpect.EOF)


def test_a_paste_and_a_quoted_block_are_each_one_message(
    gpt_oss_path: Path, tmp_path: Path
) -> None:
    log = tmp_path / "chat.json"
    child = spawn_chat(gpt_oss_path, log, "--temperature", "0", "--max-tokens", "4")
    child.send("pasted line one\npasted line two\npasted line three\n")  # arrives at once
    child.expect("You: ")
    child.sendline('"""')
    child.sendline("inside a block")
    child.sendline('and its end"""')
    child.expect("You: ")
    child.sendline("q")  # the original's way out
    child.expect(pexpect.EOF)
    (chat,) = json.loads(log.read_text())["chats"].values()
    users = [m["content"] for m in chat["messages"] if m["role"] == "user"]
    assert users == [
        "pasted line one\npasted line two\npasted line three",
        "inside a block\nand its end",
    ]


def test_answers_carry_the_assistants_name_and_are_cut_for_display(
    gpt_oss_path: Path, tmp_path: Path
) -> None:
    prompt = tmp_path / "prompt.json"
    prompt.write_text(
        json.dumps({"assistant_name": "Dave", "truncate_response": 12, "temperature": 0})
    )
    log = tmp_path / "chat.json"
    child = spawn_chat(gpt_oss_path, log, "--prompt-config", str(prompt), "--no-markdown")
    child.sendline(FRANCE.user)
    child.expect_exact(f"Dave: {FRANCE.final[:12]} …")
    child.expect_exact(f"[{len(FRANCE.final) - 12} more characters in the log]")
    child.expect("You: ")
    child.sendline("\\quit")
    child.expect(pexpect.EOF)
    saved = json.loads(log.read_text())
    (chat,) = saved["chats"].values()
    assert chat["messages"][-1]["content"] == FRANCE.final  # the log keeps all of it


def test_chats_lists_the_chats_of_a_log_and_switches(gpt_oss_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "chat.json"
    child = spawn_chat(gpt_oss_path, log, "--temperature", "0", "--no-markdown")
    say(child, HELLO.user, HELLO.final)
    say(child, "\\new", "New chat.")
    say(child, FRANCE.user, FRANCE.final)
    child.sendline("\\chats")
    child.expect_exact(f"3 messages  {HELLO.user[:50]}")
    child.expect_exact(f"3 messages  {FRANCE.user[:50]}")
    child.expect("You: ")
    say(child, "\\chats 1", "Continuing chat-")
    say(child, "\\history", HELLO.final)
    say(child, "\\chats 7", "no chat '7' in this log")
    child.sendline("\\quit")
    child.expect(pexpect.EOF)
    saved = json.loads(log.read_text())
    assert saved["active_chat_id"] == saved["chat_order"][0]


def test_ctrl_c_stops_the_answer_not_the_program(gpt_oss_path: Path, tmp_path: Path) -> None:
    # Forbid the stop tokens so that the answer would run on for a long time.
    endless = ["--temperature", "0", "--logit-bias", "200002=-1000", "--logit-bias", "200012=-1000"]
    child = spawn_chat(
        gpt_oss_path, tmp_path / "c.json", "--max-tokens", "100000", "--no-markdown", *endless
    )
    child.sendline(FRANCE.user)
    child.expect("thinking")
    child.sendintr()
    child.expect_exact("(stopped)", timeout=30)
    child.expect("You: ")
    say(child, "\\reasoning off", "reasoning hidden")
    child.sendline("\\quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_resumes_an_original_v1_log(gpt_oss_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "old.json"
    log.write_bytes((ROOT / "tests" / "data" / "chatlog-v1.json").read_bytes())
    child = spawn_chat(gpt_oss_path, log, "--temperature", "0", "--max-tokens", "5")
    recap = plain(child.before)
    assert "You said: Hello" in recap and "Assistant: Hi" in recap  # its replies too
    say(child, "\\history", "Hi")
    child.sendline("\\quit")
    child.expect(pexpect.EOF)
    assert (tmp_path / "old.json.v1.bak").read_bytes() == (
        ROOT / "tests" / "data" / "chatlog-v1.json"
    ).read_bytes()
    assert json.loads(log.read_text())["schema_version"] == 2


def test_chat_reports_a_turn_it_cannot_generate_and_carries_on(
    gpt_oss_path: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "p.json"
    cfg.write_text(
        json.dumps({"max_context_tokens": 256, "sampling": {"temperature": 0, "max_tokens": 100}})
    )
    cmd = [
        sys.executable, "-m", "mlx_harmony.llm.cli.chat", "--model", str(gpt_oss_path),
        "--prompt-config", str(cfg), "--chat", str(tmp_path / "c.json"), "--no-markdown",
    ]  # fmt: skip
    too_long = " ".join(["word"] * 400)
    out = subprocess.run(
        cmd, input=f"{too_long}\n\\undo\n{HELLO.user}\n", capture_output=True, text=True,
        cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "error: max_context_tokens=256: the prompt needs" in out.stdout
    assert HELLO.final in out.stdout


def test_the_debug_log_holds_every_prompt_and_raw_response(
    gpt_oss_path: Path, tmp_path: Path
) -> None:
    debug = tmp_path / "debug.log"
    args = ("--model", str(gpt_oss_path), "--temperature", "0", "--debug-file", str(debug))
    out = generate(FRANCE.user, *args, "--debug-tokens", "both")
    assert out.returncode == 0, out.stderr
    text = debug.read_text()
    prompt = text.split("--- prompt ---\n")[1].split("\n--- response ---")[0]
    response = text.split("--- response ---\n")[1].split("\n--- prompt ids ---")[0]
    assert prompt.startswith("<|start|>system<|message|>")
    assert prompt.endswith(f"<|start|>user<|message|>{FRANCE.user}<|end|><|start|>assistant")
    assert response.startswith("<|channel|>analysis<|message|>")
    assert f"<|channel|>final<|message|>{FRANCE.final}<|return|>" in response
    ids = text.split("--- response ids ---\n")[1].split()
    assert ids[-1] == "200002"  # <|return|>
    again = generate(HELLO.user, *args)  # appended, without ids this time
    assert again.returncode == 0
    assert debug.read_text().count("--- prompt ---") == 2
    assert debug.read_text().count("--- prompt ids ---") == 1


def test_token_id_lists_are_read_as_lists() -> None:
    from mlx_harmony.llm.cli.generate import build_parser

    parse = build_parser().parse_args
    assert parse(["hi", "--xtc-special-tokens", "12"]).xtc_special_tokens == [12]
    assert parse(["hi", "--xtc-special-tokens", "1,2"]).xtc_special_tokens == [1, 2]


def test_convert_dialogue_adds_example_dialogues_to_a_prompt_config(tmp_path: Path) -> None:
    from mlx_harmony.llm.cli.convert_dialogue import main
    from mlx_harmony.llm.config import load_prompt_config

    text = tmp_path / "dialogue.txt"
    text.write_text(
        "User: Hello, who are you?\nDave: I'm Dave,\nat your service.\n\n"
        "user: Thanks!\nASSISTANT: You are welcome.\n"
    )
    config = tmp_path / "prompt.json"
    config.write_text(json.dumps({"assistant_name": "Dave", "temperature": 0.3}))
    cmd = (main, "mlx-harmony-convert-dialogue", str(text))
    out = run_command(*cmd, "--assistant-name", "Dave", "--prompt-config", str(config))
    assert out.returncode == 0, out.stderr
    assert "added 2 dialogues (4 turns)" in out.stdout
    prompt = load_prompt_config(config)
    assert [[(m.role, m.content) for m in d] for d in prompt.example_dialogues] == [
        [("user", "Hello, who are you?"), ("assistant", "I'm Dave,\nat your service.")],
        [("user", "Thanks!"), ("assistant", "You are welcome.")],
    ]
    assert json.loads(config.read_text())["temperature"] == 0.3  # the rest kept as it was
    text.write_text("Hello there\nUser: hi\n")
    bad = run_command(*cmd)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {text}:1: a dialogue starts with a speaker " + (
        "('user:', 'assistant:')"
    )


def test_commands_set_mlx_cuda_defaults_and_keep_the_users(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every command sets them before MLX's first use (MLX reads each once): cuDNN
    attention off, compiled kernels kept under the user's cache folder, per MLX version;
    a value the user exported wins."""
    from importlib.metadata import version

    from mlx_harmony.llm.cli.common import run_main

    monkeypatch.delenv("MLX_CUDA_USE_CUDNN_SDPA", raising=False)
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seen: dict[str, str | None] = {}

    def body() -> int:
        seen.update(
            {k: os.environ.get(k) for k in ("MLX_CUDA_USE_CUDNN_SDPA", "MLX_PTX_CACHE_DIR")}
        )
        return 0

    with pytest.raises(SystemExit):
        run_main(body)
    assert seen == {
        "MLX_CUDA_USE_CUDNN_SDPA": "0",
        "MLX_PTX_CACHE_DIR": str(tmp_path / "mlx-harmony" / "mlx" / version("mlx") / "ptx"),
    }
    monkeypatch.setenv("MLX_CUDA_USE_CUDNN_SDPA", "1")
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "/srv/kernels")
    with pytest.raises(SystemExit):
        run_main(body)
    assert seen == {"MLX_CUDA_USE_CUDNN_SDPA": "1", "MLX_PTX_CACHE_DIR": "/srv/kernels"}


def test_cudnn_attention_is_read_as_mlx_reads_it() -> None:
    """On unless set to 0 (MLX's default): the TTS warms cuDNN's per-shape graphs only
    where MLX will build them."""
    from mlx_harmony.llm.mlx_env import cudnn_attention

    assert cudnn_attention({}) and cudnn_attention({"MLX_CUDA_USE_CUDNN_SDPA": "1"})
    assert not cudnn_attention({"MLX_CUDA_USE_CUDNN_SDPA": "0"})
