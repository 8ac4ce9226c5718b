"""Which tools a prompt config or profile enables, and their limits (the `tools` field)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class PythonToolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(30.0, gt=0)
    cpu_s: int = Field(30, ge=1)
    memory_mb: int = Field(2048, ge=64)
    max_output_chars: int = Field(8000, ge=100)
    persistent: bool = True
    disk_mb: int = Field(1024, ge=1)  # the workspace's size while code runs
    # "auto": bubblewrap (Linux) or sandbox-exec (macOS), refusing to run without one;
    # "none": the user's explicit choice to run the model's code unconfined.
    confinement: Literal["auto", "none"] = "auto"


class BrowserToolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: Literal["http", "folder"] = "http"
    # A search endpoint answering SearxNG-style JSON; `{query}` is replaced, e.g.
    # "http://localhost:8888/search?q={query}&format=json".
    search_url: str | None = None
    folder: str | None = None
    timeout_s: float = Field(10.0, gt=0)
    max_bytes: int = Field(2_000_000, ge=1000)
    # Let the model open pages on this machine and the private network (off: a page could
    # otherwise steer it to a router's or a local service's pages).
    allow_private_network: bool = False
    # An HTTP(S) proxy for pages (never taken from the environment). Names must still
    # resolve here to public addresses, but the proxy connects on its own: it is trusted.
    proxy: str | None = None
    view_chars: int = Field(4000, ge=200)
    max_results: int = Field(10, ge=1, le=50)

    @model_validator(mode="after")
    def _backend_needs(self) -> BrowserToolConfig:
        if self.backend == "folder" and not self.folder:
            raise ValueError("backend 'folder' needs 'folder'")
        if self.search_url and "{query}" not in self.search_url:
            raise ValueError("search_url must contain {query}")
        return self


class ToolsConfig(BaseModel):
    """GPT-OSS's built-in tools. A tool is on when its entry is present (or `true`)."""

    model_config = ConfigDict(extra="forbid")
    python: PythonToolConfig | None = None
    browser: BrowserToolConfig | None = None
    apply_patch: bool = False
    # Folder the python tool runs in and apply_patch edits. Unset: a private folder per
    # conversation under ~/.local/share/mlx-harmony/workspaces.
    workspace: str | None = None
    max_steps: int = Field(8, ge=1, le=100)  # tool calls per turn before the model must answer
    spoken_notices: bool = True  # voice mode says "Running Python." and the like

    @field_validator("python", "browser", mode="before")
    @classmethod
    def _true_means_defaults(cls, v: Any) -> Any:
        if v is True:
            return {}
        return None if v is False else v

    @property
    def enabled(self) -> bool:
        return bool(self.python or self.browser or self.apply_patch)
