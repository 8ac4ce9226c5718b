"""Pages as the browser tool shows them: text lines with numbered links.

Links become `【{id}†{text}†{domain}】`, the form GPT-OSS was trained to read and cite
(gpt-oss's simple_browser); `open(id=…)` follows link `id` of a page. HTML is reduced to
text with the standard library's parser: scripts, styles and navigation chrome dropped,
headings marked with `#`, list items with `*`.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

WRAP = 80
_SKIP = {"script", "style", "noscript", "template", "svg", "head", "nav", "footer"}
_BLOCK = {
    "p", "div", "section", "article", "main", "header", "br", "tr", "table", "ul", "ol",
    "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "hr",
}  # fmt: skip


@dataclass
class Page:
    url: str
    title: str
    text: str
    links: dict[int, str] = field(default_factory=dict)  # link id → absolute URL

    def lines(self) -> list[str]:
        out: list[str] = []
        for line in self.text.split("\n"):
            out += textwrap.wrap(line, WRAP, replace_whitespace=False) or [""]
        return out


def domain(url: str) -> str:
    return urlparse(url).netloc or url


class _HtmlToText(HTMLParser):
    def __init__(self, base: str) -> None:
        super().__init__(convert_charrefs=True)
        self.base = base
        self.title = ""
        self.parts: list[str] = []
        self.links: dict[int, str] = {}
        self._skip = 0
        self._in_title = False
        self._href: str | None = None
        self._anchor: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        if self._skip:
            return
        if tag in _BLOCK:
            self.parts.append("\n")
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append("#" * int(tag[1]) + " ")
        elif tag == "li":
            self.parts.append("* ")
        elif tag == "a":
            href = dict(attrs).get("href")
            if href and not href.startswith(("javascript:", "#", "mailto:")):
                self._href, self._anchor = urljoin(self.base, href), []

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        if self._skip:
            return
        if tag == "a" and self._href is not None:
            text = " ".join("".join(self._anchor).split())
            if text:
                n = len(self.links)
                self.links[n] = self._href
                self.parts.append(f"【{n}†{text}†{domain(self._href)}】")
            self._href = None
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif self._skip:
            return
        elif self._href is not None:
            self._anchor.append(data)
        else:
            self.parts.append(data)


def html_page(url: str, html: str) -> Page:
    parser = _HtmlToText(url)
    parser.feed(html)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).split("\n")]
    # Collapse runs of blank lines left by nested blocks.
    text = "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1]))
    return Page(url, " ".join(parser.title.split()) or domain(url), text.strip(), parser.links)


def text_page(url: str, text: str, title: str | None = None) -> Page:
    return Page(url, title or url.rsplit("/", 1)[-1] or url, text.strip())


@dataclass(frozen=True)
class SearchHit:
    title: str
    url: str
    snippet: str


def results_page(query: str, hits: list[SearchHit]) -> Page:
    """A search as a page whose link ids open the results."""
    chunks, links = [], {}
    for n, hit in enumerate(hits):
        links[n] = hit.url
        chunks.append(f"【{n}†{hit.title}†{domain(hit.url)}】\n{' '.join(hit.snippet.split())}")
    text = "\n\n".join(chunks) or f"No results for `{query}`."
    return Page("", f"Search results for `{query}`", text, links)
