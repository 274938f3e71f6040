"""Clients kept informed while their server loads: a streamed request that has had no answer for `[gateway]
progress_interval` seconds gets its answer started (200, text/event-stream) and a comment line at that interval
saying what its server is doing (`: loading chat: loading model, 12 s, about 40 %`), until the server's own
answer begins. Clients and the proxies between them see a live connection, not a silent one they give up on.

It stands in for the request's `send`, so every way the request can end after the wait is covered without a
branch of its own: the server's answer (its head is dropped, its events follow the comments), and any refusal
or error, the gateway's or the server's — turned into the stream's error event in the API's own shape, since the
status line has gone already. A request answered within the interval is sent exactly as without it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from ..front.errors import Send, upstream_message

SSE_HEAD = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]


def _openai(status: int, body: bytes) -> bytes:
    error = {"code": status, "message": upstream_message(status, body), "type": "server_error" if status >= 500
             else "invalid_request_error"}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


def _anthropic(status: int, body: bytes) -> bytes:
    kind = "overloaded_error" if status == 503 else "api_error" if status >= 500 else "invalid_request_error"
    data = {"type": "error", "error": {"type": kind, "message": upstream_message(status, body)}}
    return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"


def _responses(status: int, body: bytes) -> bytes:
    data = {"type": "error", "code": str(status), "message": upstream_message(status, body), "param": None}
    return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"


# an answer shape (routes.py) → how its stream says an error
ERROR_EVENTS: dict[str, Callable[[int, bytes], bytes]] = {"anthropic": _anthropic, "responses": _responses}


def wants_stream(data: Any) -> bool:
    """A JSON body that asks for a streamed answer."""
    return isinstance(data, dict) and data.get("stream") is True


class Heartbeat:
    """The `send` of a streamed request that may wait (see the module's text). STAGE says what its server is
    doing; ANSWER is the shape of the route's answer (routes.py), which says how its stream reports an error.

    A request answered within the interval costs one timer: the task that sends the beats is made only when
    the interval has passed with no answer."""

    def __init__(self, send: Send, interval: float, stage: Callable[[], str], answer: str) -> None:
        self._send, self.interval, self.stage = send, interval, stage
        self.error_event = ERROR_EVENTS.get(answer, _openai)
        self.started = False  # the answer's head has gone (ours)
        self.answered = False  # the real answer's head came
        self._error: bytearray | None = None
        self._status = 0
        self._lock = asyncio.Lock()  # one send at a time: the ticker's or the request's
        self._ticker: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(interval, self._begin)

    def _begin(self) -> None:
        self._timer = None
        self._ticker = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            async with self._lock:
                if self.answered:
                    return
                if not self.started:
                    self.started = True
                    await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEAD})
                line = ": " + self.stage().replace("\n", " ").replace("\r", " ")
                await self._send({"type": "http.response.body", "body": line.encode() + b"\n\n", "more_body": True})
            await asyncio.sleep(self.interval)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def __call__(self, message: dict[str, Any]) -> None:
        if not self.answered:
            async with self._lock:  # (a beat being sent finishes first)
                self.answered = True
            self.stop()
            if message["type"] == "http.response.start" and self.started:
                self._status = message["status"]
                if self._status >= 400:  # sent as the stream's error event once its body is whole
                    self._error = bytearray()
                return  # the head has gone: ours
        if self._error is not None and message["type"] == "http.response.body":
            self._error += message.get("body", b"")
            if not message.get("more_body", False):
                await self._send({"type": "http.response.body", "more_body": False,
                                  "body": self.error_event(self._status, bytes(self._error))})
            return
        await self._send(message)


__all__ = ["Heartbeat", "wants_stream"]
