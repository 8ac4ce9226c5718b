"""Chat logs on disk: a versioned JSON container, read in its v1 and v2 forms, written as v2.

Schema v2 is the original mlx-harmony's (chats keyed by id, `chat_order`, `active_chat_id`,
messages with `id`/`parent_id`/`cache_key`, `{unix, iso}` timestamps, hyperparameters on a
message only when they changed) plus `channel`/`recipient`/`name` on messages. Unknown
fields are kept, so a newer file survives a round trip through this version. Every write
is atomic (llm.files); `keep_backup` saves a v1 file before it is first overwritten.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from mlx_harmony.llm.config import read_json
from mlx_harmony.llm.errors import ConfigError, error_line
from mlx_harmony.llm.files import atomic_write_bytes, atomic_write_json
from mlx_harmony.llm.messages import ChatMessage

SCHEMA_VERSION = 2


class Stamp(BaseModel):
    unix: float
    iso: str

    @classmethod
    def at(cls, unix: float) -> Stamp:
        iso = datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")
        return cls(unix=unix, iso=iso)

    @classmethod
    def parse(cls, value: Any) -> Stamp:
        if isinstance(value, dict):
            return cls.model_validate(value)
        if isinstance(value, int | float):
            return cls.at(float(value))
        if isinstance(value, str):
            try:
                when = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise ConfigError(f"timestamp {value[:40]!r}: not an ISO date") from None
            return cls.at(when.timestamp())
        return cls.at(time.time())


def _stamp(value: Any) -> Any:
    """Timestamps as the original tool also wrote them: ISO strings or Unix numbers."""
    return value if isinstance(value, dict | Stamp) else Stamp.parse(value)


class LogMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    parent_id: str | None = None
    cache_key: str | None = None
    role: Literal["system", "developer", "user", "assistant", "tool"]
    channel: Literal["analysis", "commentary", "final"] | None = None
    recipient: str | None = None
    name: str | None = None
    content: str
    timestamp: Stamp
    hyperparameters: dict[str, Any] | None = None

    _timestamp = field_validator("timestamp", mode="before")(_stamp)


class ChatMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    chat_id: str
    model_path: str | None = None
    prompt_config_path: str | None = None
    last_model_path: str | None = None
    last_prompt_config_path: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    last_hyperparameters: dict[str, Any] = Field(default_factory=dict)
    max_context_tokens: int | None = None
    created_at: Stamp
    updated_at: Stamp

    _stamps = field_validator("created_at", "updated_at", mode="before")(_stamp)


class Chat(BaseModel):
    model_config = ConfigDict(extra="allow")
    chat_id: str
    metadata: ChatMetadata
    messages: list[LogMessage] = Field(default_factory=list)

    @classmethod
    def new(cls, model_path: str | None = None, prompt_config_path: str | None = None) -> Chat:
        chat_id = f"chat-{uuid.uuid4().hex[:12]}"
        now = Stamp.at(time.time())
        meta = ChatMetadata(
            chat_id=chat_id,
            model_path=model_path,
            prompt_config_path=prompt_config_path,
            last_model_path=model_path,
            last_prompt_config_path=prompt_config_path,
            created_at=now,
            updated_at=now,
        )
        return cls(chat_id=chat_id, metadata=meta)

    def history(self) -> list[ChatMessage]:
        return [
            ChatMessage(m.role, m.content, m.channel, m.recipient, m.name, m.timestamp.unix)
            for m in self.messages
        ]

    def append(
        self,
        msg: ChatMessage,
        hyperparameters: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Add a message; hyperparameters are stored only when they differ from the last.

        `extra` adds fields of the caller's own (voice mode stores per-turn timings).
        """
        parent = self.messages[-1].id if self.messages else None
        msg_id = f"msg-{len(self.messages) + 1}"
        while any(m.id == msg_id for m in self.messages):
            msg_id = f"msg-{uuid.uuid4().hex[:8]}"
        changed = None
        if hyperparameters is not None and hyperparameters != self.metadata.last_hyperparameters:
            changed = dict(hyperparameters)
            self.metadata.last_hyperparameters = dict(hyperparameters)
            self.metadata.hyperparameters = self.metadata.hyperparameters or dict(hyperparameters)
        self.messages.append(
            LogMessage(
                id=msg_id,
                parent_id=parent,
                cache_key=msg_id,
                role=msg.role,
                channel=msg.channel,
                recipient=msg.recipient,
                name=msg.name,
                content=msg.content,
                timestamp=Stamp.at(msg.created_at),
                hyperparameters=changed,
                **(extra or {}),
            )
        )
        self.metadata.updated_at = Stamp.at(time.time())

    def truncate(self, count: int) -> None:
        """Keep the first `count` messages (undo, retry)."""
        del self.messages[count:]
        self.metadata.updated_at = Stamp.at(time.time())


class ChatLog(BaseModel):
    model_config = ConfigDict(extra="allow")
    schema_version: Literal[2] = SCHEMA_VERSION
    chat_order: list[str] = Field(default_factory=list)
    active_chat_id: str | None = None
    chats: dict[str, Chat] = Field(default_factory=dict)
    # What was repaired when the log was read (one line each), for the caller to show.
    _repairs: list[str] = PrivateAttr(default_factory=list)

    @property
    def repairs(self) -> list[str]:
        return self._repairs

    def active(self) -> Chat:
        if self.active_chat_id not in self.chats:
            raise ConfigError("chat log has no active chat")
        return self.chats[self.active_chat_id]  # type: ignore[index]

    def start_chat(self, chat: Chat) -> Chat:
        self.chats[chat.chat_id] = chat
        self.chat_order.append(chat.chat_id)
        self.active_chat_id = chat.chat_id
        return chat

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _v1_to_v2(raw: dict[str, Any]) -> ChatLog:
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ConfigError("'metadata': expected an object")
    if not isinstance(raw["messages"], list):
        raise ConfigError("'messages': expected a list")
    created = Stamp.parse(meta.get("created_at", time.time()))
    chat = Chat.new(meta.get("model"), meta.get("prompt_config"))
    chat.metadata.created_at = created
    chat.metadata.max_context_tokens = meta.get("max_context_tokens")
    extra = {
        k: v
        for k, v in meta.items()
        if k
        not in {
            "model",
            "prompt_config",
            "hyperparameters",
            "max_context_tokens",
            "created_at",
            "updated_at",
        }
    }
    for key, value in extra.items():
        setattr(chat.metadata, key, value)
    for i, m in enumerate(raw.get("messages") or []):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"messages[{i}]: needs 'role' and 'content'")
        stamp = Stamp.parse(m.get("timestamp", created.unix))
        msg = ChatMessage(m["role"], m["content"], m.get("channel"), created_at=stamp.unix)
        chat.append(msg, m.get("hyperparameters"))
    if meta.get("hyperparameters"):
        chat.metadata.hyperparameters = meta["hyperparameters"]
    chat.metadata.updated_at = Stamp.parse(meta.get("updated_at", created.unix))
    log = ChatLog()
    log.start_chat(chat)
    return log


def parse_chat_log(raw: Any, source: str = "<chat log>") -> tuple[ChatLog, int]:
    """Return the log and the schema version it was written in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: not a chat log (expected a JSON object)")
    version = raw.get("schema_version", 1)
    try:
        if version == 1 and "messages" in raw:
            return _v1_to_v2(raw), 1
        if version == SCHEMA_VERSION:
            log = ChatLog.model_validate(raw)
            if not log.chats:
                raise ConfigError("no chats in it (and so no active chat)")
            log._repairs = [*_iso_stamp_notes(raw), *repair(log)]
            return log, SCHEMA_VERSION
    except ValidationError as e:
        raise ConfigError(error_line(source, e)) from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:  # a value of the wrong kind deep inside
        raise ConfigError(f"{source}: not a valid chat log ({e})") from None
    if "schema_version" not in raw and "chats" not in raw:
        raise ConfigError(f"{source}: not a chat log (no 'messages' or 'chats' in it)")
    raise ConfigError(f"{source}: unknown chat log schema_version {version!r}")


def _iso_stamp_notes(raw: dict[str, Any]) -> list[str]:
    chats = raw.get("chats") if isinstance(raw.get("chats"), dict) else {}
    count = sum(
        1
        for chat in chats.values()
        if isinstance(chat, dict)
        for m in chat.get("messages") or []
        if isinstance(m, dict) and isinstance(m.get("timestamp"), str)
    )
    return [f"{count} message timestamps were ISO strings: now {{unix, iso}}"] if count else []


def repair(log: ChatLog) -> list[str]:
    """Mend what the original tool's logs can hold broken, as it did; one note per
    repair. Nothing is dropped: every message stays."""
    notes = []
    order = [c for c in dict.fromkeys(log.chat_order) if c in log.chats]
    by_age = sorted(log.chats, key=lambda c: log.chats[c].metadata.created_at.unix)
    order += [c for c in by_age if c not in order]
    if order != log.chat_order:
        notes.append(f"chat_order rebuilt: {_order_problems(log)}")
        log.chat_order = order
    if log.active_chat_id not in log.chats:
        notes.append(
            f"active_chat_id {log.active_chat_id!r} is not among the chats: "
            f"the latest, {order[-1]!r}, is active"
        )
        log.active_chat_id = order[-1]
    for chat_id, chat in log.chats.items():
        notes += [f"chat {chat_id}: {n}" for n in _repair_chat(chat)]
    return notes


def _order_problems(log: ChatLog) -> str:
    """What was wrong with a log's chat_order, in words."""
    gone = [c for c in dict.fromkeys(log.chat_order) if c not in log.chats]
    unlisted = [c for c in log.chats if c not in log.chat_order]
    twice = len(log.chat_order) - len(set(log.chat_order))
    parts = []
    if gone:
        parts.append(f"{_count(len(gone), 'listed chat')} missing ({', '.join(gone[:3])})")
    if unlisted:
        parts.append(f"{_count(len(unlisted), 'chat')} not listed ({', '.join(unlisted[:3])})")
    if twice:
        parts.append(f"{_count(twice, 'chat')} listed twice")
    return "; ".join(parts) or "out of order"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _repair_chat(chat: Chat) -> list[str]:
    notes = []
    seen: set[str] = set()
    renamed = 0
    previous: tuple[str, str] | None = None  # the last message's (old id, new id)
    for m in chat.messages:
        if previous is not None and m.parent_id == previous[0]:
            m.parent_id = previous[1]  # the chain follows the message that was renamed
        old = m.id
        if m.id in seen:
            new = f"msg-{uuid.uuid4().hex[:8]}"
            if m.cache_key == m.id:
                m.cache_key = new
            m.id, renamed = new, renamed + 1
        seen.add(m.id)
        previous = (old, m.id)
    if renamed:
        notes.append(f"{renamed} duplicate message ids given new ones")
    meta = chat.metadata
    newest = max((m.timestamp.unix for m in chat.messages), default=meta.created_at.unix)
    if meta.updated_at.unix < newest:
        meta.updated_at = Stamp.at(newest)
        notes.append("updated_at was older than its newest message: set to it")
    last = next((m.hyperparameters for m in reversed(chat.messages) if m.hyperparameters), None)
    if last is not None and last != meta.last_hyperparameters:
        meta.last_hyperparameters = dict(last)
        notes.append("last_hyperparameters differed from its last message's: set to them")
    return notes


def load_chat_log(path: Path | str) -> tuple[ChatLog, int]:
    return parse_chat_log(read_json(Path(path)), str(path))


def keep_backup(path: Path | str, version: int, repaired: bool = False) -> Path | None:
    """Before a log in an older schema (or one that was repaired) is overwritten, keep it
    beside as `.v<N>.bak`."""
    path = Path(path)
    backup = path.with_name(f"{path.name}.v{version}.bak")
    if (version == SCHEMA_VERSION and not repaired) or backup.exists() or not path.exists():
        return None
    atomic_write_bytes(backup, path.read_bytes())
    return backup


def save_chat_log(path: Path | str, log: ChatLog) -> None:
    atomic_write_json(Path(path), log.to_json())


# Logs this process holds: path → the descriptor of its lock file (flock is per open file,
# so this process must not lock a log twice).
_held: dict[Path, int] = {}


def _lock_path(path: Path) -> Path:
    """The log's lock file: in the user's state folder, named after the log's real path,
    so that the folder of logs holds logs only."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:32]
    return state / "mlx-harmony" / "locks" / f"{digest}.lock"


def hold_chat_log(path: Path | str) -> None:
    """Claim the log for this process until `release_chat_log` or its exit (kill -9
    included: the kernel drops the lock). Two processes writing one log would each save
    their own conversation over the other's, losing turns: the second is refused here,
    before it loads anything. A log that could not be written at all is refused too."""
    path = Path(path).expanduser().absolute()
    if path in _held:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(
            f"{path}: cannot write a chat log there (a part of its folder is a file)"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot write a chat log there ({e.strerror or e})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: cannot write a chat log there (permission denied)")
    lock = _lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise ConfigError(
            f"{path}: another mlx-harmony process has this chat log open{who}; "
            "quit it first, or use another chat log"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = fd


def release_chat_log(path: Path | str) -> None:
    fd = _held.pop(Path(path).expanduser().absolute(), None)
    if fd is not None:
        os.close(fd)  # the lock file stays: removing it would race with a new holder
