"""What the servers are doing, as a feed: each change of a server's phase or load stage (servers.py), kept (the
last KEEP) for the dashboard and sent to whoever follows /admin/events.

A follower that does not read misses events (its queue is bounded); it never holds the gateway or another
follower back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ...engine.health import LOADING, OK

if TYPE_CHECKING:
    from .servers import Server

KEEP = 200
FOLLOWER_QUEUE = 100


def seen(h: Server) -> str:
    """H's phase as far as it can be told without asking the stack's state (which the feed must not read on
    every probe): the phase the gateway drives, else what its health says — ready, starting (loading), down."""
    if h.driving is not None:
        return str(h.driving.value)
    return {OK: "ready", LOADING: "starting"}.get(h.health(), "down")


def event_of(h: Server) -> dict[str, Any]:
    """A server's condition as the feed says it: its phase, its stage (what the gateway does to it within the
    phase, or the phase itself) and a sentence for people."""
    phase = seen(h)
    return {"at": time.time(), "server": h.name, "phase": phase, "stage": h.step or phase,
            "detail": h.describe() if h.step else phase}


class Feed:
    def __init__(self, keep: int = KEEP) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._last: dict[str, tuple[str, str]] = {}
        self._followers: set[asyncio.Queue[dict[str, Any]]] = set()

    def note(self, h: Server) -> None:
        """H changed: an event when its phase or stage did (its health flapping within a phase is not one)."""
        key = (seen(h), h.step)
        if self._last.get(h.name) == key:
            return
        self._last[h.name] = key
        event = event_of(h)
        self.recent.append(event)
        for queue in list(self._followers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

    @contextlib.contextmanager
    def follow(self) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        """The events from now on, while the block lasts."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(FOLLOWER_QUEUE)
        self._followers.add(queue)
        try:
            yield queue
        finally:
            self._followers.discard(queue)


__all__ = ["Feed", "event_of"]
