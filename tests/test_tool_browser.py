"""The browser tool against a local HTTP server (pages and a SearxNG-style search) and a
local folder: search, open by link id and URL, scrolling, find, citations, errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from llm.tools.browser import Browser, BrowserLimits
from llm.tools.browser_backends import FolderBackend, HttpBackend

PARIS = """<!doctype html><html><head><title>Paris - Facts</title>
<style>body {color: red}</style><script>var secret = 1;</script></head>
<body><nav>Home | About</nav>
<h1>Paris</h1>
<p>Paris is the capital of France. It lies on the <a href="/seine">Seine river</a>.</p>
<ul><li>Population: about 2.1 million</li><li>Famous for the Eiffel Tower</li></ul>
<p>See also <a href="https://example.org/lyon">Lyon</a>.</p>
</body></html>"""
SEINE = (
    "<html><head><title>Seine</title></head><body><p>The Seine is 777 km long.</p></body></html>"
)
LONG = "\n".join(f"line number {i} of a long text" for i in range(300))


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlparse(self.path)
        base = f"http://{self.headers['Host']}"
        if url.path == "/search":
            q = parse_qs(url.query)["q"][0]
            results = [
                {
                    "title": "Paris - Facts",
                    "url": f"{base}/paris",
                    "content": f"About {q}: capital",
                },
                {"title": "Seine", "url": f"{base}/seine", "content": "A river in France"},
            ]
            self._send(200, "application/json", json.dumps({"results": results}))
        elif url.path == "/paris":
            self._send(200, "text/html; charset=utf-8", PARIS)
        elif url.path == "/seine":
            self._send(200, "text/html", SEINE)
        elif url.path == "/long.txt":
            self._send(200, "text/plain", LONG)
        elif url.path == "/big":
            self._send(200, "text/plain", "x" * 50_000)
        elif url.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/private")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif url.path == "/image.png":
            self._send(200, "image/png", "\x89PNG")
        else:
            self._send(404, "text/plain", "not found")

    def _send(self, code: int, ctype: str, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def browser(site: str) -> Browser:
    # The test site is on loopback: a private address the browser refuses by default.
    search = f"{site}/search?q={{query}}&format=json"
    backend = HttpBackend(search, timeout_s=5, max_bytes=20_000, allow_private_network=True)
    return Browser(backend, BrowserLimits(view_chars=4000, max_results=10))


def test_search_then_open_a_result_by_link_id(browser: Browser, site: str) -> None:
    results = browser.call("search", {"query": "capital of France"})
    assert results.startswith("[0] Search results for `capital of France`\n**viewing lines [0 - ")
    assert f"【0†Paris - Facts†127.0.0.1:{site.rsplit(':', 1)[1]}】" in results
    assert "About capital of France: capital" in results

    page = browser.call("open", {"id": 0})
    assert page.startswith(f"[1] Paris - Facts ({site}/paris)\n**viewing lines [0 - ")
    assert "L" in page and "# Paris" in page
    assert "Paris is the capital of France." in page
    assert "var secret" not in page and "color: red" not in page and "Home | About" not in page
    assert "* Population: about 2.1 million" in page
    assert "【0†Seine river†127.0.0.1" in page and "【1†Lyon†example.org】" in page

    seine = browser.call("open", {"id": 0})  # link 0 of the current page: the Seine
    assert seine.startswith(f"[2] Seine ({site}/seine)") and "777 km" in seine
    back = browser.call("open", {"cursor": 0, "id": 1})  # the search page's second result
    assert back.startswith("[3] Seine")


def test_open_url_with_scrolling(browser: Browser, site: str) -> None:
    first = browser.call("open", {"id": f"{site}/long.txt", "num_lines": 5})
    assert "**viewing lines [0 - 4] of 299**" in first
    assert "L4: line number 4 of a long text" in first and "L5:" not in first
    later = browser.call("open", {"loc": 100, "num_lines": 3})  # scroll the same page
    assert later.startswith("[1] long.txt")
    assert "**viewing lines [100 - 102] of 299**" in later and "L101: line number 101" in later
    default = browser.call("open", {"id": f"{site}/long.txt"})
    lines = [ln for ln in default.splitlines() if ln.startswith("L")]
    assert 50 < len(lines) < 300  # a view of about view_chars, not the whole page


def test_find_in_page(browser: Browser, site: str) -> None:
    browser.call("open", {"id": f"{site}/paris"})
    found = browser.call("find", {"pattern": "eiffel"})
    assert found.startswith("[1] Find results for text: `eiffel` in `Paris - Facts`")
    assert "# 【0†match at L" in found and "Famous for the Eiffel Tower" in found
    nothing = browser.call("find", {"pattern": "zebra"})
    assert "No `find` results for pattern: `zebra`" in nothing


def test_errors_are_answers_not_exceptions(browser: Browser, site: str) -> None:
    assert "No pages to access" in browser.call("find", {"pattern": "x"})
    assert "HTTP 404" in browser.call("open", {"id": f"{site}/missing"})
    assert "only http and https" in browser.call("open", {"id": "file:///etc/passwd"})
    assert "cannot show content of type image/png" in browser.call(
        "open", {"id": f"{site}/image.png"}
    )
    browser.call("open", {"id": f"{site}/paris"})
    assert "Invalid link id `9`" in browser.call("open", {"id": 9})
    assert "Cursor `7` is out of range" in browser.call("open", {"cursor": 7, "id": 0})
    assert "Invalid location parameter" in browser.call("open", {"loc": 10_000})
    assert "Unknown browser function `click`" in browser.call("click", {})
    assert "cannot fetch" in browser.call("open", {"id": "http://127.0.0.1:9/"})


def test_private_addresses_are_refused_unless_allowed(site: str) -> None:
    backend = HttpBackend(f"{site}/search?q={{query}}&format=json", timeout_s=5, max_bytes=10**5)
    browser = Browser(backend)
    # The configured search endpoint is the user's own choice, local or not...
    assert "【0†Paris - Facts" in browser.call("search", {"query": "paris"})
    # ...but the model may not open pages on this machine or the LAN.
    out = browser.call("open", {"id": 0})
    assert "127.0.0.1 is a private or local address" in out
    assert "allow_private_network" in out
    assert "private or local" in browser.call("open", {"id": "http://192.168.1.1/"})
    assert "private or local" in browser.call("open", {"id": "http://[::1]:8080/"})


def test_a_redirect_into_the_private_network_is_refused(site: str, monkeypatch) -> None:
    import llm.tools.browser_backends as bb

    real = bb._check_public

    def loopback_is_public_but_private_path_is_not(url: str) -> None:
        if "/private" in url:
            real("http://10.0.0.1/")  # stands for a LAN address

    monkeypatch.setattr(bb, "_check_public", loopback_is_public_but_private_path_is_not)
    out = Browser(HttpBackend(None, 5, 10**5)).call("open", {"id": f"{site}/redirect"})
    assert "cannot fetch" in out and "10.0.0.1 is a private or local address" in out


def test_fetch_size_limit(site: str) -> None:
    backend = HttpBackend(None, timeout_s=5, max_bytes=1000, allow_private_network=True)
    page = backend.fetch(f"{site}/big")
    assert len(page.text) == 1000
    out = Browser(backend).call("search", {"query": "x"})
    assert "no search provider is configured" in out


def test_folder_backend(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("# Garden\nTomatoes need sun.\nWater them daily.\n")
    (tmp_path / "other.txt").write_text("Nothing about plants.\n")
    (tmp_path / "page.html").write_text("<title>Recipes</title><p>Tomatoes in sauce</p>")
    browser = Browser(FolderBackend(tmp_path))
    results = browser.call("search", {"query": "tomatoes"})
    assert "【0†Garden†" in results or "【0†Recipes†" in results
    assert "other.txt" not in results
    page = browser.call("open", {"id": 0})
    assert "Tomatoes" in page
    assert "no such page" in browser.call("open", {"id": "file:///etc/passwd"})
