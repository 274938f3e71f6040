"""Is a llama-server up? llama-server answers 503 while it loads its model: that is "loading", not "failed"."""

from __future__ import annotations

import http.client
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from . import CliEngine, ContainerInfo

OK, LOADING, DOWN = "ok", "loading", "down"
STATES = {200: OK, 503: LOADING}  # /health status → state


def probe(url: str, timeout: float = 2.0, path: str = "/health", headers: list[tuple[bytes, bytes]] | None = None,
          context: ssl.SSLContext | None = None) -> str:
    """One look at URL/health (or PATH; an https:// URL verified with CONTEXT): ok, loading (503), down (no
    answer), or error:<status>. A bare http.client request: it runs every few seconds per server, so it should
    cost next to nothing."""
    where = urlsplit(url)  # IPv6 addresses come in brackets
    conn = http.client.HTTPSConnection(where.hostname or "", where.port or 443, timeout=timeout, context=context) \
        if where.scheme == "https" else http.client.HTTPConnection(where.hostname or "", where.port or 80,
                                                                     timeout=timeout)
    try:
        conn.request("GET", path, headers={k.decode(): v.decode() for k, v in headers or []})
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return DOWN
    finally:
        conn.close()
    return STATES.get(status, f"error:{status}")


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


def container_health(engine: CliEngine, info: ContainerInfo, port: int) -> str:
    """Health of a server container: over its network address, or, where that cannot be reached from here
    (rootless networking), from inside the container."""
    if info.ip:
        state = probe(f"http://{info.ip}:{port}")
        if state != DOWN:
            return state
    proc = engine.exec(info.name, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                                   f"http://127.0.0.1:{port}/health"], timeout=10)
    code = proc.stdout.strip()
    return STATES.get(int(code), DOWN) if code.isdigit() else DOWN
