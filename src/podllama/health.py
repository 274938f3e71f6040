"""Is a llama-server up? llama-server answers 503 while it loads its model: that is "loading", not "failed"."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

OK, LOADING, DOWN = "ok", "loading", "down"


def probe(url: str, timeout: float = 2.0) -> str:
    """One look at URL/health: ok, loading (503), down (no answer), or error:<status>."""
    try:
        r = httpx.get(f"{url}/health", timeout=timeout)
    except httpx.HTTPError:
        return DOWN
    if r.status_code == 200:
        return OK
    if r.status_code == 503:
        return LOADING
    return f"error:{r.status_code}"


def wait_healthy(url: str, timeout: float, alive: Callable[[], bool] | None = None, interval: float = 0.2) -> str:
    """Poll until /health is 200. Returns ok, or why not: exited (the container stopped) or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = probe(url)
        if state == OK:
            return OK
        if state == DOWN and alive is not None and not alive():
            return "exited"
        time.sleep(interval)
    return "timeout"
