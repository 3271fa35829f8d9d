"""An HTTP proxy on 127.0.0.1 in front of an S3 API server that records every request it forwards (method and
path): what the bench counts requests per unit with, and what the tests' flaky endpoint is built on."""
from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class Proxy:
    """Forwards every request to `upstream` unless `intercept` answers it; `requests` lists (method, path) of each
    request received, in order."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self._body()
                with proxy.lock:
                    proxy.requests.append((self.command, unquote(urlsplit(self.path).path)))
                    n = len(proxy.requests)
                if proxy.intercept(self, n):
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = proxy.headers({k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP})
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

            def answer(self, status: int, xml: bytes) -> None:
                """Answer without forwarding."""
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

    def intercept(self, handler, n: int) -> bool:
        """Whether the `n`th request was answered (or dropped) here rather than forwarded: never, here."""
        return False

    def headers(self, headers: dict) -> dict:
        """The headers forwarded: all but hop-by-hop ones, here."""
        return headers

    def counted(self, marker: str) -> Counter:
        """Requests by method whose path holds `marker` (an object store's prefix)."""
        with self.lock:
            return Counter(method for method, path in self.requests if marker in path)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "Proxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
