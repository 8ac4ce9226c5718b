"""The browser tool against a local HTTP server (pages and a SearxNG-style search) and a
local folder: search, open by link id and URL, scrolling, find, citations, errors."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from mlx_harmony.llm.tools import http_fetch
from mlx_harmony.llm.tools.browser import Browser, BrowserLimits
from mlx_harmony.llm.tools.browser_backends import BrowserError, FolderBackend, HttpBackend

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
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
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
        elif url.path == "/to-lan":
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.1/private")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif url.path == "/odd-charset":
            self._send(200, "text/plain; charset=no-such-charset", "caf\u00e9 au lait")
        elif url.path == "/codec-charset":
            self._send(200, "text/plain; charset=base64", "plain words")
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


def loopback_counts_as_public(monkeypatch, *addresses: str) -> None:
    """The test site stands for a public one: `addresses` pass the check, nothing else."""
    real = http_fetch.is_public
    monkeypatch.setattr(http_fetch, "is_public", lambda a: a in addresses or real(a))


def test_a_redirect_into_the_private_network_is_refused(site: str, monkeypatch) -> None:
    loopback_counts_as_public(monkeypatch, "127.0.0.1")
    out = Browser(HttpBackend(None, 5, 10**5)).call("open", {"id": f"{site}/to-lan"})
    assert "10.0.0.1 is a private or local address" in out


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.0.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "224.0.0.1", "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "::ffff:127.0.0.1",
        "::127.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b:1::7f00:1",
        "2002:7f00:1::", "2001:0:4136:e378:8000:63bf:80ff:fffe", "not an address", "",
    ],
)  # fmt: skip
def test_local_private_and_disguised_addresses_are_not_public(address: str) -> None:
    assert not http_fetch.is_public(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
def test_public_addresses_are_public(address: str) -> None:
    assert http_fetch.is_public(address)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::127.0.0.1]/", "is a private or local address"),
        ("http://[64:ff9b::7f00:1]/", "is a private or local address"),
        ("http://[fe80::1%25lo]/", "an address with a zone id is local"),
        ("http://2130706433/", "(127.0.0.1) is a private or local address"),
        ("http://0x7f.1/", "(127.0.0.1) is a private or local address"),
        ("http://[::1/", "not a valid URL"),
        ("http://example.org:99999/", "not a valid URL"),
        ("http:///path", "the URL has no host"),
        ("ftp://example.org/", "only http and https"),
    ],
)
def test_odd_and_malformed_urls_are_refused_as_text(url: str, message: str) -> None:
    out = Browser(HttpBackend(None, 5, 10**5)).call("open", {"id": url})
    assert message in out


def test_proxies_in_the_environment_are_not_used(monkeypatch) -> None:
    """With http_proxy set, a name that does not resolve here is refused, not handed to
    the proxy (which could reach what the check would have refused)."""
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(var, url)
        before = _Handler.hits
        out = Browser(HttpBackend(None, 5, 10**5)).call(
            "open", {"id": "http://no-such-host.invalid/page"}
        )
    finally:
        proxy.shutdown()
    assert "cannot resolve no-such-host.invalid" in out
    assert _Handler.hits == before


def test_the_connection_goes_to_the_address_that_was_checked(site: str, monkeypatch) -> None:
    """A name whose DNS answer changes after the check (rebinding) still reaches only the
    checked address: here 127.0.0.2, where nothing listens, and never the site."""
    port = int(site.rsplit(":", 1)[1])
    answers = iter(["127.0.0.2"] + ["127.0.0.1"] * 10)

    def rebinding(host, port, *args, **kwargs):
        address = host if host.startswith("127.") else next(answers)  # literals stay
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    loopback_counts_as_public(monkeypatch, "127.0.0.2")
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    before = _Handler.hits
    out = Browser(HttpBackend(None, 5, 10**5)).call(
        "open", {"id": f"http://rebind.test:{port}/paris"}
    )
    assert "cannot fetch" in out and _Handler.hits == before


def dripping_server(head: bytes, drip: bytes, every_s: float) -> tuple[str, threading.Event]:
    """A server that sends `head` at once, then one byte of `drip` every `every_s`: it
    stops by itself once `drip` is sent or the client has gone."""
    listener = socket.create_server(("127.0.0.1", 0))
    finished = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.recv(65536)
            try:
                conn.sendall(head)
                for byte in drip:
                    if finished.wait(every_s):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/", finished


@pytest.mark.parametrize(
    ("head", "drip"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 40\r\n\r\n", b"x" * 40),
        (b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"y" * 40),
    ],
    ids=["body", "headers"],
)
def test_one_deadline_covers_a_server_that_drips_its_bytes(head: bytes, drip: bytes) -> None:
    url, finished = dripping_server(head, drip, every_s=0.25)
    backend = HttpBackend(None, timeout_s=1, max_bytes=10**5, allow_private_network=True)
    try:
        out = Browser(backend).call("open", {"id": url})
    finally:
        finished.set()
    assert "took longer than 1 s" in out


def test_unknown_or_non_text_charsets_fall_back_to_utf8(browser: Browser, site: str) -> None:
    assert "café au lait" in browser.call("open", {"id": f"{site}/odd-charset"})
    assert "plain words" in browser.call("open", {"id": f"{site}/codec-charset"})


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


def test_folder_backend_passes_over_a_link_that_leads_outside(tmp_path: Path) -> None:
    docs, outside = tmp_path / "docs", tmp_path / "outside"
    docs.mkdir()
    outside.mkdir()
    (outside / "secret.md").write_text("# Secret\ntomatoes are the password\n")
    (docs / "notes.md").write_text("# Garden\nTomatoes need sun.\n")
    (docs / "leak.md").symlink_to(outside / "secret.md")
    (docs / "leakdir").symlink_to(outside)
    browser = Browser(FolderBackend(docs))
    results = browser.call("search", {"query": "tomatoes"})
    assert "Garden" in results and "Secret" not in results and "password" not in results


def test_folder_backend_never_follows_a_link_swapped_in_after_the_check(
    tmp_path: Path, monkeypatch
) -> None:
    """The race the red team won 1 time in ~600: the path is resolved (all inside), then
    a folder on it is swapped for a link outside before the file is opened. Here the swap
    comes first and resolve() is made to answer as it would have before it."""
    docs, outside = tmp_path / "docs", tmp_path / "outside"
    (docs / "sub").mkdir(parents=True)
    outside.mkdir()
    (docs / "sub" / "page.md").write_text("# Page\nfine\n")
    (outside / "page.md").write_text("# Secret\nthe password\n")
    backend = FolderBackend(docs)
    (docs / "sub" / "page.md").unlink()
    (docs / "sub").rmdir()
    (docs / "sub").symlink_to(outside)
    monkeypatch.setattr(Path, "resolve", lambda self, strict=False: Path(os.path.abspath(self)))
    with pytest.raises(BrowserError) as err:
        backend.fetch(f"file://{docs}/sub/page.md")
    assert "password" not in str(err.value)
