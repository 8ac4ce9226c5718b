"""Where the browser tool's pages come from.

`HttpBackend` fetches pages over HTTP(S) with a size and time limit and searches through
a configurable provider: a URL template answering in SearxNG's JSON form
(`{"results": [{"title", "url", "content"}]}`), which a self-hosted SearxNG gives with
`format=json`. `FolderBackend` searches and opens the text, Markdown and HTML files of a
local folder (offline documentation, notes, tests).
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol
from urllib.parse import quote_plus, urlparse

from llm.tools.browser_pages import Page, SearchHit, html_page, text_page

USER_AGENT = "mlx-harmony-browser/1.0"


class BrowserError(Exception):
    """A fetch or search that failed; the message is what the model reads."""


class BrowserBackend(Protocol):
    source: str

    def search(self, query: str, topn: int) -> list[SearchHit]: ...

    def fetch(self, url: str) -> Page: ...


def _check_public(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return  # unresolvable: the fetch reports it
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if not addr.is_global:
            raise BrowserError(
                f"`{url}`: {addr} is a private or local address; the browser only opens "
                "public pages (tools.browser.allow_private_network to allow it)"
            )


class _PublicRedirects(urllib.request.HTTPRedirectHandler):
    """Every redirect hop is checked too: a public page must not bounce into the LAN."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        try:
            _check_public(newurl)
        except BrowserError as e:
            raise urllib.error.URLError(str(e).split(": ", 1)[1]) from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_PUBLIC_ONLY = urllib.request.build_opener(_PublicRedirects)


class HttpBackend:
    source = "web"

    def __init__(
        self,
        search_url: str | None,
        timeout_s: float,
        max_bytes: int,
        allow_private_network: bool = False,
    ) -> None:
        self.search_url = search_url
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.allow_private_network = allow_private_network

    def _get(self, url: str, trusted: bool = False) -> tuple[bytes, str, str]:
        """Fetch `url`. Unless `trusted` (the configured search endpoint), the model may not
        reach this machine or its private network: the router's admin page or a local
        service must not become readable to whatever a web page tells the model."""
        if urlparse(url).scheme not in ("http", "https"):
            raise BrowserError(f"`{url}`: only http and https URLs can be opened")
        guard = trusted or self.allow_private_network
        opener = urllib.request.build_opener() if guard else _PUBLIC_ONLY
        if not guard:
            _check_public(url)
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            with opener.open(req, timeout=self.timeout_s) as resp:
                body = resp.read(self.max_bytes + 1)
                ctype = resp.headers.get("Content-Type", "")
                final = resp.geturl()
        except urllib.error.HTTPError as e:
            raise BrowserError(f"`{url}`: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise BrowserError(f"`{url}`: cannot fetch ({reason})") from None
        if len(body) > self.max_bytes:
            body = body[: self.max_bytes]  # a long page is shown up to the limit
        return body, ctype, final

    def fetch(self, url: str) -> Page:
        body, ctype, final = self._get(url)
        charset = re.search(r"charset=([\w-]+)", ctype)
        text = body.decode(charset.group(1) if charset else "utf-8", errors="replace")
        if "html" in ctype or text.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
            return html_page(final, text)
        if ctype.startswith(("text/", "application/json")) or not ctype:
            return text_page(final, text)
        raise BrowserError(f"`{url}`: cannot show content of type {ctype.split(';')[0]}")

    def search(self, query: str, topn: int) -> list[SearchHit]:
        if not self.search_url:
            raise BrowserError(
                "no search provider is configured (tools.browser.search_url); open a URL instead"
            )
        url = self.search_url.replace("{query}", quote_plus(query))
        body, _, _ = self._get(url, trusted=True)
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
        return sorted(
            p for p in self.folder.rglob("*") if p.is_file() and p.suffix in _FOLDER_SUFFIXES
        )

    def fetch(self, url: str) -> Page:
        path = Path(url.removeprefix("file://"))
        path = (path if path.is_absolute() else self.folder / path).resolve()
        if self.folder not in path.parents or not path.is_file():
            raise BrowserError(f"`{url}`: no such page")
        text = path.read_text(errors="replace")
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
