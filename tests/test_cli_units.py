"""What the commands say and leave behind, without a model: notices, exits, file modes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_harmony.llm.cli.common import run_main
from mlx_harmony.llm.debug_log import DebugLog
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.messages import ChatMessage, GenerationStats, TurnDone, empty_turn_notice


def _done(finish: str, *messages: ChatMessage) -> TurnDone:
    stats = GenerationStats(12, 0, 30, 0.1, None, 1.0, 0.1)
    return TurnDone(finish, messages, tuple(range(30)), stats)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("finish", "notice"),
    [
        ("stop", "(the model gave no answer: it ended its turn at once)"),
        ("length", "(no answer: the model wrote 30 tokens, its limit, before it wrote a message;"),
        ("cancelled", "(no answer: stopped before the model wrote a message)"),
    ],
)
def test_an_empty_turn_says_why_it_is_empty(finish: str, notice: str) -> None:
    said = empty_turn_notice(_done(finish))
    assert said is not None and said.startswith(notice)
    assert empty_turn_notice(_done(finish, ChatMessage("assistant", "hi", "final"))) is None


def test_ctrl_c_ends_a_command_with_130_and_no_traceback(capsys) -> None:
    def body() -> int:
        print("half an answ", end="")
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as out:
        run_main(body)
    assert out.value.code == 130
    printed = capsys.readouterr()
    assert printed.out == "half an answ" and "Traceback" not in printed.err


def test_the_debug_log_is_private_like_the_chat_logs(tmp_path: Path) -> None:
    """It holds whole prompts: 0600, and an older 0644 one is narrowed."""
    old = tmp_path / "old.log"
    old.write_text("earlier\n")
    old.chmod(0o644)
    for path in (tmp_path / "new.log", old):
        DebugLog(path).write([1], [2], lambda ids: str(ids), "m")
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert old.read_text().startswith("earlier\n")


def test_a_debug_log_that_cannot_be_written_is_one_line_at_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"debug log .*/file/debug\.log: cannot write it"):
        DebugLog(tmp_path / "file" / "debug.log")
