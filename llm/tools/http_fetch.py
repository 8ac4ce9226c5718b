"""One HTTP(S) GET for the browser tool, safe against what a web page can make a model do.

- The host's addresses are resolved once, each one must be public (fail closed: scope
  ids, unparsable answers, and IPv6 forms that embed an IPv4 address are judged by that
  address), and the connection goes to exactly the address that was checked, with the
  name kept for the Host header and TLS: a DNS answer that changes between the check and
  the connection (rebinding) cannot reach this machine or the private network.
- Proxies come only from the configuration, never from the environment (`http_proxy`
  would otherwise fetch names that do not resolve here without any check).
- One deadline covers the whole fetch, redirects and a server that drips its bytes
  included; every redirect hop is checked like the first request.

Written on `http.client` rather than urllib or httpx because neither lets the caller
pin the connection to the address it checked.
"""

from __future__ import annotations

import codecs
import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

USER_AGENT = "mlx-harmony-browser/1.0"
MAX_REDIRECTS = 5
CHUNK = 64 * 1024
# IPv6 prefixes whose last 32 bits are an IPv4 address a packet may end up at.
_EMBEDS_V4 = (
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64, well-known prefix
    ipaddress.ip_network("64:ff9b:1::/48"),  # NAT64, local use
    ipaddress.ip_network("::/96"),  # IPv4-compatible (deprecated, still routed by some)
)


class FetchError(Exception):
    """Why a fetch was refused or failed: one sentence, for the model."""


@dataclass
class Response:
    body: bytes
    content_type: str
    url: str  # after redirects

    def text(self) -> str:
        """The body decoded by its declared charset; unknown or odd ones as UTF-8."""
        charset = "utf-8"
        for part in self.content_type.split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip("\"' ")
        try:
            codecs.lookup(charset)
        except LookupError:
            charset = "utf-8"
        try:
            return self.body.decode(charset, errors="replace")
        except (LookupError, ValueError):  # codecs that are not text encodings
            return self.body.decode("utf-8", errors="replace")


def is_public(address: str) -> bool:
    """Whether a packet to `address` stays on the public internet."""
    if "%" in address:  # a scope id: a link-local interface of this machine
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        embedded += [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) for net in _EMBEDS_V4 if ip in net]
        if any(v4 is not None and not is_public(str(v4)) for v4 in embedded):
            return False
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int, allow_private: bool) -> str:
    """The one address to connect to, checked."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise FetchError(f"cannot resolve {host} ({e})") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise FetchError(f"cannot resolve {host}")
    if not allow_private:
        for address in addresses:
            if not is_public(address):
                what = address if host.strip("[]") == address else f"{host} ({address})"
                raise FetchError(
                    f"{what} is a private or local address; the browser only opens public "
                    "pages (tools.browser.allow_private_network to allow it)"
                )
    return addresses[0]


class _Pinned(http.client.HTTPConnection):
    """Connects to a checked address, whatever the name resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def _split(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchError(f"not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise FetchError("only http and https URLs can be opened")
    host = parts.hostname
    if not host:
        raise FetchError("the URL has no host")
    if "%" in host:  # an IPv6 zone id names an interface of this machine
        raise FetchError(f"{host}: an address with a zone id is local")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80), target


def fetch(
    url: str,
    timeout_s: float,
    max_bytes: int,
    allow_private: bool = False,
    proxy: str | None = None,
) -> Response:
    """GET `url` (following redirects) within `timeout_s` in all; at most `max_bytes`."""
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, target = _split(url)
        address = resolve(host, port, allow_private)
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError(f"took longer than {timeout_s:g} s")
        conn = _connection(scheme, host, port, address, proxy, left)
        # The deadline holds even against a server that sends a byte now and then: at
        # the deadline the socket is shut, which ends any read blocked on it.
        timer = threading.Timer(left, _shut, args=(conn,))
        timer.start()
        try:
            status, headers, body = _exchange(conn, scheme, host, port, target, proxy, max_bytes)
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:
                raise FetchError(f"took longer than {timeout_s:g} s") from None
            raise FetchError(f"cannot fetch ({e})") from None
        finally:
            timer.cancel()
            conn.close()
        if time.monotonic() >= deadline:
            raise FetchError(f"took longer than {timeout_s:g} s")
        if status in (301, 302, 303, 307, 308) and headers.get("location"):
            url = urljoin(url, headers["location"])
            continue
        if status >= 400:
            raise FetchError(f"HTTP {status}")
        return Response(body, headers.get("content-type", ""), url)
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def _connection(
    scheme: str, host: str, port: int, address: str, proxy: str | None, timeout: float
) -> http.client.HTTPConnection:
    if proxy is None:
        cls = _PinnedTLS if scheme == "https" else _Pinned
        return cls(host, port, address, timeout)
    p_scheme, p_host, p_port, _ = _split(proxy)
    cls = http.client.HTTPSConnection if p_scheme == "https" else http.client.HTTPConnection
    conn = cls(p_host, p_port, timeout=timeout)
    if scheme == "https":
        conn.set_tunnel(host, port)
    return conn


def _exchange(
    conn: http.client.HTTPConnection,
    scheme: str,
    host: str,
    port: int,
    target: str,
    proxy: str | None,
    max_bytes: int,
) -> tuple[int, dict[str, str], bytes]:
    path = f"{scheme}://{host}:{port}{target}" if proxy and scheme == "http" else target
    conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    resp = conn.getresponse()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    body = bytearray()
    while len(body) < max_bytes:
        chunk = resp.read1(min(CHUNK, max_bytes - len(body)))
        if not chunk:
            break
        body += chunk
    return resp.status, headers, bytes(body)  # a long page is kept up to the limit


def _shut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
