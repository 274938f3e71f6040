"""One handle per server: everything the gateway knows of a server's condition, in one object.

A server's phase is one of `Phase`. Three are observed — STOPPED, STARTING, READY — from its replicas' health
(probed by the registry, upstreams.py) and from what the stack's state says should run (state.py): a server
that answers 503, or answers nothing but should run and is coming back, is STARTING. The other phases are
driven by the gateway itself (gateway/ondemand.py): STARTING while it loads the server, DRAINING while it waits
for the server's requests to end before stopping it, STOPPING while it saves its prompt caches and stops it.
A driven phase holds until the gateway moves on, and only along `MOVES`; then the observed one speaks again.

The handle also holds the server's replicas (address, health, requests in flight each), the requests admitted
to it and waiting for its load, when it was last used and what it holds in memory. Every question — is it
up, may a request go to it now, why is it not coming, what does it hold — is answered here.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ...config import ServerSection
from ...engine.health import DOWN, LOADING, OK
from ...stack import SERVER_PORT
from ...stack.state import RUNNING, STOPPED, UNLOADED, replica_key


class Phase(enum.Enum):
    STOPPED = "stopped"  # no replica answers, and none is coming (not loaded, stopped, given up on)
    STARTING = "starting"  # loading its model, being loaded by the gateway, or down and coming back
    READY = "ready"  # a replica answers, and nothing is about to stop it
    DRAINING = "draining"  # to be stopped once its requests are done; new ones wait
    STOPPING = "stopping"  # its prompt caches saved, its container stopped


# the driven phases and where each may go (None: back to what is observed)
MOVES: dict[Phase | None, frozenset[Phase | None]] = {
    None: frozenset({Phase.STARTING, Phase.DRAINING, Phase.STOPPING}),
    Phase.STARTING: frozenset({None}),
    Phase.DRAINING: frozenset({Phase.STOPPING, None}),
    Phase.STOPPING: frozenset({None}),
}
# as llama.cpp's router mode says it (a draining server still answers the requests it has)
MODEL_STATES = {Phase.READY: "loaded", Phase.DRAINING: "loaded", Phase.STARTING: "loading"}


class BadMove(RuntimeError):
    """A transition MOVES does not allow: a bug in the caller, never a client's doing."""


class Lineage(NamedTuple):
    """Which build and model file a replica runs, for the request log: its image's id, llama.cpp commit, model
    file's sha256 and the settings' hash (empty where discovery could not tell: remote servers, DNS)."""

    image: str = ""
    llama_commit: str = ""
    model_sha256: str = ""
    config_hash: str = ""


NO_LINEAGE = Lineage()


@dataclass
class Replica:
    server: str
    container: str
    host: str
    port: int = SERVER_PORT
    state: str = DOWN  # health.OK | LOADING | DOWN | error:<status>
    in_flight: int = 0
    changed: float = field(default_factory=time.monotonic)
    lineage: Lineage = NO_LINEAGE

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"


@dataclass
class Figure:
    """What a server holds, per device: estimated before it ran, measured since (for the settings of HASH)."""

    hash: str = ""
    estimate: dict[str, int] = field(default_factory=dict)
    measured: dict[str, int] = field(default_factory=dict)
    context: int | None = None  # a fitted server's context per request, as llama-server chose it (/props)

    @property
    def devices(self) -> dict[str, int]:
        """The figure decisions use: measured where it was, else estimated."""
        return self.estimate | self.measured


@dataclass(eq=False)
class Ticket:
    """A request waiting for its server's load; granted: counted in flight by the load."""

    granted: bool = False


Saved = Callable[[], dict[str, dict[str, Any]]]  # the stack's saved server entries, by replica key


class Server:
    """The handle of server NAME. SAVED reads what the stack's state says of its replicas (None: nothing is
    expected to run); REMOTE: the address of a server podllama does not run; ORCHESTRATED: an orchestrator runs
    it and brings it back when it dies; ANNOUNCE hears of every change (the registry's feed of stages)."""

    def __init__(self, name: str, section: ServerSection, saved: Saved | None, remote: str | None = None,
                 orchestrated: bool = False, announce: Callable[[Server], None] = lambda h: None) -> None:
        self.name = name
        self.step = ""  # what the gateway is doing to it within its phase (the loader's stages), "" when nothing
        self.step_since = time.monotonic()
        self.load_seconds: float | None = None  # how long its last load by the gateway took
        self.announce = announce
        self.replicas: list[Replica] = []
        self.driving: Phase | None = None
        self.loading: asyncio.Task[None] | None = None  # the gateway's load of it, shared by all who wait
        self.loading_since: float | None = None  # when that load began (monotonic)
        self.tickets: set[Ticket] = set()  # requests waiting for that load
        self.in_flight = 0  # requests admitted by the loader (on-demand servers), streams included
        self.last_used = 0.0  # epoch seconds
        self.figure: Figure | None = None
        self.waiters = 0  # requests waiting for it to answer
        self.watcher: asyncio.Task[None] | None = None  # probes it often while any waits
        self.remote, self.orchestrated = remote, orchestrated
        self._saved = saved
        self._changed = asyncio.Event()
        self.configure(section)

    def recall(self, saved: dict[str, dict[str, Any]]) -> None:
        """What the stack's state (SAVED: its server entries) remembers of it: its last use, its memory."""
        entry = saved.get(self.keys[0]) or {}
        if entry.get("last_used"):
            self.last_used = float(entry["last_used"])
        if entry.get("memory"):
            m = entry["memory"]
            self.figure = Figure(m.get("hash", ""), m.get("estimate", {}), m.get("measured", {}), m.get("context"))

    def configure(self, section: ServerSection) -> None:
        self.section = section
        self.threads = _http_threads(section)

    @property
    def keys(self) -> list[str]:
        """Its replicas' entries in the stack's state."""
        return [replica_key(self.name, r) for r in range(1, self.section.replicas + 1)]

    def saved(self) -> list[dict[str, Any]]:
        """What the stack's state says of each replica ({} where nothing)."""
        saved = self._saved() if self._saved is not None else {}
        return [saved.get(k) or {} for k in self.keys]

    # -- what is observed ---------------------------------------------------------------------------------
    def health(self) -> str:
        """ok when a replica answers, loading when one loads, else down."""
        states = {r.state for r in self.replicas}
        return OK if OK in states else LOADING if LOADING in states else DOWN

    def observe(self, replica: Replica, state: str) -> bool:
        """REPLICA's health as probed (or found by a request). True when it changed."""
        if state == replica.state:
            return False
        replica.state, replica.changed = state, time.monotonic()
        self._pulse()
        return True

    def place(self, replicas: list[Replica]) -> None:
        """Its replicas as discovery found them (waiters woken only when they changed)."""
        if replicas != self.replicas:
            self.replicas = replicas
            self._pulse()

    def _pulse(self) -> None:
        """Wake whoever waits for a change, and tell the feed."""
        self._changed.set()
        self._changed = asyncio.Event()
        self.announce(self)

    def stage(self, step: str) -> None:
        """What the gateway does to it now (STEP, "" when done): "queued", "making room", "starting container",
        "loading model", "restoring prompt caches"."""
        if step != self.step:
            self.step, self.step_since = step, time.monotonic()
            self._pulse()

    def describe(self) -> str:
        """What it is doing, as a waiting client is told: the stage and for how long, with an estimate of how far
        along a load is where an earlier load's length is known ("loading model, 12 s, about 40 %")."""
        if not self.step and self.phase is not Phase.STARTING:
            return str(self.phase.value)
        step = self.step or ("loading model" if self.health() == LOADING else "coming back")
        waited = time.monotonic() - self.step_since if self.step else None
        text = step if waited is None else f"{step}, {waited:.0f} s"
        if self.load_seconds and self.loading is not None and step == "loading model":
            started = time.monotonic() - (self.loading_since or time.monotonic())
            text += f", about {min(99, int(100 * started / self.load_seconds))} %"
        return text

    def expected(self) -> str | None:
        """Why it is not coming back when it is not: None when some replica should run (started, not stopped by
        the user, not given up on by the supervisor); else what the state says."""
        if self.remote is not None:
            return f"not answering at {self.remote} (a remote server: podllama does not run it)"
        if self.orchestrated:
            return None  # an orchestrator runs the servers, and brings back what dies
        if self._saved is None:
            return "not running"
        entries = self.saved()
        if any(e and e.get("desired", RUNNING) == RUNNING and not e.get("failed") for e in entries):
            return None
        if any(e.get("failed") for e in entries):
            return "failed (the supervisor gave up on it; `podllama status` says why, `podllama start` retries)"
        if any(e.get("desired") == STOPPED for e in entries):
            return "stopped (`podllama start` starts it)"
        if any(e.get("desired") == UNLOADED for e in entries):
            return "not loaded (on demand: a request loads it)"
        return "not running (`podllama start` starts it)"

    @property
    def phase(self) -> Phase:
        if self.driving is not None:
            return self.driving
        health = self.health()
        if health == OK:
            return Phase.READY
        if health == LOADING or self.expected() is None:
            return Phase.STARTING
        return Phase.STOPPED

    @property
    def model_state(self) -> str:
        """loaded | loading | unloaded, as llama.cpp's router mode says it in /v1/models."""
        return MODEL_STATES.get(self.phase, "unloaded")

    def coming(self) -> bool:
        """It loads, or is down and expected back: a request for it waits."""
        return self.phase is Phase.STARTING

    def pick(self) -> Replica | None:
        """A healthy replica with the fewest requests in flight."""
        best = None
        for r in self.replicas:
            if r.state == OK and (best is None or r.in_flight < best.in_flight):
                best = r
        return best

    def ready(self) -> bool:
        """A request may go to it now: a replica answers and nothing is about to stop it."""
        return self.driving is None and self.pick() is not None

    async def changed(self, timeout: float) -> None:
        """Until its replicas or their health change, or TIMEOUT."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    # -- what the gateway drives --------------------------------------------------------------------------
    def move(self, to: Phase | None) -> None:
        """The driven phase TO (None: back to what is observed), along MOVES."""
        if to not in MOVES[self.driving]:
            raise BadMove(f"server '{self.name}': {self.driving} → {to} is not a move a server makes")
        self.driving = to
        self._pulse()

    def admit(self) -> None:
        """One more request in flight (it may not be stopped under it)."""
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self.last_used = time.time()

    def held(self) -> dict[str, int]:
        """What it holds per device, by the figures known."""
        return self.figure.devices if self.figure is not None else {}


def _http_threads(server: ServerSection) -> int:
    """How many connections a llama-server serves at once (its HTTP threads): --threads-http, else
    llama-server's own default, max(n_parallel + 4, CPUs - 1), with n_parallel -1 meaning 4."""
    threads = server.args.get("threads_http")
    if isinstance(threads, int) and threads > 0:
        return threads
    parallel = next((v for k, v in server.args.items() if k in ("parallel", "np") and isinstance(v, int)), -1)
    return max((parallel if parallel > 0 else 4) + 4, (os.cpu_count() or 2) - 1)


__all__ = ["BadMove", "Figure", "MOVES", "Phase", "Replica", "Server", "Ticket"]
