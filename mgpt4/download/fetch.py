"""HTTP(S) GET of one image URL with every way it can go wrong turned into a ``FetchError`` with a reason.

Built on ``http.client`` rather than ``urllib``: each thread keeps its connections open between
requests (keep-alive; urllib sends ``Connection: close`` and pays a TCP handshake per image), reads
the body in bounded steps so the timeout is a deadline for the whole request (a server that drips
one byte a second cannot hold a thread forever), and stops reading at the size cap.

Politeness: at most ``max_per_host`` requests in flight per host (per process), and a 429 or 503
pauses *every* request to that host for ``Retry-After`` (or an exponential backoff) before retrying.
"""

from __future__ import annotations

import dataclasses
import http.client
import random
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from mgpt4.config import field

# Kinds worth fetching again later (`--retry-failed`): the server or network may recover.
TRANSIENT_KINDS = frozenset({"timeout", "connection", "http_5xx", "rate_limited"})
_REDIRECTS = (301, 302, 303, 307, 308)
_BACKOFF_STATUSES = (429, 503)
_NOAI_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
_CHUNK = 1 << 16
_URL_SAFE = "/%?=&;:@!$'()*+,~-._[]#"
_MAX_CONNECTIONS_PER_THREAD = 8


class FetchError(Exception):
    """A URL that yielded no body; ``kind`` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def transient(self) -> bool:
        """Whether fetching again later may succeed."""
        return self.kind in TRANSIENT_KINDS


@dataclasses.dataclass
class FetchConfig:
    """How URLs are fetched (the download config's ``fetch`` section)."""

    timeout: float = field(10.0, doc="seconds for one request, connect to last byte (per redirect hop)")
    max_redirects: int = field(5, doc="redirects followed per URL")
    max_bytes: int = field(32 << 20, doc="largest body accepted, in bytes")
    retries: int = field(2, doc="retries of a URL answered 429/503, after a per-host backoff")
    backoff_base: float = field(
        1.0, doc="first backoff in seconds when a host says 429/503 without Retry-After"
    )
    backoff_max: float = field(60.0, doc="longest backoff in seconds (caps Retry-After too)")
    max_per_host: int = field(16, doc="requests in flight to one host, per process")
    user_agent: str = field("Mozilla/5.0 (compatible; mgpt4-download/0.1)", doc="User-Agent header")
    respect_noai: bool = field(True, doc="skip images whose X-Robots-Tag says noai/noimageai/noindex")


class HostLimiter:
    """Per-host concurrency slots and backoff deadlines, shared by the threads of one process."""

    def __init__(self, max_per_host: int) -> None:
        self._limit = max(1, max_per_host)
        self._cond = threading.Condition()
        self._active: dict[str, int] = {}
        self._paused_until: dict[str, float] = {}

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        """Hold one of the host's slots; waits while the host is full or backing off."""
        with self._cond:
            while True:
                wait = self._paused_until.get(host, 0.0) - time.monotonic()
                if wait <= 0 and self._active.get(host, 0) < self._limit:
                    break
                self._cond.wait(timeout=wait if wait > 0 else None)
            self._active[host] = self._active.get(host, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._active[host] -= 1
                if not self._active[host]:
                    del self._active[host]
                self._cond.notify_all()

    def pause(self, host: str, seconds: float) -> None:
        """Hold back every request to ``host`` for ``seconds`` (a 429/503 answer)."""
        with self._cond:
            now = time.monotonic()
            if len(self._paused_until) > 1024:  # forget expired pauses so the dict stays small
                self._paused_until = {h: t for h, t in self._paused_until.items() if t > now}
            self._paused_until[host] = max(self._paused_until.get(host, 0.0), now + seconds)


@dataclass
class _Response:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes


class Fetcher:
    """Fetch URLs; safe to share between threads (each thread keeps its own connections)."""

    def __init__(self, settings: FetchConfig, limiter: HostLimiter | None = None) -> None:
        self.settings = settings
        self.limiter = limiter or HostLimiter(settings.max_per_host)
        self._local = threading.local()
        self._ssl = ssl.create_default_context()

    def fetch(self, url: str | None) -> bytes:
        """The body of ``url`` after redirects.

        Raises:
            FetchError: kinds ``bad_url``, ``timeout``, ``connection``, ``dns``, ``ssl``, ``protocol``,
                ``http_4xx``, ``http_5xx``, ``rate_limited``, ``too_many_redirects``, ``too_large``,
                ``disallowed``.
        """
        current = _check_url(url)
        for _ in range(self.settings.max_redirects + 1):
            resp = self._get_with_backoff(current)
            if resp.status in _REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise FetchError("protocol", f"HTTP {resp.status} redirect without a Location header")
                current = _check_url(urljoin(current, location.strip()))
                continue
            if resp.status >= 400:
                raise _status_error(resp.status, resp.reason)
            if resp.status != 200:
                raise FetchError("protocol", f"HTTP {resp.status} {resp.reason}: no image body")
            return resp.body
        raise FetchError("too_many_redirects", f"more than {self.settings.max_redirects} redirects")

    def close(self) -> None:
        """Close this thread's open connections."""
        for conn in getattr(self._local, "conns", {}).values():
            conn.close()
        self._local.conns = OrderedDict()

    def _get_with_backoff(self, url: str) -> _Response:
        host = urlsplit(url).netloc.lower()
        for attempt in range(self.settings.retries + 1):
            with self.limiter.slot(host):
                resp = self._get(url)
            if resp.status not in _BACKOFF_STATUSES or attempt == self.settings.retries:
                return resp
            delay = _retry_after(resp.headers.get("Retry-After"))
            if delay is None:
                delay = self.settings.backoff_base * 2**attempt * random.uniform(0.75, 1.25)
            self.limiter.pause(host, min(delay, self.settings.backoff_max))
        raise AssertionError("unreachable: the last attempt always returns")

    def _get(self, url: str) -> _Response:
        """One GET; a kept-alive connection that the server closed meanwhile is retried once, fresh."""
        parts = urlsplit(url)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        if not path.isascii():  # http.client sends ASCII only; browsers percent-encode the rest
            path = quote(path, safe=_URL_SAFE)
        deadline = time.monotonic() + self.settings.timeout
        for fresh in (False, True):
            conn, reused = self._connection(parts.scheme, parts.netloc, fresh)
            try:
                return self._exchange(conn, path, deadline)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self._drop(parts.scheme, parts.netloc)
                if reused and not fresh:
                    continue
                raise FetchError(
                    "connection", f"connection closed by server: {exc or type(exc).__name__}"
                ) from exc
            except FetchError:
                self._drop(parts.scheme, parts.netloc)
                raise
            except Exception as exc:  # every network failure becomes a recorded reason, never a crash
                self._drop(parts.scheme, parts.netloc)
                raise _network_error(exc, self.settings.timeout) from exc
        raise AssertionError("unreachable: the fresh attempt returns or raises")

    def _exchange(self, conn: http.client.HTTPConnection, path: str, deadline: float) -> _Response:
        headers = {"User-Agent": self.settings.user_agent, "Accept": "image/*,*/*;q=0.8"}
        conn.timeout = _remaining(deadline, self.settings.timeout)
        if conn.sock is not None:
            conn.sock.settimeout(conn.timeout)
        conn.request("GET", path, headers=headers)
        sock = conn.sock  # kept: getresponse() hands a closing connection's socket over to the response
        resp = conn.getresponse()
        if resp.status != 200:
            resp.close()  # the body of an error or redirect is not worth reading; reconnect next time
            self._drop_conn(conn)
            return _Response(resp.status, resp.reason, resp.headers, b"")
        if self.settings.respect_noai and _disallowed(resp.headers):
            resp.close()
            self._drop_conn(conn)
            raise FetchError("disallowed", "X-Robots-Tag forbids use of this image (noai/noindex)")
        try:
            body = self._read_body(sock, resp, deadline)
        except FetchError:
            resp.close()
            self._drop_conn(conn)
            raise
        resp.close()  # read1() leaves a fully read body "open"; the connection is reusable only once closed
        return _Response(resp.status, resp.reason, resp.headers, body)

    def _read_body(
        self, sock: socket.socket | None, resp: http.client.HTTPResponse, deadline: float
    ) -> bytes:
        cap = self.settings.max_bytes
        length = resp.getheader("Content-Length")
        expected = int(length) if length and length.strip().isdigit() else None
        if expected is not None and expected > cap:
            raise FetchError("too_large", f"body of {expected} bytes exceeds the {cap}-byte cap")
        chunks: list[bytes] = []
        size = 0
        while True:
            if sock is not None:
                sock.settimeout(_remaining(deadline, self.settings.timeout))
            chunk = resp.read1(_CHUNK)  # one recv at most, so the deadline is checked between them
            if not chunk:
                break
            size += len(chunk)
            if size > cap:
                raise FetchError("too_large", f"body exceeds the {cap}-byte cap")
            chunks.append(chunk)
        if expected is not None and size < expected:
            raise FetchError("connection", f"body truncated: got {size} of {expected} bytes")
        return b"".join(chunks)

    def _connection(self, scheme: str, netloc: str, fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
        conns: OrderedDict = getattr(self._local, "conns", None) or OrderedDict()
        self._local.conns = conns
        key = (scheme, netloc)
        if fresh:
            self._drop(scheme, netloc)
        conn = conns.get(key)
        if conn is not None:
            conns.move_to_end(key)
            return conn, True
        if len(conns) >= _MAX_CONNECTIONS_PER_THREAD:
            conns.popitem(last=False)[1].close()
        if scheme == "https":
            conn = http.client.HTTPSConnection(netloc, timeout=self.settings.timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(netloc, timeout=self.settings.timeout)
        conns[key] = conn
        return conn, False

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = getattr(self._local, "conns", {}).pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def _drop_conn(self, conn: http.client.HTTPConnection) -> None:
        conns = getattr(self._local, "conns", {})
        for key, value in list(conns.items()):
            if value is conn:
                del conns[key]
        conn.close()


def _check_url(url: str | None) -> str:
    if not url:
        raise FetchError("bad_url", "missing URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        raise FetchError("bad_url", f"malformed URL: {exc}") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise FetchError("bad_url", f"unsupported URL scheme {parts.scheme or '(none)'!r}: only http/https")
    if not parts.hostname:
        raise FetchError("bad_url", "URL has no host")
    if any(c in url for c in " \r\n\t"):
        url = url.replace(" ", "%20")
        if any(c in url for c in "\r\n\t"):
            raise FetchError("bad_url", "URL contains control characters")
    return url


def _remaining(deadline: float, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("timeout", f"timed out after {timeout:g} s")
    return left


def _status_error(status: int, reason: str) -> FetchError:
    message = f"HTTP {status} {reason}".strip()
    if status == 429:
        return FetchError("rate_limited", message)
    if status == 408 or status >= 500:
        return FetchError("http_5xx" if status >= 500 else "timeout", message)
    return FetchError("http_4xx", message)


def _network_error(exc: Exception, timeout: float) -> FetchError:
    if isinstance(exc, socket.timeout | TimeoutError):
        return FetchError("timeout", f"timed out after {timeout:g} s")
    if isinstance(exc, socket.gaierror):
        # EAI_AGAIN is a resolver hiccup worth retrying; anything else is a name that does not resolve.
        kind = "connection" if exc.errno == socket.EAI_AGAIN else "dns"
        return FetchError(kind, f"cannot resolve host: {exc.strerror or exc}")
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return FetchError("ssl", f"TLS error: {exc}")
    if isinstance(exc, http.client.IncompleteRead):
        return FetchError("connection", f"body truncated: got {len(exc.partial)} bytes")
    if isinstance(exc, http.client.HTTPException):
        return FetchError("protocol", f"malformed HTTP response: {type(exc).__name__} {exc}".strip())
    if isinstance(exc, OSError):
        return FetchError("connection", f"connection failed: {exc.strerror or exc}")
    if isinstance(exc, UnicodeError | ValueError):
        return FetchError("bad_url", f"malformed URL: {exc}")
    return FetchError("connection", f"{type(exc).__name__}: {exc}")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header given in seconds (HTTP-date forms fall back to backoff)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _disallowed(headers: http.client.HTTPMessage) -> bool:
    """X-Robots-Tag opt-outs meant for every crawler (a ``botname: ...`` value names another crawler)."""
    for value in headers.get_all("X-Robots-Tag") or []:
        agent, sep, rules = value.partition(":")
        if sep and agent.strip().lower() not in _NOAI_DIRECTIVES and agent.strip().lower() != "mgpt4":
            continue
        if any(rule.strip().lower() in _NOAI_DIRECTIVES for rule in (rules if sep else value).split(",")):
            return True
    return False
