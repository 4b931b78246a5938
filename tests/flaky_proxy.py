"""A loopback HTTP proxy that fails requests, in front of an S3 server.

Test infrastructure only: it stands between s3fs and moto's server to make storage flaky. Two
faults: a fraction of all requests answered 503 SlowDown (`failure_rate`), and the first
`fail_first` tries of each GET whose path contains `only` answered 500 InternalError, which
s3fs leaves to the client's retry settings (it retries SlowDown itself).
"""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


class FlakyProxy:
    def __init__(
        self,
        upstream: str,
        failure_rate: float = 0.0,
        seed: int = 0,
        *,
        fail_first: int = 0,
        only: str = "",
    ) -> None:
        target = urlparse(upstream)
        self.upstream = (target.hostname, target.port)
        self.failure_rate = failure_rate
        self.random = random.Random(seed)
        self.fail_first = fail_first
        self.only = only
        self.tries: Counter[tuple[str, str, str | None]] = Counter()
        self.lock = threading.Lock()
        self.requests = 0
        self.failures = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fail_this_one(self, method: str, path: str, byte_range: str | None) -> bytes | None:
        """The error body to answer with (503 SlowDown or 500 InternalError), or None."""
        with self.lock:
            self.requests += 1
            if method == "GET" and self.only and self.only in path:
                self.tries[(method, path, byte_range)] += 1
                if self.tries[(method, path, byte_range)] <= self.fail_first:
                    self.failures += 1
                    return _INTERNAL_ERROR
            if self.random.random() < self.failure_rate:
                self.failures += 1
                return _SLOW_DOWN
            return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                error = proxy._fail_this_one(self.command, self.path, self.headers.get("Range"))
                if error is not None:
                    self.send_response(503 if error is _SLOW_DOWN else 500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD response has no body
                        self.wfile.write(error)
                    return
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD response states the object's length but carries no body.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
