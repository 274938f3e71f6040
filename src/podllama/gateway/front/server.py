"""Serving the gateway: uvicorn (httptools, uvloop) with limits on what a client may send and how long it may
keep the gateway waiting. uvicorn's own parser takes headers of any size and count, and waits for them, for
bodies and for a client to read its answer forever; a client sending 32 MB of headers, one byte a minute, or
reading nothing would hold memory or a connection for as long as it likes. Here, on every connection (Go's
http.Server timeouts, nginx's client_body_timeout and send_timeout, Kestrel's minimum data rate):
- the request line and headers together are capped (`max_header_kb`, `max_headers` → 431) and must arrive
  within `header_timeout` (408);
- the head is strict (RFC 9112): exactly one Host on HTTP/1.1, and an absolute-form target must name the same
  authority as Host (400);
- a body that sends nothing for `body_timeout`, or averages under `min_body_rate` bytes a second once
  `body_grace` seconds have passed, is cut off (408) — time the gateway itself stopped reading is not counted;
- a client that takes none of its answer for `send_timeout` is closed (the proxy's outbox has already freed
  the server).
Body sizes are capped in the guard and the proxy. The scope carries `extensions["podllama.abort"]`, which
closes the connection at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ...access.tls import Tls
from ...config import GatewaySection
from .errors import error_body


@dataclass
class Limits:
    """What a request's head may be. One object shared by every connection; a config reload changes it."""

    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    min_body_rate: float = 240.0
    body_grace: float = 5.0
    send_timeout: float = 60.0

    def configure(self, gateway: GatewaySection) -> None:
        self.max_header_bytes = gateway.max_header_kb * 1024
        self.max_headers = gateway.max_headers
        self.header_timeout = gateway.header_timeout
        self.body_timeout = gateway.body_timeout
        self.min_body_rate = gateway.min_body_rate
        self.body_grace = gateway.body_grace
        self.send_timeout = gateway.send_timeout


class ParseStopped(Exception):
    """Raised in a parser callback: httptools stops, and the refusal set before it is sent."""


BODY_CHECK_EVERY = 1.0  # seconds between looks at a pending body's progress


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing oversized and slow request heads."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_bytes = 0
        self._head_count = 0
        self._hosts: list[bytes] = []
        self._refusal: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._body_seen = 0.0  # when body bytes last arrived (or the gateway last paused reading them)
        self._body_start = 0.0  # when the body began, moved on by the time the gateway paused reading
        self._body_bytes = 0
        self._body_checked = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # the first request's head must come within header_timeout, like every later one

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_body_watch()
        self._stop_send_watch()
        super().connection_lost(exc)

    # -- a client that reads nothing -----------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.limits.send_timeout, self.abort)

    def resume_writing(self) -> None:
        self._stop_send_watch()
        super().resume_writing()

    def _stop_send_watch(self) -> None:
        self._send_timer = _cancel(self._send_timer)

    def abort(self) -> None:
        """Close the connection at once, whatever is still unsent (a client that stopped reading)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        self._head_timer = _cancel(self._head_timer)

    def _too_slow(self) -> None:
        self._head_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self._refuse(408, f"the request's head did not arrive within {self.limits.header_timeout:g}s "
                              "([gateway] header_timeout)")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._head_count = 0
        self._hosts = []
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        if name.lower() == b"host":
            self._hosts.append(value.strip())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        problem = self._head_problem()
        if problem is not None:
            self._refusal = (400, problem)
            raise ParseStopped
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions["podllama.abort"] = self.abort
        super().on_headers_complete()
        now = self.loop.time()
        self._body_seen = self._body_start = self._body_checked = now
        self._body_bytes = 0
        self._stop_body_watch()
        self._body_timer = self.loop.call_later(BODY_CHECK_EVERY, self._check_body)

    def _head_problem(self) -> str | None:
        """What makes the head unusable (RFC 9112 3.2): not one Host on HTTP/1.1, or an absolute-form target whose
        authority is not the Host."""
        version = self.parser.get_http_version()
        if len(self._hosts) > 1 or (version == "1.1" and not self._hosts):
            return "an HTTP/1.1 request has exactly one Host header"
        url = self.url
        if url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
            authority = url.split(b"/", 3)[2].lower()
            if not self._hosts or authority != self._hosts[0].lower():
                return "the request target's host and the Host header differ"
        elif not url.startswith(b"/") and url != b"*":
            return "the request target is not a path (origin-form) or an absolute URL"
        return None

    def on_body(self, body: bytes) -> None:
        self._body_seen = self.loop.time()
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_body_watch()
        super().on_message_complete()

    def _stop_body_watch(self) -> None:
        self._body_timer = _cancel(self._body_timer)

    def _check_body(self) -> None:
        """A request body still pending: cut it off when the client has sent nothing for body_timeout, or has
        averaged under min_body_rate since body_grace, while the gateway was reading (a pause the gateway made
        itself — backpressure — is not the client's)."""
        self._body_timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:
            self._body_seen = now
            self._body_start += now - self._body_checked
        self._body_checked = now
        limits = self.limits
        elapsed = now - self._body_start
        if now - self._body_seen >= limits.body_timeout:
            message = f"the request body sent nothing for {limits.body_timeout:g}s ([gateway] body_timeout)"
        elif limits.min_body_rate and elapsed > limits.body_grace and self._body_bytes < limits.min_body_rate * elapsed:
            message = (f"the request body came at {self._body_bytes / elapsed:.0f} bytes/s, under "
                       f"{limits.min_body_rate:g} ([gateway] min_body_rate)")
        else:
            self._body_timer = self.loop.call_later(BODY_CHECK_EVERY, self._check_body)
            return
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
            raise ParseStopped  # httptools stops parsing; uvicorn answers through send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(*self._refusal)

    def _refuse(self, status: int, message: str) -> None:
        self._disarm()
        body = error_body(status, message)
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}.get(
            status, b"Error")
        self.transport.write(b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%b" % (status, reason, len(body), body))
        self.transport.close()


def _cancel(timer: asyncio.TimerHandle | None) -> asyncio.TimerHandle | None:
    """Cancel TIMER if there is one; returns None, for `self.x = _cancel(self.x)`."""
    if timer is not None:
        timer.cancel()
    return None


def config(app: Any, host: str, port: int, limits: Limits, tls: Tls | None = None) -> uvicorn.Config:
    """TLS: the certificate and key it serves HTTPS with (access/tls.py); a plain-HTTP client on a TLS port
    fails its handshake and is closed."""
    def protocol(*args: Any, **kwargs: Any) -> LimitedProtocol:
        return LimitedProtocol(*args, limits=limits, **kwargs)

    return uvicorn.Config(app, host=host, port=port, loop="uvloop", http=protocol,  # type: ignore[arg-type]
                          log_level="warning", access_log=False, lifespan="on", proxy_headers=False,
                          server_header=False, date_header=False, ws="none",
                          ssl_certfile=str(tls.cert) if tls else None, ssl_keyfile=str(tls.key) if tls else None)


def serve(app: Any, host: str, port: int, limits: Limits, tls: Tls | None = None) -> None:
    uvicorn.Server(config(app, host, port, limits, tls)).run()
