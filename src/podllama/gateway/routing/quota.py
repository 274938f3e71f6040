"""Per-key limits: requests per minute, tokens per minute and requests at once (a database key's rpm, tpm and
concurrency). A request over a limit is refused before it reaches a server (429 with Retry-After, the seconds
until it would be let in).

The windows slide over the last 60 seconds. Tokens are known only once an answer is complete: a request is let
in while the tokens of the last minute are under the limit, and its own count is added when it ends. The
windows are filled from the request log when the gateway starts, so a restart does not give a key a fresh
minute.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ...access.keys import Key

WINDOW = 60.0


class OverLimit(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Use:
    """One request in a key's window: when it was let in, and its tokens once known."""

    at: float
    tokens: int = 0


@dataclass
class Window:
    uses: deque[Use] = field(default_factory=deque)
    in_flight: int = 0

    def trim(self, now: float) -> None:
        while self.uses and self.uses[0].at <= now - WINDOW:
            self.uses.popleft()


class Quota:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.windows: dict[str, Window] = {}

    def admit(self, key: Key) -> Use | None:
        """Let a request of KEY in (returns its Use, to end with done()) or raise OverLimit. None: KEY has no
        limits, nothing to count."""
        if key.rpm is None and key.tpm is None and key.concurrency is None:
            return None
        now = self.clock()
        w = self.windows.setdefault(key.id, Window())
        w.trim(now)
        if key.concurrency is not None and w.in_flight >= key.concurrency:
            raise OverLimit(f"key '{key.name}' has {w.in_flight} requests under way, its limit (concurrency "
                            f"{key.concurrency}); try again when one has ended", 1)
        if key.rpm is not None and len(w.uses) >= key.rpm:
            wait = w.uses[len(w.uses) - key.rpm].at + WINDOW - now
            raise OverLimit(f"key '{key.name}' made {len(w.uses)} requests in the last minute, its limit (rpm "
                            f"{key.rpm}); try again in {math.ceil(wait)} s", max(1, math.ceil(wait)))
        if key.tpm is not None:
            used = sum(u.tokens for u in w.uses)
            if used >= key.tpm:
                wait = self._tokens_free_in(w, used - key.tpm + 1, now)
                raise OverLimit(f"key '{key.name}' used {used} tokens in the last minute, its limit (tpm "
                                f"{key.tpm}); try again in {math.ceil(wait)} s", max(1, math.ceil(wait)))
        use = Use(now)
        w.uses.append(use)
        w.in_flight += 1
        return use

    @staticmethod
    def _tokens_free_in(w: Window, needed: int, now: float) -> float:
        """Seconds until NEEDED tokens have left the window."""
        freed = 0
        for u in w.uses:
            freed += u.tokens
            if freed >= needed:
                return u.at + WINDOW - now
        return WINDOW

    def done(self, key: Key, use: Use | None) -> None:
        """USE has ended (its tokens set by then)."""
        if use is None:
            return
        w = self.windows.get(key.id)
        if w is not None:
            w.in_flight = max(0, w.in_flight - 1)

    def seed(self, past: Iterable[tuple[str, float, int]]) -> None:
        """Fill the windows from the request log: (key id, time, tokens) of the last minute's requests."""
        now = self.clock()
        for key_id, at, tokens in sorted(past, key=lambda r: r[1]):
            if at > now - WINDOW:
                self.windows.setdefault(key_id, Window()).uses.append(Use(at, tokens))
