"""Where requests can go: the stack's servers, their replicas' addresses and health, and which server a model
name means. Addresses come from a discovery function (the engine's containers, in a thread); health from
/health probes on the event loop. Replicas are picked by fewest requests in flight, among healthy ones.

A server that is down but should run (the stack's state says so, and the supervisor has not given up on it)
is coming back: requests wait for it as for a loading one, and while any does, its replicas are probed every
quarter second and looked up again every second (a recreated container has a new address)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import Config, ConfigError, ServerSection
from ..credentials import bearer
from ..engine import EngineError
from ..health import DOWN, LOADING, OK, STATES, probe
from ..stack import L_KIND, L_REPLICA, L_SERVER, SERVER_PORT, Stack, dns_hosts
from ..state import RUNNING, STOPPED, UNLOADED, StackState
from .client import Client, UpstreamError

log = logging.getLogger("podllama.gateway")


@dataclass
class Replica:
    server: str
    container: str
    host: str
    port: int = SERVER_PORT
    state: str = DOWN
    in_flight: int = 0
    changed: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class Target:
    """One running replica of a server, as discovery sees it."""

    server: str
    container: str
    host: str
    port: int = SERVER_PORT


Discover = Callable[[], list[Target] | None]  # None: could not look (the engine did not answer)


def engine_discovery(stack: Stack) -> Discover:
    """The running server containers of STACK and their addresses, from the engine."""
    def discover() -> list[Target] | None:
        try:
            infos = stack.engine.list({"podllama.stack": stack.name, L_KIND: "server"})
        except EngineError as e:
            log.warning("cannot list the stack's containers: %s", e)
            return None
        ordered = sorted(infos, key=lambda i: (i.labels.get(L_SERVER, ""), int(i.labels.get(L_REPLICA, "0") or 0)))
        return [Target(i.labels[L_SERVER], i.name, i.ip) for i in ordered
                if i.labels.get(L_SERVER) and i.running and i.ip]
    return discover


def dns_discovery(config: Callable[[], Config]) -> Discover:
    """The servers of an exported stack (`podllama export`), found by their DNS names as the orchestrator gives
    them: every address of each name is a replica. Names that do not resolve are no replica."""
    def discover() -> list[Target]:
        out = []
        for name, server in config().servers.items():
            seen: set[str] = set()
            for host in dns_hosts(name, server.replicas):
                try:
                    infos = socket.getaddrinfo(host, SERVER_PORT, type=socket.SOCK_STREAM)
                except (socket.gaierror, UnicodeError):
                    continue
                for info in infos:
                    ip = str(info[4][0])
                    if ip not in seen:
                        seen.add(ip)
                        out.append(Target(name, f"{host}@{ip}", ip))
        return out
    return discover


def _http_threads(server: ServerSection) -> int:
    """How many connections a llama-server serves at once (its HTTP threads): --threads-http, else
    llama-server's own default, max(n_parallel + 4, CPUs - 1), with n_parallel -1 meaning 4."""
    threads = server.args.get("threads_http")
    if isinstance(threads, int) and threads > 0:
        return threads
    parallel = next((v for k, v in server.args.items() if k in ("parallel", "np") and isinstance(v, int)), -1)
    return max((parallel if parallel > 0 else 4) + 4, (os.cpu_count() or 2) - 1)


REMOTE = "remote:"  # the "container" of a remote server's one replica: remote:NAME


def _remote_key(cfg: Config, name: str) -> str | None:
    """Its key; an unreadable key file is logged (a reload refuses it before it gets here, see Gateway.reload)."""
    try:
        return cfg.remote_key(name)
    except ConfigError as e:
        log.error("%s", e)
        return None


WAIT_PROBE_EVERY = 0.25  # seconds between probes of a server that requests are waiting for
WAIT_LOOKUP_EVERY = 1.0  # … and between looks at its containers' addresses
STATE_TTL = 0.5  # seconds a read of the stack's state is reused


class Registry:
    def __init__(self, cfg: Config, discover: Discover, state: StackState | None = None) -> None:
        """STATE: the stack's state, which says which servers should run (None: none is waited for when down)."""
        self.discover = discover
        self.state = state
        self.orchestrated = False  # an exported stack: every server is expected back (see expected())
        self.replicas: dict[str, list[Replica]] = {}
        self.names: dict[str, str] = {}
        self._lock = threading.Lock()
        self.refreshed = -math.inf  # never (a fresh machine's monotonic clock starts near 0)
        self.probes = Client(connect_timeout=1, first_byte_timeout=2, idle_timeout=2, queue_timeout=2)
        self._saved: tuple[float, dict[str, dict[str, object]]] = (-STATE_TTL, {})
        self._waiting: dict[str, int] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self.configure(cfg)

    # -- configuration ------------------------------------------------------------------------------------
    def configure(self, cfg: Config) -> None:
        """Model names → servers: the server's name, its alias, its model file (with and without .gguf)."""
        names: dict[str, str] = {}
        for name, server in cfg.routable.items():
            for key in (name, server.alias, server.model, server.model.rsplit("/", 1)[-1],
                        server.model.rsplit("/", 1)[-1].removesuffix(".gguf")):
                if key:
                    names.setdefault(key, name)
        self.cfg = cfg
        self.names = names
        self.threads = {name: _http_threads(server) for name, server in cfg.routable.items()}
        self.replicas = {s: rs for s, rs in self.replicas.items() if s in cfg.routable}
        # remote servers: their own key (never the stack's server key) and their own health path
        self.remote_auth = {name: bearer(_remote_key(cfg, name)) for name in cfg.remotes}

    def health_request(self, server: str) -> tuple[str, list[tuple[bytes, bytes]]]:
        """(path, headers) of SERVER's health probe: llama-server's /health, or a remote server's own path with
        its key."""
        remote = self.cfg.remotes.get(server)
        return (remote.health, self.remote_auth[server]) if remote is not None else ("/health", [])

    def auth_of(self, server: str) -> list[tuple[bytes, bytes]] | None:
        """The credentials a remote SERVER wants; None for the servers podllama runs (the stack's server key)."""
        return self.remote_auth.get(server)

    @property
    def servers(self) -> dict[str, ServerSection]:
        return self.cfg.routable

    def server_for_model(self, model: str) -> str | None:
        return self.names.get(model)

    def default(self, roles: tuple[str, ...]) -> str | None:
        """The server a request without a (known) model goes to: the configured default of the first role that
        has servers, else that role's first server in the config."""
        defaults = self.cfg.gateway.defaults
        for role in roles:
            chosen = defaults.get(role)  # type: ignore[call-overload]
            if chosen and chosen in self.servers:
                return str(chosen)
            for name, server in self.servers.items():
                if server.role == role:
                    return name
        return None

    def http_threads(self, server: str) -> int:
        """How many connections the server's llama-server serves at once."""
        return self.threads.get(server, 8)

    def servers_with_role(self, roles: tuple[str, ...]) -> list[str]:
        return [n for n, s in self.servers.items() if s.role in roles]

    # -- addresses ----------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Look up the servers' replicas and addresses (blocking: run it in a thread)."""
        self.refreshed = time.monotonic()  # also when the look fails: an engine that is gone is not asked in a loop
        found = self.discover()
        remote = [Target(n, REMOTE + n, r.host, r.port) for n, r in self.cfg.remotes.items()]
        if found is None:  # the engine did not answer: its servers as last seen, the remote ones as configured
            found = [Target(r.server, r.container, r.host, r.port) for rs in self.replicas.values() for r in rs
                     if not r.container.startswith(REMOTE)]
        found = [*found, *remote]
        with self._lock:
            old = {r.container: r for rs in self.replicas.values() for r in rs}
            fresh: dict[str, list[Replica]] = {}
            for t in found:
                if t.server not in self.servers:
                    continue
                prev = old.get(t.container)
                if prev is not None and prev.host == t.host and prev.port == t.port:
                    fresh.setdefault(t.server, []).append(prev)
                else:  # new, or back at another address: one look at its health before it takes requests
                    replica = Replica(t.server, t.container, t.host, t.port)
                    path, auth = self.health_request(t.server)
                    replica.state = probe(replica.url, timeout=1, path=path, headers=auth)
                    fresh.setdefault(t.server, []).append(replica)
            self.replicas = fresh

    async def refresh_soon(self, at_most_every: float = 1.0) -> None:
        """Look again now (a server seems gone: the supervisor may have restarted it elsewhere)."""
        if time.monotonic() - self.refreshed >= at_most_every:
            await asyncio.to_thread(self.refresh)

    def pick(self, server: str) -> Replica | None:
        """A healthy replica of SERVER with the fewest requests in flight."""
        best = None
        for r in self.replicas.get(server, ()):
            if r.state == OK and (best is None or r.in_flight < best.in_flight):
                best = r
        return best

    def state_of(self, server: str) -> str:
        states = {r.state for r in self.replicas.get(server, ())}
        return OK if OK in states else LOADING if LOADING in states else DOWN

    def _servers_saved(self) -> dict[str, dict[str, object]]:
        at, saved = self._saved
        if time.monotonic() - at >= STATE_TTL and self.state is not None:
            saved = self.state.read().get("servers", {})
            self._saved = (time.monotonic(), saved)
        return saved

    def expected(self, server: str) -> str | None:
        """Why SERVER is not coming back when it is not: None when some replica should run (started, not
        stopped by the user, not given up on by the supervisor); else what the state says."""
        if server in self.cfg.remotes:
            return f"not answering at {self.cfg.remotes[server].url} (a remote server: podllama does not run it)"
        if self.orchestrated:
            return None  # an orchestrator runs the servers, and brings back what dies
        if self.state is None or server not in self.servers:
            return "not running"
        saved = self._servers_saved()
        entries = [saved.get(f"{server}-{r}") for r in range(1, self.servers[server].replicas + 1)]
        if any(e and e.get("desired", RUNNING) == RUNNING and not e.get("failed") for e in entries):
            return None
        if any(e and e.get("failed") for e in entries):
            return "failed (the supervisor gave up on it; `podllama status` says why, `podllama start` retries)"
        if any(e and e.get("desired") == STOPPED for e in entries):
            return "stopped (`podllama start` starts it)"
        if any(e and e.get("desired") == UNLOADED for e in entries):
            return "not loaded (on demand: a request loads it)"
        return "not running (`podllama start` starts it)"

    def coming(self, server: str) -> bool:
        """Whether SERVER is loading, or down and expected back: a request for it waits."""
        return self.state_of(server) == LOADING or (self.state_of(server) == DOWN and self.expected(server) is None)

    def mark_down(self, replica: Replica) -> None:
        if replica.state != DOWN:
            replica.state, replica.changed = DOWN, time.monotonic()

    # -- health -------------------------------------------------------------------------------------------
    async def probe_all(self) -> None:
        replicas = [r for rs in list(self.replicas.values()) for r in rs]
        await asyncio.gather(*(self._probe(r) for r in replicas))

    async def _probe(self, r: Replica) -> None:
        try:
            path, auth = self.health_request(r.server)
            resp = await self.probes.request(r.host, r.port, "GET", path.encode(), auth)
            await resp.read(self.probes.idle_timeout)
            state = STATES.get(resp.status, DOWN)
        except UpstreamError:
            state = DOWN
        if state != r.state:
            log.info("%s: %s → %s", r.container, r.state, state)
            r.state, r.changed = state, time.monotonic()

    async def run(self, stop: asyncio.Event, every: float = 2.0, refresh_busy: float = 2.0,
                  refresh_idle: float = 30.0, on_round: Callable[[], object] | None = None) -> None:
        """Keep addresses and health current until STOP is set. Health is a cheap HTTP probe every round;
        discovery (costly with an engine: it runs the engine's client) every 30 s while everything is healthy,
        and every 2 s while some server is missing, loading or down. ON_ROUND runs first in every round."""
        last_refresh = time.monotonic()
        while not stop.is_set():
            if on_round is not None:
                on_round()
            healthy = all(r.state == OK for rs in self.replicas.values() for r in rs) and \
                set(self.replicas) >= set(self.servers)
            if time.monotonic() - last_refresh >= (refresh_idle if healthy else refresh_busy):
                await asyncio.to_thread(self.refresh)
                last_refresh = time.monotonic()
            await self.probe_all()
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass

    async def wait_ready(self, server: str, timeout: float) -> Replica | None:
        """A healthy replica of SERVER, waiting up to TIMEOUT while it loads or comes back (None at once when it
        is not coming)."""
        deadline = time.monotonic() + timeout
        self._waiting[server] = self._waiting.get(server, 0) + 1
        if server not in self._watchers:
            self._watchers[server] = asyncio.create_task(self._watch(server))
        try:
            while True:
                replica = self.pick(server)
                if replica is not None or time.monotonic() >= deadline or not self.coming(server):
                    return replica
                await asyncio.sleep(0.05)
        finally:
            self._waiting[server] -= 1

    async def _watch(self, server: str) -> None:
        """While requests wait for SERVER: its replicas probed often, its containers looked up again."""
        try:
            while self._waiting.get(server):
                if self.pick(server) is None:
                    await self.refresh_soon(WAIT_LOOKUP_EVERY)
                    await asyncio.gather(*(self._probe(r) for r in list(self.replicas.get(server, ()))))
                await asyncio.sleep(WAIT_PROBE_EVERY)
        finally:
            del self._watchers[server]
