"""An HTTP proxy in front of an S3 endpoint that answers the first `fail_puts` PUT requests with 503 SlowDown,
the way S3 throttles a busy prefix; everything else is passed through unchanged."""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>injected by tests/flaky_s3.py</Message></Error>"
HOP_HEADERS = ("transfer-encoding", "content-length", "connection")


@contextmanager
def flaky_s3(upstream: str, fail_puts: int) -> Iterator[tuple[str, dict[str, int]]]:
    """Yield (proxy URL, counts of PUTs seen and refused)."""
    target = urllib.parse.urlsplit(upstream)
    counts = {"puts": 0, "refused": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args) -> None:
            return

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                continue
            return body

        def _refuse(self) -> bool:
            with lock:
                counts["puts"] += 1
                refuse = counts["refused"] < fail_puts
                counts["refused"] += refuse
            return refuse

        def _forward(self) -> None:
            body = self._body()
            if self.command == "PUT" and self._refuse():
                self.send_response(503)
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            conn.request(self.command, self.path, body=body,
                         headers={k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS})
            answer = conn.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in HOP_HEADERS or (self.command == "HEAD" and key.lower() == "content-length"):
                    self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", counts
    finally:
        server.shutdown()
        server.server_close()
