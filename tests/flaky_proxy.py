"""A flaky HTTP endpoint in front of a real S3 server: a proxy on 127.0.0.1 that answers some requests with S3's
503 SlowDown, drops some connections without an answer and delays others, so that botocore retries with its
jittered back-off (which draws from Python's `random` in the client's threads) as it does against a throttled bucket."""
from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
CONFLICT = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code>'
            b"<Message>A conflicting conditional operation is currently in progress against this resource."
            b"</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FlakyProxy:
    """Forwards to `upstream`; of every `every` requests one gets a 503, one loses its connection and one waits
    `delay` seconds first. `failed` counts the requests that failed on purpose."""

    def __init__(self, upstream: str, every: int = 6, delay: float = 0.05, conflicts: int = 0):
        self.upstream, self.every, self.delay = urlsplit(upstream), every, delay
        self.conflicts = conflicts  # conditional PUTs to answer 409 ConditionalRequestConflict first
        self.count = self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self._body()
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                    conflict = self.command == "PUT" and "If-None-Match" in self.headers and proxy.conflicts > 0
                    proxy.conflicts -= conflict
                if conflict:  # S3's answer to conditional writes of one key at once
                    self._answer(409, CONFLICT)
                    return
                if n % proxy.every == 1:
                    with proxy.lock:
                        proxy.failed += 1
                    self._answer(503, SLOW_DOWN)
                    return
                if n % proxy.every == 3:
                    with proxy.lock:
                        proxy.failed += 1
                    self.close_connection = True  # no answer at all: the client sees the connection drop
                    return
                if n % proxy.every == 5:
                    time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _answer(self, status: int, xml: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                self.wfile.write(xml)

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else (b"" if self.command in ("PUT", "POST") else None)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                """A client that closed its connection (botocore gave up on a request the proxy delayed) is no
                error of the code under test: nothing is printed into its output."""

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
