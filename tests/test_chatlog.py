"""Chat logs: v1 and v2 read, v1 migrated without loss, writes survive kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_harmony.llm.chatlog import Chat, ChatLog, load_chat_log, save_chat_log
from mlx_harmony.llm.errors import ConfigError
from mlx_harmony.llm.messages import ChatMessage

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


def test_v1_log_is_read_with_every_message() -> None:
    log, version = load_chat_log(DATA / "chatlog-v1.json")
    assert version == 1
    raw = json.loads((DATA / "chatlog-v1.json").read_text())
    chat = log.active()
    assert [(m.role, m.content) for m in chat.messages] == [
        (m["role"], m["content"]) for m in raw["messages"]
    ]
    assert chat.messages[0].timestamp.iso == "2025-01-07T00:00:00Z"
    assert chat.messages[1].parent_id == chat.messages[0].id
    assert chat.metadata.model_path == "models/old-model"
    assert chat.metadata.max_context_tokens == 2048


def test_v2_log_round_trips_and_keeps_unknown_fields(tmp_path: Path) -> None:
    raw = json.loads((DATA / "chatlog-v2.json").read_text())
    raw["chats"]["chat-001"]["messages"][0]["rating"] = 5
    raw["ui_theme"] = "dark"
    src = tmp_path / "log.json"
    src.write_text(json.dumps(raw))
    log, version = load_chat_log(src)
    assert version == 2
    save_chat_log(src, log)
    again = json.loads(src.read_text())
    assert again["ui_theme"] == "dark"
    assert again["chats"]["chat-001"]["messages"][0]["rating"] == 5
    assert again["chats"]["chat-001"]["messages"][1]["content"] == "Hi"


def test_hyperparameters_recorded_only_when_they_change() -> None:
    chat = ChatLog().start_chat(Chat.new("m"))
    a, b = {"temperature": 0.7}, {"temperature": 0.2}
    for hp in (a, a, b, b):
        chat.append(ChatMessage("user", "q"))
        chat.append(ChatMessage("assistant", "r", "final"), hp)
    stored = [m.hyperparameters for m in chat.messages if m.role == "assistant"]
    assert stored == [a, None, b, None]
    assert chat.metadata.last_hyperparameters == b


@pytest.mark.heavy
def test_migrate_command_keeps_a_backup_and_every_message(tmp_path: Path) -> None:
    log = tmp_path / "old.json"
    log.write_bytes((DATA / "chatlog-v1.json").read_bytes())
    cmd = [sys.executable, "-m", "mlx_harmony.llm.cli.migrate", str(log)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    assert "v1 → v2, 2 messages" in out.stdout
    backup = tmp_path / "old.json.v1.bak"
    assert backup.read_bytes() == (DATA / "chatlog-v1.json").read_bytes()
    migrated = json.loads(log.read_text())
    assert migrated["schema_version"] == 2
    (chat,) = migrated["chats"].values()
    assert [m["content"] for m in chat["messages"]] == ["Hello", "Hi"]
    again = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    assert "already schema v2" in again.stdout


def test_bad_logs_fail_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"schema_version": 7}))
    with pytest.raises(ConfigError, match="unknown chat log schema_version 7"):
        load_chat_log(path)
    path.write_text(json.dumps({"schema_version": 2, "chats": {"a": {"chat_id": "a"}}}))
    with pytest.raises(ConfigError, match=r"x\.json: field 'chats\.a\.metadata'"):
        load_chat_log(path)


WRITER = """
import sys
from mlx_harmony.llm.chatlog import Chat, ChatLog, save_chat_log
from mlx_harmony.llm.messages import ChatMessage
path = sys.argv[1]
log = ChatLog()
chat = log.start_chat(Chat.new("m"))
n = 0
while True:
    n += 1
    chat.append(ChatMessage("user", f"message {n} " + "x" * 20000))
    save_chat_log(path, log)
    print(n, flush=True)
"""


@pytest.mark.heavy
def test_kill_9_mid_write_leaves_a_whole_log(tmp_path: Path) -> None:
    """The writer is killed after its first save and then 0 to 4 saves more (whenever it
    is, however loaded the machine): the log always parses, holding the last completed
    save or the one in flight, and the next save clears the killed writers' leftovers."""
    path = tmp_path / "log.json"
    for more in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        written = [int(proc.stdout.readline()) for _ in range(more + 1)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        written += [int(n) for n in proc.stdout.read().split()]
        log, _ = load_chat_log(path)  # parses: the old or the new file, never half
        count = len(log.active().messages)
        assert written[-1] <= count <= written[-1] + 1
    save_chat_log(path, log)
    assert [p.name for p in tmp_path.iterdir()] == ["log.json"]


BAD_LOGS = {
    "folder": (None, "a folder, not a file"),
    "invalid UTF-8": (b'\xff{"messages": []}', "not UTF-8 text"),
    "deep nesting": (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too deeply"),
    "bad v1 timestamp": (
        b'{"metadata": {"created_at": "last Tuesday"}, "messages": []}',
        "timestamp 'last Tuesday': not an ISO date",
    ),
    "bad v2 timestamp": (
        json.dumps(
            {
                "schema_version": 2,
                "active_chat_id": "c",
                "chats": {
                    "c": {
                        "chat_id": "c",
                        "metadata": {
                            "chat_id": "c",
                            "created_at": {"unix": "x", "iso": 1},
                            "updated_at": 1,
                        },
                    }
                },
            }
        ).encode(),
        "field 'chats.c.metadata.created_at",
    ),
    "metadata a list": (b'{"metadata": [1, 2], "messages": []}', "'metadata': expected an object"),
    "messages an object": (
        b'{"metadata": {}, "messages": {"a": 1}}',
        "'messages': expected a list",
    ),
    "message content a number": (
        b'{"messages": [{"role": "user", "content": 5}]}',
        "field 'content': Input should be a valid string",
    ),
    "a number of 100,000 digits": (
        b'{"messages": [{"role": "user", "content": "hi", "n": ' + b"7" * 100_000 + b"}]}",
        "not valid JSON (Exceeds the limit (4300 digits) for integer string conversion",
    ),
    "a lone surrogate": (
        b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
        "text at messages[0].content is not valid Unicode (a lone surrogate",
    ),
    "another kind of JSON file": (
        b'{"profiles": {"a": {"model": "m"}}}',
        "not a chat log (no 'messages' or 'chats' in it)",
    ),
    "no chats": (
        b'{"schema_version": 2, "chats": {}, "active_chat_id": "zzz"}',
        "no chats in it (and so no active chat)",
    ),
}


@pytest.mark.parametrize("kind", BAD_LOGS)
def test_corrupt_logs_are_one_line_and_left_untouched(tmp_path: Path, kind: str) -> None:
    content, expected = BAD_LOGS[kind]
    path = tmp_path / "chat.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_chat_log(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)
    assert "\n" not in str(err.value)
    if content is not None:
        assert path.read_bytes() == content


@pytest.mark.parametrize(
    "kind",
    [
        "invalid UTF-8",
        "metadata a list",
        "bad v1 timestamp",
        "a number of 100,000 digits",
        "a lone surrogate",
    ],
)
@pytest.mark.heavy
def test_migrate_refuses_a_corrupt_log_in_one_line(tmp_path: Path, kind: str) -> None:
    content, expected = BAD_LOGS[kind]
    assert content is not None
    path = tmp_path / "chat.json"
    path.write_bytes(content)
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.llm.cli.migrate", str(path)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"error: {path}: ") and expected in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert path.read_bytes() == content and sorted(tmp_path.iterdir()) == [path]


def test_an_active_chat_id_missing_from_the_chats_falls_back_to_the_last_chat(
    tmp_path: Path,
) -> None:
    raw = json.loads((DATA / "chatlog-v2.json").read_text())
    raw["active_chat_id"] = "chat-that-is-not-there"
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(raw))
    log, _ = load_chat_log(path)
    assert log.active_chat_id == [c for c in raw["chat_order"] if c in raw["chats"]][-1]


@pytest.mark.heavy
def test_broken_v2_logs_are_repaired_with_a_note_each_and_lose_no_message(
    tmp_path: Path,
) -> None:
    import copy

    raw = json.loads((DATA / "chatlog-v2.json").read_text())
    chat = raw["chats"]["chat-001"]
    messages = chat["messages"]
    third = {**copy.deepcopy(messages[1]), "id": "msg-3", "parent_id": messages[1]["id"]}
    messages.append(third)
    other = copy.deepcopy(chat)
    other["chat_id"] = other["metadata"]["chat_id"] = "chat-002"
    raw["chats"]["chat-002"] = other
    raw["chat_order"] = ["gone", "chat-001"]  # stale, and chat-002 missing
    raw["active_chat_id"] = "chat-that-is-not-there"
    messages[1]["id"] = third["parent_id"] = messages[0]["id"]  # a duplicate id
    messages[0]["timestamp"] = "2025-01-07T00:00:05Z"
    chat["metadata"]["updated_at"] = 0  # older than its messages
    chat["metadata"]["last_hyperparameters"] = {"temperature": 9}
    messages[-1]["hyperparameters"] = {"temperature": 0.5}
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(raw))
    log, _ = load_chat_log(path)
    notes = "\n".join(log.repairs)
    for expected in (
        "ISO strings",
        "chat_order rebuilt: 1 listed chat missing (gone); 1 chat not listed (chat-002)",
        "active_chat_id 'chat-that-is-not-there'",
        "1 duplicate message ids",
        "updated_at",
        "last_hyperparameters",
    ):
        assert expected in notes, notes
    assert set(log.chat_order) == set(raw["chats"]) and log.active_chat_id in raw["chats"]
    repaired = log.chats[chat["chat_id"]]
    ids = [m.id for m in repaired.messages]
    assert len(set(ids)) == len(ids) == len(messages)
    assert [m.content for m in repaired.messages] == [m["content"] for m in messages]
    assert repaired.messages[2].parent_id == repaired.messages[1].id  # the chain holds
    assert repaired.metadata.last_hyperparameters == {"temperature": 0.5}
    assert repaired.metadata.updated_at.unix >= max(m.timestamp.unix for m in repaired.messages)
    # Repaired once, it reads clean; migrate rewrites it keeping the original.
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.llm.cli.migrate", str(path)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "repaired: " in out.stdout and (tmp_path / "chat.json.v2.bak").exists()
    assert load_chat_log(path)[0].repairs == []


def test_timestamps_written_as_iso_strings_or_numbers_are_read() -> None:
    from mlx_harmony.llm.chatlog import parse_chat_log

    raw = json.loads((DATA / "chatlog-v2.json").read_text())
    chat = raw["chats"]["chat-001"]
    chat["metadata"]["created_at"] = "2025-01-07T00:00:00Z"
    chat["metadata"]["updated_at"] = 1767225600  # 2026-01-01: after every message
    chat["messages"][0]["timestamp"] = "2025-01-07T00:00:05+00:00"
    log, _ = parse_chat_log(raw)
    active = log.chats["chat-001"]
    assert active.metadata.created_at.iso == "2025-01-07T00:00:00Z"
    assert active.metadata.updated_at.unix == 1767225600
    assert active.messages[0].timestamp.iso == "2025-01-07T00:00:05Z"


def test_a_chat_name_is_found_in_the_chats_folder(tmp_path: Path) -> None:
    from mlx_harmony.llm.cli.chat import chat_log_path

    chats = tmp_path / "chats"
    chats.mkdir()
    (chats / "trip.json").write_text("{}")
    assert chat_log_path(Path("trip"), str(chats)) == chats / "trip.json"
    assert chat_log_path(Path("trip.json"), str(chats)) == chats / "trip.json"
    assert chat_log_path(Path("new-one"), str(chats)) == chats / "new-one.json"  # created there
    assert chat_log_path(tmp_path / "x.json", str(chats)) == tmp_path / "x.json"  # a path
    assert chat_log_path(None, str(chats)).parent == chats


HOLDER = """
import sys
from mlx_harmony.llm.chatlog import hold_chat_log
hold_chat_log(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.heavy
def test_a_log_another_process_writes_is_refused_until_it_is_gone(tmp_path: Path) -> None:
    """Two processes writing one log would each save over the other's turns: the second
    chat (or migration) is refused in one line before any model loads, the log untouched;
    once the first is gone (kill -9 included), the log is free."""
    path = tmp_path / "chat.json"
    log = ChatLog()
    log.start_chat(Chat.new("m")).append(ChatMessage("user", "kept"))
    save_chat_log(path, log)
    before = path.read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        for command in (["mlx_harmony.llm.cli.chat", "--chat"], ["mlx_harmony.llm.cli.migrate"]):
            out = subprocess.run(
                [sys.executable, "-m", *command, str(path)], cwd=ROOT, capture_output=True,
                text=True, stdin=subprocess.DEVNULL, timeout=120,
            )  # fmt: skip
            assert out.returncode == 2, out.stderr
            assert out.stderr == (
                f"error: {path}: another mlx-harmony process has this chat log open "
                f"(pid {holder.pid}); quit it first, or use another chat log\n"
            )
            assert path.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.llm.cli.migrate", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and "already schema v2" in out.stdout, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]


@pytest.mark.heavy
def test_a_log_where_nothing_can_be_written_is_refused_before_loading(tmp_path: Path) -> None:
    (tmp_path / "file.json").write_text("{}")
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.llm.cli.chat",
         "--chat", str(tmp_path / "file.json" / "c.json")],
        cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {tmp_path}/file.json/c.json: cannot write a chat log")


@pytest.mark.heavy
def test_migrate_to_where_nothing_can_be_written_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "chat.json"
    src.write_bytes((DATA / "chatlog-v1.json").read_bytes())
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "o.json"
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony.llm.cli.migrate", str(src), "-o", str(target)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {target}: cannot write a chat log there")
    assert src.read_bytes() == (DATA / "chatlog-v1.json").read_bytes()
