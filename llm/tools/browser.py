"""The `browser` tool: `search`, `open` and `find`, as GPT-OSS was trained to use them.

Every page the model sees gets a cursor (its place in this conversation's page stack);
a view is `[cursor] title (url)`, a `viewing lines [a - b] of n` bar, then numbered
lines `L{i}: …`, so the model can cite `【{cursor}†L{a}-L{b}】` and open a link by id,
scroll with `loc`/`num_lines`, or `find` text in a page. Usage errors (a bad cursor or
link id, a failed fetch) are answered as text, never raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from mlx_harmony.llm.tools.browser_backends import BrowserBackend, BrowserError
from mlx_harmony.llm.tools.browser_pages import Page, results_page

# The system message's browser description (openai-harmony's own), naming our source.
DESCRIPTION = (
    "Tool for browsing.\n"
    "The `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n"
    "Cite information from the tool using the following format:\n"
    "`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n"
    "Do not quote more than 10 words directly from the tool output.\n"
    "sources={source}"
)
FIND_CONTEXT_LINES = 4
FIND_MAX_RESULTS = 50


@dataclass(frozen=True)
class BrowserLimits:
    view_chars: int = 4000  # about 1,000 tokens per view, gpt-oss's default
    max_results: int = 10


class Browser:
    def __init__(self, backend: BrowserBackend, limits: BrowserLimits | None = None) -> None:
        self.backend = backend
        self.limits = limits or BrowserLimits()
        self._stack: list[Page] = []

    @property
    def description(self) -> str:
        return DESCRIPTION.replace("{source}", self.backend.source)

    def call(self, function: str, args: dict[str, Any]) -> str:
        """Run `browser.<function>`; return the view or the error the model reads."""
        handlers = {"search": self._search, "open": self._open, "find": self._find}
        if function not in handlers:
            return f"Unknown browser function `{function}`: use search, open or find."
        try:
            return handlers[function](**_known(args, function))
        except (BrowserError, _UsageError) as e:
            return str(e)
        except TypeError as e:
            return f"Invalid arguments for browser.{function}: {e}"

    # ------------------------------------------------------------------ functions
    def _search(self, query: str, topn: int = 10, **_: Any) -> str:
        hits = self.backend.search(query, min(int(topn), self.limits.max_results))
        return self._push(results_page(query, hits))

    def _open(
        self,
        id: int | str = -1,
        cursor: int = -1,
        loc: int = -1,
        num_lines: int = -1,
        **_: Any,
    ) -> str:
        if isinstance(id, str):
            return self._push(self.backend.fetch(id), loc, num_lines)
        page = self._page(cursor)
        if id >= 0:
            if id not in page.links:
                raise _UsageError(f"Invalid link id `{id}`.")
            return self._push(self.backend.fetch(page.links[id]), loc, num_lines)
        # No id: scroll the page (a new cursor, as the reference tool does).
        return self._push(page, loc, num_lines)

    def _find(self, pattern: str, cursor: int = -1, **_: Any) -> str:
        page = self._page(cursor)
        lines = page.lines()
        chunks, links = [], {}
        i = 0
        while i < len(lines) and len(chunks) < FIND_MAX_RESULTS:
            if pattern.lower() in lines[i].lower():
                n = len(chunks)
                links[n] = page.url
                snippet = "\n".join(lines[i : i + FIND_CONTEXT_LINES])
                chunks.append(f"# 【{n}†match at L{i}】\n{snippet}")
                i += FIND_CONTEXT_LINES
            else:
                i += 1
        text = "\n\n".join(chunks) or f"No `find` results for pattern: `{pattern}`"
        title = f"Find results for text: `{pattern}` in `{page.title}`"
        return self._push(Page(f"{page.url}/find?pattern={quote(pattern)}", title, text, links))

    # ------------------------------------------------------------------ display
    def _page(self, cursor: int) -> Page:
        if not self._stack:
            raise _UsageError("No pages to access! Search or open a URL first.")
        if cursor == -1:
            return self._stack[-1]
        if not 0 <= cursor < len(self._stack):
            raise _UsageError(
                f"Cursor `{cursor}` is out of range. "
                f"Available cursor indices: [0 - {len(self._stack) - 1}]."
            )
        return self._stack[cursor]

    def _push(self, page: Page, loc: int = -1, num_lines: int = -1) -> str:
        lines = page.lines()
        start = max(loc, 0)
        if lines and start >= len(lines):
            raise _UsageError(
                f"Invalid location parameter: `{loc}`. "
                f"Cannot exceed page maximum of {len(lines) - 1}."
            )
        end = self._view_end(lines, start, num_lines)
        self._stack.append(page)
        cursor = len(self._stack) - 1
        body = "\n".join(f"L{i}: {lines[i]}" for i in range(start, end))
        where = f" ({page.url})" if page.url else ""
        bar = f"viewing lines [{start} - {max(end - 1, start)}] of {max(len(lines) - 1, 0)}"
        return f"[{cursor}] {page.title}{where}\n**{bar}**\n\n{body}"

    def _view_end(self, lines: list[str], start: int, num_lines: int) -> int:
        if num_lines > 0:
            return min(start + num_lines, len(lines))
        used, end = 0, start
        while end < len(lines) and (used == 0 or used + len(lines[end]) < self.limits.view_chars):
            used += len(lines[end]) + 8  # the `L{i}: ` prefix and newline
            end += 1
        return end


class _UsageError(Exception):
    pass


def _known(args: dict[str, Any], function: str) -> dict[str, Any]:
    """The call's arguments, with ints the model wrote as strings made ints again."""
    out = dict(args)
    for key in ("topn", "cursor", "loc", "num_lines"):
        if isinstance(out.get(key), str) and out[key].lstrip("-").isdigit():
            out[key] = int(out[key])
    if function == "open" and isinstance(out.get("id"), str) and out["id"].lstrip("-").isdigit():
        out["id"] = int(out["id"])
    return out
