"""One request on its way to a server: what cancels it when its client goes away, in every phase (waiting for a
load, queued for a connection, streaming), and what it came to."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..front.client import Response
from ..front.errors import Receive
from ..front.outbox import Outbox

T = TypeVar("T")


class Flight:
    """One request on its way: what the disconnect watcher needs to cancel it."""

    __slots__ = ("response", "finished", "disconnected", "task", "outbox", "abort")

    def __init__(self, abort: Callable[[], object] | None = None) -> None:
        self.response: Response | None = None
        self.finished = False
        self.disconnected = False
        self.task = asyncio.current_task()
        self.outbox: Outbox | None = None
        self.abort = abort  # closes the client's connection at once (server.py puts it in the scope)

    def gone(self) -> None:
        """The client went away: stop the server's work for it and whatever waits for it."""
        self.disconnected = True
        if self.outbox is not None:
            self.outbox.close()
        if self.response is not None:
            self.response.close()  # llama-server sees the connection go and stops
        elif self.task is not None:
            self.task.cancel()  # still queued for a connection: stop waiting

    def close_client(self) -> None:
        """The client fell too far behind: its connection is closed (what it has not read is lost)."""
        if self.outbox is not None:
            self.outbox.close()
        if self.abort is not None:
            self.abort()


class Outcome:
    """What a request came to, for the metrics and the log: its status and time to the first byte."""

    __slots__ = ("status", "ttfb")

    def __init__(self) -> None:
        self.status = 502
        self.ttfb: float | None = None


async def unless_gone(work: Awaitable[T], receive: Receive | None, flight: Flight) -> T | None:
    """WORK's result, or None once the client has gone (watched through RECEIVE where the body has been read
    already; without RECEIVE the request's own watcher cancels the task)."""
    if receive is None:
        return await work
    waiting = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch(receive, flight))
    try:
        await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the watcher cancels the request's task when the client goes
        if not flight.disconnected:
            raise
    finally:
        watcher.cancel()
        waiting.cancel()
    return None if flight.disconnected else waiting.result()


async def watch(receive: Receive, flight: Flight) -> None:
    """Waits for the client to go away; then closes the upstream connection (llama-server stops)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
    if not flight.finished:
        flight.gone()

