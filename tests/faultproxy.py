"""A tiny HTTP proxy on loopback that makes an S3 endpoint unreliable, for tests.

It fails a share of requests with 500/503 (before they reach the store, so a failed
request changed nothing) and delays a share of the others; ``fail_all`` fails every
request, ``fail_paths`` every request whose path contains one of them, ``fail_first`` the
first request whose path contains one of them. The random choices come
from a seeded random generator (the seed is printed to replay a failure; the order in
which concurrent requests draw from it is not fixed). ``requests`` records
(method, path, status, lower-cased headers) of each request.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "expect",
        "content-length", "te", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, *, fail_rate: float = 0.0, delay_rate: float = 0.0,
                 max_delay: float = 0.2, seed: int | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.fail_rate, self.delay_rate, self.max_delay = fail_rate, delay_rate, max_delay
        self.seed = random.randrange(2**32) if seed is None else seed
        print(f"fault proxy seed: {self.seed}")
        self.rng = random.Random(self.seed)
        self.lock = threading.Lock()
        self.fail_all = False
        self.fail_paths: tuple[str, ...] = ()
        #: the first request whose path contains one of these fails, whatever the dice say
        self.fail_first: set[str] = set()
        self.requests: list[tuple[str, str, int, dict[str, str]]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def failed(self) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r[2] >= 500)

    def decide(self, path: str) -> tuple[int | None, float]:
        """(status to fail with or None, seconds to delay)."""
        with self.lock:
            fail, delay = self.rng.random(), self.rng.random()
            status = self.rng.choice((500, 503))
            pause = self.rng.uniform(0, self.max_delay)
            first = next((p for p in self.fail_first if p in path), None)
            if first is not None:
                self.fail_first.discard(first)
                return status, 0.0
            if self.fail_all or any(p in path for p in self.fail_paths) or fail < self.fail_rate:
                return status, 0.0
            return None, pause if delay < self.delay_rate else 0.0

    def record(self, method: str, path: str, status: int, headers: dict[str, str]) -> None:
        with self.lock:
            self.requests.append((method, path, status, headers))


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _proxy(self) -> None:
            body = self._body()
            headers = {k.lower(): v for k, v in self.headers.items() if k.lower() not in _HOP}
            status, delay = proxy.decide(self.path)
            if status is not None:
                proxy.record(self.command, self.path, status, headers)
                code = "SlowDown" if status == 503 else "InternalError"
                data = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        "<Message>injected by the fault proxy</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return
            if delay:
                time.sleep(delay)  # injected latency, not a wait for a condition
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                conn.request(self.command, self.path, body=body if body else None,
                             headers={**headers, "Content-Length": str(len(body))}
                             if body or self.command in ("PUT", "POST") else headers)
                response = conn.getresponse()
                data = response.read()
                proxy.record(self.command, self.path, response.status, headers)
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP and key.lower() not in ("date", "server"):
                        self.send_header(key, value)
                length = (response.getheader("Content-Length") or "0"
                          if self.command == "HEAD" else str(len(data)))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

    return Handler
