"""Where the browser tool's pages come from.

`HttpBackend` fetches pages over HTTP(S) (`http_fetch`: public addresses only, pinned
connections, one deadline, no proxies from the environment) and searches through
a configurable provider: a URL template answering in SearxNG's JSON form
(`{"results": [{"title", "url", "content"}]}`), which a self-hosted SearxNG gives with
`format=json`. `FolderBackend` searches and opens the text, Markdown and HTML files of a
local folder (offline documentation, notes, tests).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol
from urllib.parse import quote_plus

from mlx_harmony.llm.tools.apply_patch import PatchError, Workspace
from mlx_harmony.llm.tools.browser_pages import Page, SearchHit, html_page, text_page
from mlx_harmony.llm.tools.http_fetch import FetchError, Response, fetch


class BrowserError(Exception):
    """A fetch or search that failed; the message is what the model reads."""


class BrowserBackend(Protocol):
    source: str

    def search(self, query: str, topn: int) -> list[SearchHit]: ...

    def fetch(self, url: str) -> Page: ...


class HttpBackend:
    source = "web"

    def __init__(
        self,
        search_url: str | None,
        timeout_s: float,
        max_bytes: int,
        allow_private_network: bool = False,
        proxy: str | None = None,
    ) -> None:
        self.search_url = search_url
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.allow_private_network = allow_private_network
        self.proxy = proxy

    def _get(self, url: str, trusted: bool = False) -> Response:
        """Fetch `url`. Unless `trusted` (the configured search endpoint), the model may not
        reach this machine or its private network: the router's admin page or a local
        service must not become readable to whatever a web page tells the model."""
        try:
            return fetch(
                url,
                self.timeout_s,
                self.max_bytes,
                allow_private=trusted or self.allow_private_network,
                proxy=self.proxy,
            )
        except FetchError as e:
            raise BrowserError(f"`{url}`: {e}") from None

    def fetch(self, url: str) -> Page:
        resp = self._get(url)
        ctype, text = resp.content_type, resp.text()
        if "html" in ctype or text.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
            return html_page(resp.url, text)
        if ctype.startswith(("text/", "application/json")) or not ctype:
            return text_page(resp.url, text)
        raise BrowserError(f"`{url}`: cannot show content of type {ctype.split(';')[0]}")

    def search(self, query: str, topn: int) -> list[SearchHit]:
        if not self.search_url:
            raise BrowserError(
                "no search provider is configured (tools.browser.search_url); open a URL instead"
            )
        url = self.search_url.replace("{query}", quote_plus(query))
        body = self._get(url, trusted=True).body
        try:
            results = json.loads(body)["results"]
            return [
                SearchHit(r.get("title") or r["url"], r["url"], r.get("content") or "")
                for r in results[:topn]
            ]
        except (ValueError, KeyError, TypeError):
            raise BrowserError(
                "the search provider did not answer with SearxNG-style JSON results"
            ) from None


_FOLDER_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".html", ".htm"}


class FolderBackend:
    """Search and open files under one folder; a URL is `file://` + the file's path."""

    source = "files"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).expanduser().resolve()

    def _files(self) -> list[Path]:
        """The folder's documents; a link that leads out of the folder is passed over."""
        return sorted(
            p
            for p in self.folder.rglob("*")
            if p.suffix in _FOLDER_SUFFIXES and p.is_file() and self._inside(p.resolve())
        )

    def _inside(self, path: Path) -> bool:
        return self.folder in path.parents

    def fetch(self, url: str) -> Page:
        path = Path(url.removeprefix("file://"))
        path = (path if path.is_absolute() else self.folder / path).resolve()
        if not self._inside(path):
            raise BrowserError(f"`{url}`: no such page")
        # Opened by descriptor from the folder down, no link followed: a link swapped in
        # after resolve() above (the python tool's code may share the folder) is refused
        # instead of leading the read outside.
        try:
            folder = Workspace(self.folder)
        except OSError:
            raise BrowserError(f"`{url}`: no such page") from None
        try:
            found = folder.read(str(path.relative_to(self.folder)))
        except PatchError as e:
            raise BrowserError(f"`{url}`: {str(e).split(': ', 1)[-1]}") from None
        except OSError:
            found = None
        finally:
            folder.close()
        if found is None:
            raise BrowserError(f"`{url}`: no such page")
        text = found[0].decode(errors="replace")
        uri = f"file://{path}"
        if path.suffix in (".html", ".htm"):
            return html_page(uri, text)
        return text_page(uri, text, _title(text, path))

    def search(self, query: str, topn: int) -> list[SearchHit]:
        terms = [t for t in re.findall(r"\w+", query.lower()) if len(t) > 1]
        scored = []
        for path in self._files():
            page = self.fetch(f"file://{path}")
            low = page.text.lower()
            score = sum(low.count(t) for t in terms)
            if score:
                first = min((low.find(t) for t in terms if t in low), default=0)
                snippet = page.text[max(0, first - 80) : first + 160].replace("\n", " ")
                scored.append((-score, str(path), SearchHit(page.title, page.url, snippet)))
        return [hit for *_, hit in sorted(scored)[:topn]]


def _title(text: str, path: Path) -> str:
    first = text.strip().split("\n", 1)[0].strip()
    return first.lstrip("#").strip() if first.startswith("#") else path.name
