"""The tools one conversation may call: declarations for the prompt, calls run to results.

A `Toolbox` is built from a `ToolsConfig` for one conversation (its own workspace, python
process and browser history). `run(call)` never raises: whatever goes wrong becomes the
text of the tool message, which is how the model learns that its call failed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from openai_harmony import ToolNamespaceConfig

from mlx_harmony.llm.messages import BuiltinTool, ChatMessage, FunctionTool, Tool, tool_answer
from mlx_harmony.llm.tools import apply_patch
from mlx_harmony.llm.tools.browser import Browser, BrowserLimits
from mlx_harmony.llm.tools.browser_backends import BrowserBackend, FolderBackend, HttpBackend
from mlx_harmony.llm.tools.config import BrowserToolConfig, ToolsConfig
from mlx_harmony.llm.tools.python_sandbox import PythonSandbox, SandboxLimits, description

APPLY_PATCH = "functions.apply_patch"


def workspaces_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "mlx-harmony" / "workspaces"


def conversation_workspace(config: ToolsConfig, conversation_id: str) -> Path:
    """The configured workspace, or a private folder for this conversation."""
    if config.workspace:
        return Path(config.workspace).expanduser()
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", conversation_id) or "default"
    return workspaces_root() / safe


def _browser_backend(config: BrowserToolConfig) -> BrowserBackend:
    if config.backend == "folder":
        assert config.folder is not None  # the config's validator requires it
        return FolderBackend(Path(config.folder))
    return HttpBackend(
        config.search_url,
        config.timeout_s,
        config.max_bytes,
        config.allow_private_network,
        config.proxy,
    )


def _browser_functions() -> tuple[FunctionTool, ...]:
    # openai-harmony's own definitions of search/open/find: the ones GPT-OSS was trained on.
    return tuple(
        FunctionTool(t.name, t.description, t.parameters)
        for t in ToolNamespaceConfig.browser().tools
    )


class Toolbox:
    def __init__(
        self,
        config: ToolsConfig,
        workspace: Path,
        browser_backend: BrowserBackend | None = None,
    ) -> None:
        self.config = config
        self.max_steps = config.max_steps
        self.workspace = Path(workspace)
        self._python: PythonSandbox | None = None
        self._browser: Browser | None = None
        if config.python:
            p = config.python
            limits = SandboxLimits(
                p.timeout_s,
                p.cpu_s,
                p.memory_mb,
                p.max_output_chars,
                p.persistent,
                p.disk_mb,
                p.confinement,
            )
            self._python = PythonSandbox(self.workspace, limits)
        if config.browser:
            b = config.browser
            backend = browser_backend or _browser_backend(b)
            self._browser = Browser(backend, BrowserLimits(b.view_chars, b.max_results))

    @property
    def declarations(self) -> list[Tool]:
        """What the prompt declares: built-ins in the system message, functions after."""
        out: list[Tool] = []
        if self._browser:
            out.append(BuiltinTool("browser", self._browser.description, _browser_functions()))
        if self._python:
            out.append(BuiltinTool("python", description(self._python.limits)))
        if self.config.apply_patch:
            out.append(FunctionTool("apply_patch", apply_patch.DESCRIPTION, apply_patch.PARAMETERS))
        return out

    def handles(self, recipient: str | None) -> bool:
        if not recipient:
            return False
        if recipient == "python" or recipient.startswith("python."):
            return self._python is not None
        if recipient.startswith("browser."):
            return self._browser is not None
        return recipient == APPLY_PATCH and self.config.apply_patch

    def run(self, call: ChatMessage) -> ChatMessage:
        """Run a call this toolbox handles; the answer is the tool message to append."""
        recipient = call.recipient or ""
        if recipient.startswith("python"):
            assert self._python is not None
            text = self._python.run(call.content)
        elif recipient.startswith("browser."):
            assert self._browser is not None
            text = self._browser_call(recipient.removeprefix("browser."), call.content)
        else:
            text = self._apply_patch(call.content)
        return tool_answer(call, text)

    def notice(self, recipient: str | None) -> str:
        """A short sentence a voice can say while the tool runs."""
        r = recipient or ""
        if r.startswith("python"):
            return "Running some Python."
        if r == "browser.search":
            return "Searching."
        if r.startswith("browser."):
            return "Reading a page."
        return "Editing files." if r == APPLY_PATCH else "Using a tool."

    def cancel(self) -> None:
        """Stop a running python call (from another thread); its run reports the kill."""
        if self._python is not None:
            self._python.kill()

    def close(self) -> None:
        if self._python is not None:
            self._python.close()

    def _browser_call(self, function: str, content: str) -> str:
        assert self._browser is not None
        try:
            args = json.loads(content) if content.strip() else {}
        except json.JSONDecodeError as e:
            return f"Invalid JSON arguments for browser.{function}: {e.msg} at column {e.colno}"
        if not isinstance(args, dict):
            return f"browser.{function} takes a JSON object of arguments"
        return self._browser.call(function, args)

    def _apply_patch(self, content: str) -> str:
        try:
            return apply_patch.apply_patch(self.workspace, apply_patch.patch_text(content))
        except apply_patch.PatchError as e:
            return f"Error: {e}"
