"""Fault injection on a real stack under load, shared by tests/integration/test_faults.py (which asserts the
targets) and bench/faults.py (which measures and writes bench/RESULTS-faults.md).

`Load` is a few clients sending small chat completions through the gateway in a loop, each on a keep-alive
connection (a new one after any error), recording every request: when it was sent and answered, how it
ended, and whether any byte of its answer had arrived. The faults are what happens to real machines:
a server's process killed (`kill -9` of its PID from the host), the gateway's process killed, the engine's
API service killed."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from tests.helpers import get_ok

CHAT = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}).encode()


@dataclass
class Request:
    sent: float
    ended: float
    outcome: str  # "ok", "status 503", "error ConnectionRefusedError" …
    answered: bool  # a whole response arrived (a failure with it is an error status, not a broken connection)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass
class Load:
    host: str
    port: int
    clients: int = 4
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 120
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Load:
        for _ in range(self.clients):
            t = threading.Thread(target=self._client, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def _client(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            sent, answered = time.monotonic(), False
            try:
                conn.request("POST", "/v1/chat/completions", CHAT,
                             {"Content-Type": "application/json", **self.headers})
                resp = conn.getresponse()
                resp.read()
                answered = True
                outcome = "ok" if resp.status == 200 else f"status {resp.status}"
                if resp.status != 200 or resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                outcome = f"error {type(e).__name__}"
                conn.close()
                conn = None
            with self._lock:
                self.requests.append(Request(sent, time.monotonic(), outcome, answered))
            if outcome != "ok":
                time.sleep(0.05)  # as a client that tries again, not in a tight loop
        if conn is not None:
            conn.close()

    def wait_for(self, n: int, timeout: float = 60) -> None:
        """Until N requests have ended."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.requests) >= n, f"only {len(self.requests)} requests ended in {timeout}s"

    def around(self, at: float) -> dict[str, object]:
        """What the requests in flight at AT, or sent after it, saw."""
        with self._lock:
            after = [r for r in self.requests if r.ended >= at]
        failed = [r for r in after if not r.ok]
        return {
            "sent": len(after), "failed": len(failed),
            "failed_answered": len([r for r in failed if r.answered]),  # an error status, not a broken connection
            "failures": sorted({r.outcome for r in failed}),
            "last_failure_s": round(max((r.ended - at for r in failed), default=0), 2),
            "slowest_s": round(max((r.ended - r.sent for r in after), default=0), 2),
        }


# -- the faults -------------------------------------------------------------------------------------------------
def kill_process(pid: int) -> float:
    """SIGKILL a container's main process from the host; returns when it was sent."""
    at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return at


def until(predicate, timeout: float, every: float = 0.05) -> float | None:
    """Seconds until PREDICATE holds (None: not within TIMEOUT)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if predicate():
                return time.monotonic() - t0
        except Exception:
            pass
        time.sleep(every)
    return None


def answers_health(url: str) -> bool:
    return get_ok(url + "/health", timeout=1)


def podman_service_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "podman system service"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_podman_service() -> float:
    """The engine's API service gone (the gateway drives Podman through it)."""
    pids = podman_service_pids()
    assert pids, "no Podman API service runs"
    at = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return at
