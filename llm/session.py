"""The conversation as it is kept: a chat log on disk (read with its repairs and a backup of
an old format, written whole), the chat active in it, that chat's tools, the greeting that
opens a chat, and each turn recorded.

The text chat and the voice daemon each hold one and show what it returns: it prints
nothing and knows nothing of terminals or audio."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_harmony.llm.backends import ChatEngine
from mlx_harmony.llm.chatlog import Chat, ChatLog, keep_backup, load_chat_log, save_chat_log
from mlx_harmony.llm.config import PromptConfig
from mlx_harmony.llm.messages import ChatMessage
from mlx_harmony.llm.tools.toolbox import Toolbox, conversation_workspace


@dataclass(frozen=True)
class Opened:
    """What reading a log found: the repairs made (one line each) and, for a log of an
    older format or a repaired one, where the original was kept."""

    path: Path
    version: int
    repairs: tuple[str, ...] = ()
    backup: Path | None = None


class Session:
    """One chat log and its active chat, for one front end at a time (the log is held by
    the process: `chatlog.hold_chat_log`)."""

    def __init__(
        self,
        engine: ChatEngine,
        prompt: PromptConfig,
        log_path: Path,
        model: str,
        prompt_path: str | None = None,
    ) -> None:
        self.engine, self.prompt, self.log_path = engine, prompt, log_path
        self.model, self.prompt_path = model, prompt_path
        self.log = ChatLog()
        self.toolbox: Toolbox | None = None

    @property
    def chat(self) -> Chat:
        return self.log.active()

    def resume_or_start(self) -> Opened | None:
        """The log at `log_path` resumed where it exists (what reading it found), else a
        new chat opened by the greeting."""
        if self.log_path.exists():
            return self.open(self.log_path)
        self.new_chat()
        return None

    def open(self, path: Path) -> Opened:
        """Continue the log at `path` (its active chat) from now on; a log that does not
        load raises `ConfigError` and leaves the session as it was."""
        log, version = load_chat_log(path)
        backup = keep_backup(path, version, repaired=bool(log.repairs))
        self.log, self.log_path = log, path
        self._chat_changed()
        return Opened(path, version, tuple(log.repairs), backup)

    def new_chat(self) -> str | None:
        """A new chat, active from now on, with tools of its own, opened by the prompt
        config's greeting (returned; None without one)."""
        self.log.start_chat(Chat.new(self.model, self.prompt_path))
        self._chat_changed()
        return self.greet()

    def greet(self) -> str | None:
        """The prompt config's greeting (None without one), opening the active chat where
        it holds no message yet (a new chat, or a resumed log's empty one)."""
        greeting = self.greeting()
        if greeting is not None and not self.chat.messages:
            self.chat.append(ChatMessage("assistant", greeting, "final"))
        return greeting

    def continue_chat(self, chat_id: str) -> None:
        """Make another chat of the log the active one."""
        self.log.active_chat_id = chat_id
        self._chat_changed()

    def greeting(self) -> str | None:
        return self.prompt.expand(self.prompt.assistant_greeting) or None

    def record(
        self,
        messages: Sequence[ChatMessage],
        sampling: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """A turn's messages, in order, added to the active chat: each answer (final
        channel) with the sampling settings it was written with, the last message with
        `extra` (the front end's own fields, e.g. voice timings)."""
        for n, msg in enumerate(messages, 1):
            self.chat.append(
                msg,
                sampling if msg.channel == "final" else None,
                extra if n == len(messages) else None,
            )

    @property
    def empty(self) -> bool:
        """No chat of the log holds a message."""
        return not any(c.messages for c in self.log.chats.values())

    def save(self) -> str | None:
        """Write the log whole; None, or why it could not be written (the conversation is
        kept in memory, for the next save)."""
        try:
            save_chat_log(self.log_path, self.log)
        except OSError as e:
            return str(e.strerror or e)
        return None

    def close(self) -> None:
        """Let the chat's tools go (its python process, its browser)."""
        if self.toolbox is not None:
            self.toolbox.close()
            self.toolbox = None

    def _chat_changed(self) -> None:
        # The engine's cache holds another conversation; the tools were that chat's.
        self.engine.reset()
        self.close()
        tools = self.prompt.tools
        if tools.enabled:
            self.toolbox = Toolbox(tools, conversation_workspace(tools, self.chat.chat_id))
