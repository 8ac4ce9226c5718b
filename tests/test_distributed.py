"""MLX distributed inference: the tiny GPT-OSS sharded over two processes on this machine
(mlx.launch, ring backend over loopback, CPU), rank 0 driving the real commands."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_harmony.llm.chatlog import load_chat_log
from tests.support.tiny_models import HARMONY_TURNS, PYTHON_FINALS, PYTHON_USER

pytestmark = pytest.mark.slow  # every test starts two ranks that load the model

BIN = Path(sys.executable).parent


def _ring_port() -> int:
    """A free port, and the one after it (the ring backend listens on one per rank)."""
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def _run(cmd: list[str], ranks: int, stdin: str = "") -> subprocess.CompletedProcess[str]:
    if ranks > 1:
        launch = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", str(ranks)]
        launch += ["--hosts", "127.0.0.1", "--starting-port", str(_ring_port()), "--"]
        cmd = [*launch, shutil.which(cmd[0], path=str(BIN)) or cmd[0], *cmd[1:]]
    else:
        cmd = [str(BIN / cmd[0]), *cmd[1:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_two_ranks_generate_exactly_what_one_process_does(gpt_oss_path: Path) -> None:
    turn = HARMONY_TURNS[1]
    cmd = ["mlx-harmony-generate", "--model", str(gpt_oss_path), "--temperature", "0"]
    cmd += ["--reasoning", "stderr", turn.user]
    one, two = _run(cmd, 1), _run(cmd, 2)
    assert one.stdout.strip() == turn.final
    assert two.stdout == one.stdout  # printed once: only rank 0 runs the command
    assert turn.analysis in two.stderr


def test_two_ranks_hold_a_multi_turn_chat(gpt_oss_path: Path, tmp_path: Path) -> None:
    """Every call rank 0 makes (reset, turns on a reused cache) is mirrored on rank 1."""
    logs = {}
    for ranks in (1, 2):
        log = tmp_path / f"chat-{ranks}.json"
        cmd = ["mlx-harmony-chat", "--model", str(gpt_oss_path), "--temperature", "0"]
        cmd += ["--chat", str(log), "--no-markdown"]
        # \quit, not end of input: mlx.launch does not pass an end of file on to rank 0.
        _run(cmd, ranks, stdin="Hello\nThanks\n\\reset\nHello\n\\quit\n")
        logs[ranks] = [
            [(m.role, m.channel, m.content) for m in chat.messages]
            for chat in load_chat_log(log)[0].chats.values()
        ]
    assert logs[2] == logs[1]
    finals = [m[2] for chat in logs[2] for m in chat if m[1] == "final"]
    assert finals == [HARMONY_TURNS[0].final, HARMONY_TURNS[3].final, HARMONY_TURNS[0].final]


def test_sampling_without_a_seed_stays_in_step(gpt_oss_path: Path) -> None:
    """Rank 0 picks each turn's seed for all ranks; were they to sample different tokens
    the run would stop with an error naming the divergence."""
    cmd = ["mlx-harmony-generate", "--model", str(gpt_oss_path), "--temperature", "1"]
    cmd += ["--max-tokens", "40", "--stats", "Hello"]
    out = _run(cmd, 2)
    assert "diverged" not in out.stderr and "40 tok" in out.stderr


def test_tools_run_on_rank_0_of_a_sharded_model(gpt_oss_python_path: Path, tmp_path: Path) -> None:
    (tmp_path / "note.txt").write_text("hello")
    cmd = ["mlx-harmony-chat", "--model", str(gpt_oss_python_path), "--temperature", "0"]
    cmd += ["--tools", "python", "--workspace", str(tmp_path), "--no-markdown"]
    cmd += ["--chat", str(tmp_path / "chat.json")]
    out = _run(cmd, 2, stdin=f"{PYTHON_USER}\n\\quit\n")
    assert "← python\n  True" in out.stdout
    assert PYTHON_FINALS[True] in out.stdout
