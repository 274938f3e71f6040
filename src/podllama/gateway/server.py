"""Serving the gateway: uvicorn (httptools, uvloop) with limits on what a client may send. uvicorn's own
parser takes headers of any size and count, and waits for them and for bodies forever; a client sending 32 MB
of headers, or one byte a minute, would hold memory or a connection for as long as it likes. Here the request
line and headers together are capped (`max_header_kb`, `max_headers` → 431) and must arrive within
`header_timeout`, and a body that sends nothing for `body_timeout` — while the gateway is reading it — is cut
off (both → 408). Body sizes are capped in the guard and the proxy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import GatewaySection
from .errors import error_body


@dataclass
class Limits:
    """What a request's head may be. One object shared by every connection; a config reload changes it."""

    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 60.0

    def configure(self, gateway: GatewaySection) -> None:
        self.max_header_bytes = gateway.max_header_kb * 1024
        self.max_headers = gateway.max_headers
        self.header_timeout = gateway.header_timeout
        self.body_timeout = gateway.body_timeout


class HeadTooLarge(Exception):
    pass


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing oversized and slow request heads."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_bytes = 0
        self._head_count = 0
        self._refusal: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_seen = 0.0  # when body bytes last arrived (or the gateway last paused reading them)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # the first request's head must come within header_timeout, like every later one

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_body_watch()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self._refuse(408, f"the request's head did not arrive within {self.limits.header_timeout:g}s "
                              "([gateway] header_timeout)")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._head_count = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        self._body_seen = self.loop.time()
        self._stop_body_watch()
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._check_body)

    def on_body(self, body: bytes) -> None:
        self._body_seen = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_body_watch()
        super().on_message_complete()

    def _stop_body_watch(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _check_body(self) -> None:
        """A request body still pending: cut it off when the client has sent nothing for body_timeout while the
        gateway was reading (a pause the gateway made itself — backpressure — is not the client's)."""
        self._body_timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:
            self._body_seen = now
        idle = now - self._body_seen
        if idle < self.limits.body_timeout:
            self._body_timer = self.loop.call_later(self.limits.body_timeout - idle, self._check_body)
            return
        message = f"the request body sent nothing for {self.limits.body_timeout:g}s ([gateway] body_timeout)"
        started = cycle.response_started
        cycle.disconnected = True  # the app sees the client gone and writes nothing after this
        cycle.message_event.set()
        if started:
            self.transport.close()
        else:
            self._refuse(408, message)

    def _count(self, size: int, headers: int) -> None:
        self._head_bytes += size
        self._head_count += headers
        if self._head_bytes > self.limits.max_header_bytes or self._head_count > self.limits.max_headers:
            self._refusal = (431, f"request line and headers over {self.limits.max_header_bytes // 1024} KiB or "
                                  f"{self.limits.max_headers} headers ([gateway] max_header_kb, max_headers)")
            raise HeadTooLarge  # httptools stops parsing; uvicorn answers through send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(*self._refusal)

    def _refuse(self, status: int, message: str) -> None:
        self._disarm()
        body = error_body(status, message)
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}.get(status, b"Error")
        self.transport.write(b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%b" % (status, reason, len(body), body))
        self.transport.close()


def config(app: Any, host: str, port: int, limits: Limits) -> uvicorn.Config:
    def protocol(*args: Any, **kwargs: Any) -> LimitedProtocol:
        return LimitedProtocol(*args, limits=limits, **kwargs)

    return uvicorn.Config(app, host=host, port=port, loop="uvloop", http=protocol,  # type: ignore[arg-type]
                          log_level="warning", access_log=False, lifespan="on", proxy_headers=False,
                          server_header=False, date_header=False, ws="none")


def serve(app: Any, host: str, port: int, limits: Limits) -> None:
    uvicorn.Server(config(app, host, port, limits)).run()
