"""Where requests can go: the stack's servers, their replicas' addresses and health, and which server a model
name means. Addresses come from the engine (refreshed in a thread); health from /health probes on the event
loop. Replicas are picked by fewest requests in flight, among healthy ones."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from ..config import Config, ServerSection
from ..engine import EngineError
from .client import Client, UpstreamError
from ..health import DOWN, LOADING, OK, STATES, probe
from ..stack import L_KIND, L_REPLICA, L_SERVER, SERVER_PORT, Stack

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
        return f"http://{self.host}:{self.port}"


class Registry:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.replicas: dict[str, list[Replica]] = {}
        self.names: dict[str, str] = {}
        self._lock = threading.Lock()
        self.refreshed = 0.0
        self.probes = Client(connect_timeout=1, first_byte_timeout=2, idle_timeout=2)
        self.configure(stack.cfg)

    # -- configuration ------------------------------------------------------------------------------------
    def configure(self, cfg: Config) -> None:
        """Model names → servers: the server's name, its alias, its model file (with and without .gguf)."""
        names: dict[str, str] = {}
        for name, server in cfg.servers.items():
            for key in (name, server.alias, server.model, server.model.rsplit("/", 1)[-1],
                        server.model.rsplit("/", 1)[-1].removesuffix(".gguf")):
                if key:
                    names.setdefault(key, name)
        self.stack.cfg = cfg
        self.names = names

    @property
    def servers(self) -> dict[str, ServerSection]:
        return self.stack.cfg.servers

    def server_for_model(self, model: str) -> str | None:
        return self.names.get(model)

    def default(self, roles: tuple[str, ...]) -> str | None:
        """The server a request without a (known) model goes to: the configured default of the first role that
        has servers, else that role's first server in the config."""
        defaults = self.stack.cfg.gateway.defaults
        for role in roles:
            chosen = defaults.get(role)
            if chosen and chosen in self.servers:
                return chosen
            for name, server in self.servers.items():
                if server.role == role:
                    return name
        return None

    def http_threads(self, server: str) -> int:
        """How many connections the server's llama-server serves at once (its HTTP threads): --threads-http,
        else llama-server's own default, max(n_parallel + 4, CPUs - 1), with n_parallel -1 meaning 4."""
        args = self.servers[server].args
        if isinstance(args.get("threads_http"), int) and args["threads_http"] > 0:
            return args["threads_http"]
        parallel = next((v for k, v in args.items() if k in ("parallel", "np") and isinstance(v, int)), -1)
        return max((parallel if parallel > 0 else 4) + 4, (os.cpu_count() or 2) - 1)

    def servers_with_role(self, roles: tuple[str, ...]) -> list[str]:
        return [n for n, s in self.servers.items() if s.role in roles]

    # -- addresses ----------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the servers' containers and addresses from the engine (blocking: run it in a thread)."""
        try:
            infos = self.stack.engine.list({"podllama.stack": self.stack.name, L_KIND: "server"})
        except EngineError as e:
            log.warning("cannot list the stack's containers: %s", e)
            return
        with self._lock:
            old = {r.container: r for rs in self.replicas.values() for r in rs}
            fresh: dict[str, list[Replica]] = {}
            for info in sorted(infos, key=lambda i: (i.labels.get(L_SERVER, ""), int(i.labels.get(L_REPLICA, "0") or 0))):
                server = info.labels.get(L_SERVER)
                if server not in self.servers or not info.running or not info.ip:
                    continue
                prev = old.get(info.name)
                if prev is not None and prev.host == info.ip:
                    fresh.setdefault(server, []).append(prev)
                else:  # new, or back at another address: one look at its health before it takes requests
                    replica = Replica(server, info.name, info.ip)
                    replica.state = probe(replica.url, timeout=1)
                    fresh.setdefault(server, []).append(replica)
            self.replicas = fresh
            self.refreshed = time.monotonic()

    async def refresh_soon(self, at_most_every: float = 1.0) -> None:
        """Look at the engine again now (a server seems gone: the supervisor may have restarted it elsewhere)."""
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

    def mark_down(self, replica: Replica) -> None:
        if replica.state != DOWN:
            replica.state, replica.changed = DOWN, time.monotonic()

    # -- health -------------------------------------------------------------------------------------------
    async def probe_all(self) -> None:
        replicas = [r for rs in list(self.replicas.values()) for r in rs]
        await asyncio.gather(*(self._probe(r) for r in replicas))

    async def _probe(self, r: Replica) -> None:
        try:
            resp = await self.probes.request(r.host, r.port, "GET", b"/health", [])
            await resp.read(self.probes.idle_timeout)
            state = STATES.get(resp.status, DOWN)
        except UpstreamError:
            state = DOWN
        if state != r.state:
            log.info("%s: %s → %s", r.container, r.state, state)
            r.state, r.changed = state, time.monotonic()

    async def run(self, stop: asyncio.Event, every: float = 2.0, refresh_busy: float = 2.0,
                  refresh_idle: float = 30.0) -> None:
        """Keep addresses and health current until STOP is set. Health is a cheap HTTP probe every second;
        the engine (costly: it runs the engine's client) is asked for addresses every 30 s while everything is
        healthy, and every 2 s while some server is missing, loading or down."""
        last_refresh = time.monotonic()
        while not stop.is_set():
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
        """A healthy replica of SERVER, waiting up to TIMEOUT while it loads (or comes back)."""
        deadline = time.monotonic() + timeout
        while True:
            replica = self.pick(server)
            if replica is not None or time.monotonic() >= deadline:
                return replica
            await asyncio.sleep(0.1)
