"""A real HTTP/1.1 server on 127.0.0.1 for download tests, serving real image bytes and real misbehaviour.

    with LoopbackServer() as server:
        url = server.add_image("a.jpg", make_jpeg(320, 240))
        server.add("/slow", delay=2.0, body=make_jpeg(64, 64))

Each route is a ``Route`` (status, headers, body, delays, redirects, ...). The server counts requests
per path (``server.hits``) and the most requests it ever had in flight at once (``server.max_in_flight``)
and the client connections it saw (``server.connections``), so tests can check what the client did,
not only what it wrote.
"""

from __future__ import annotations

import io
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A real JPEG with smooth content (gradients + blobs), like a photo rather than noise."""
    return _encode(_picture(width, height, seed), "JPEG", quality=quality)


def make_png(width: int, height: int, seed: int = 0, alpha: bool = False) -> bytes:
    """A real PNG, optionally RGBA with a transparent left half."""
    img = _picture(width, height, seed)
    if alpha:
        img = img.convert("RGBA")
        a = np.full((height, width), 255, np.uint8)
        a[:, : width // 2] = 0
        img.putalpha(Image.fromarray(a))
    return _encode(img, "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def png_bomb(width: int, height: int) -> bytes:
    """A complete, decodable grayscale PNG of zeros: a few hundred KB that decode to width×height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale, not interlaced
    packer = zlib.compressobj(1)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    rows_per_block = max(1, (1 << 24) // len(row))
    idat = []
    for start in range(0, height, rows_per_block):
        idat.append(packer.compress(row * min(rows_per_block, height - start)))
    idat.append(packer.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def big_picture(width: int, height: int, fmt: str = "PNG") -> bytes:
    """A large smooth RGB image, made fast (no per-blob work), as PNG (fast compression) or JPEG."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = x, y, (x + y) / 2
    options: dict[str, object] = {"compress_level": 1} if fmt == "PNG" else {"quality": 85}
    return _encode(Image.fromarray(rgb, "RGB"), fmt, **options)


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    c = rng.uniform(0.2, 1.0, 3)
    rgb = np.stack([c[0] * x + 0 * y, c[1] * y + 0 * x, c[2] * (1 - x * y)], axis=-1) * 255
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        rgb[mask] = rng.uniform(0, 255, 3)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


class _QuietServer(ThreadingHTTPServer):
    request_queue_size = 256  # socketserver's default backlog of 5 drops SYNs under a burst of clients

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up mid-answer are what these tests provoke


@dataclass
class Route:
    """How the server answers one path."""

    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before the status line
    drip: float = 0.0  # seconds between body bytes (a slow-drip body)
    declared_length: int | None = None  # Content-Length to claim (None = the real length)
    close_after: int | None = None  # bytes of body to send before dropping the connection
    reset: bool = False  # close the socket without answering
    fail_first: int = 0  # answer ``fail_status`` to the first N requests, then normally
    fail_status: int = 429
    chunked_forever: bool = False  # a body that never ends (chunked), to test the size cap


class LoopbackServer:
    """Threaded HTTP/1.1 (keep-alive) server bound to 127.0.0.1 on a free port."""

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        """``tls``: (certificate, key) PEM paths to serve HTTPS instead of HTTP."""
        self.routes: dict[str, Route] = {}
        self.hits: Counter = Counter()
        self.connections: set[tuple[str, int]] = set()  # client (address, port) pairs seen
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
            self._scheme = "https"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base(self) -> str:
        """``http://127.0.0.1:PORT`` (or https)."""
        return f"{self._scheme}://127.0.0.1:{self._httpd.server_address[1]}"

    def add(self, path: str, **route: object) -> str:
        """Register ``path``; returns its full URL."""
        self.routes[path] = Route(**route)  # type: ignore[arg-type]
        return self.base + path

    def add_image(self, name: str, data: bytes, **route: object) -> str:
        """Serve ``data`` at ``/img/NAME`` with a content type from its magic bytes."""
        ctype = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
        return self.add(f"/img/{name}", body=data, content_type=ctype, **route)

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _make_handler(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = (
            True  # as real servers do (nginx tcp_nodelay): no 40 ms stalls on keep-alive
        )

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            with server._lock:
                server.hits[path] += 1
                server.connections.add(self.client_address)
                count = server.hits[path]
            server.enter()
            self._counted = True
            try:
                self._answer(server.routes.get(path), count)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                self._done()

        def _done(self) -> None:
            # Called before the last body bytes go out: once the client has the whole answer it may send
            # its next request, and that must not overlap this one in the in-flight count.
            if self._counted:
                self._counted = False
                server.leave()

        def _answer(self, route: Route | None, count: int) -> None:
            if route is None:
                return self._send(404, b"not found", "text/plain")
            if route.delay:
                time.sleep(route.delay)
            if route.reset:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            if count <= route.fail_first:
                return self._send(route.fail_status, b"busy", "text/plain", {"Retry-After": "0.05"})
            if route.chunked_forever:
                return self._chunked_forever()
            return self._send(route.status, route.body, route.content_type, route.headers, route)

        def _send(
            self,
            status: int,
            body: bytes,
            ctype: str,
            headers: dict | None = None,
            route: Route | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            declared = route.declared_length if route and route.declared_length is not None else len(body)
            self.send_header("Content-Length", str(declared))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if route and route.close_after is not None:
                self.wfile.write(body[: route.close_after])
                self.wfile.flush()
                self.close_connection = True
                return
            if route and route.drip:
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(route.drip)
                return
            self._done()
            self.wfile.write(body)

        def _chunked_forever(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = b"\xff" * 65536
            for _ in range(10_000):  # bounded: at most ~650 MB, the client stops long before
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            self.wfile.write(b"0\r\n\r\n")

    return Handler


def closed_port_url() -> str:
    """A URL on a loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing.jpg"


def self_signed_cert(folder: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command-line tool."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)
