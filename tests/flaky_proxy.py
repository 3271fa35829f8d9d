"""A flaky HTTP endpoint in front of a real S3 server: a proxy on 127.0.0.1 that answers some requests with S3's
503 SlowDown, drops some connections without an answer and delays others, so that botocore retries with its
jittered back-off (which draws from Python's `random` in the client's threads) as it does against a throttled bucket."""
from __future__ import annotations

import time

from replaykd.stages.bench.http_proxy import Proxy

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
CONFLICT = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code>'
            b"<Message>A conflicting conditional operation is currently in progress against this resource."
            b"</Message></Error>")


class FlakyProxy(Proxy):
    """Forwards to `upstream`; of every `every` requests one gets a 503, one loses its connection and one waits
    `delay` seconds first. `failed` counts the requests that failed on purpose."""

    def __init__(self, upstream: str, every: int = 6, delay: float = 0.05, conflicts: int = 0,
                 ignore_conditions: bool = False):
        super().__init__(upstream)
        self.every, self.delay = every, delay
        self.conflicts = conflicts  # conditional PUTs to answer 409 ConditionalRequestConflict first
        self.ignore_conditions = ignore_conditions  # drop If-None-Match, as older Ceph RGW ignores it
        self.failed = 0

    @property
    def count(self) -> int:
        return len(self.requests)

    def intercept(self, handler, n: int) -> bool:
        with self.lock:
            conflict = handler.command == "PUT" and "If-None-Match" in handler.headers and self.conflicts > 0
            self.conflicts -= conflict
        if conflict:  # S3's answer to conditional writes of one key at once
            handler.answer(409, CONFLICT)
            return True
        if n % self.every in (1, 3):
            with self.lock:
                self.failed += 1
            if n % self.every == 1:
                handler.answer(503, SLOW_DOWN)
            else:
                handler.close_connection = True  # no answer at all: the client sees the connection drop
            return True
        if n % self.every == 5:
            time.sleep(self.delay)
        return False

    def headers(self, headers: dict) -> dict:
        return {k: v for k, v in headers.items()
                if not (self.ignore_conditions and k.lower() == "if-none-match")}
