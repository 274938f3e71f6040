"""Where requests can go: which server a model name means, and what is observed of each server — its replicas'
addresses, from a discovery function (the engine's containers, in a thread), and their health, from /health
probes on the event loop — fed to the server's handle (servers.py), which answers every question about it.

A server that is down but should run (the stack's state says so, and the supervisor has not given up on it)
is coming back: requests wait for it as for a loading one, and while any does, its replicas are probed every
quarter second and looked up again every second (a recreated container has a new address)."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...access import tls
from ...access.credentials import bearer
from ...config import Config, ConfigError, ServerSection
from ...engine import EngineError
from ...engine.health import DOWN, OK, STATES
from ...stack import L_COMMIT, L_HASH, L_KIND, L_REPLICA, L_SERVER, L_SHA, SERVER_PORT, Stack, dns_hosts
from ...stack.state import StackState
from ..front.client import Client, UpstreamError
from .feed import Feed
from .servers import NO_LINEAGE, Lineage, Replica, Server

log = logging.getLogger("podllama.gateway")


@dataclass(frozen=True)
class Target:
    """One running replica of a server, as discovery sees it."""

    server: str
    container: str
    host: str
    port: int = SERVER_PORT
    lineage: Lineage = NO_LINEAGE


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
        return [Target(i.labels[L_SERVER], i.name, i.ip, lineage=Lineage(
                    i.image_id, i.labels.get(L_COMMIT, ""), i.labels.get(L_SHA, ""), i.labels.get(L_HASH, "")))
                for i in ordered if i.labels.get(L_SERVER) and i.running and i.ip]
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
    """The servers' handles (servers.py), fed with what is observed: their replicas' addresses (discovery) and
    health (probes). It decides nothing about a server; it only looks."""

    def __init__(self, cfg: Config, discover: Discover, state: StackState | None = None,
                 orchestrated: bool = False) -> None:
        """STATE: the stack's state, which says which servers should run (None: none is waited for when down).
        ORCHESTRATED: an exported stack, whose orchestrator brings back every server that dies."""
        self.discover = discover
        self.state = state
        self.orchestrated = orchestrated
        self.handles: dict[str, Server] = {}
        self.feed = Feed()  # each server's phase and load stage as they change (/admin/events)
        self.names: dict[str, str] = {}
        self.refreshed = -math.inf  # never (a fresh machine's monotonic clock starts near 0)
        self.probes = Client(connect_timeout=1, first_byte_timeout=2, idle_timeout=2, queue_timeout=2)
        self.tls = self.probes.tls  # remote https:// servers: (host, port) → how each is verified
        self._saved_at, self._saved = -STATE_TTL, {}  # type: tuple[float, dict[str, dict[str, Any]]]
        self._loop: asyncio.AbstractEventLoop | None = None
        self.configure(cfg)

    # -- configuration ------------------------------------------------------------------------------------
    def configure(self, cfg: Config) -> None:
        """Model names → servers (the server's name, its alias, its model file with and without .gguf); a
        handle per routable server (kept across changes, with its new section)."""
        names: dict[str, str] = {}
        for name, server in cfg.routable.items():
            for key in (name, server.alias, server.model, server.model.rsplit("/", 1)[-1],
                        server.model.rsplit("/", 1)[-1].removesuffix(".gguf")):
                if key:
                    names.setdefault(key, name)
        self.cfg = cfg
        self.names = names
        handles = {}
        remembered: dict[str, dict[str, Any]] | None = None  # the state, read once for all new handles
        for name, section in cfg.routable.items():
            handle = self.handles.get(name)
            remote = cfg.remotes[name].url if name in cfg.remotes else None
            if handle is None or handle.remote != remote:
                saved = self._servers_saved if self.state is not None else None
                handle = Server(name, section, saved, remote, self.orchestrated, self.feed.note)
                if self.state is not None:
                    if remembered is None:
                        remembered = self.state.read().get("servers", {})
                    handle.recall(remembered)
            else:
                handle.configure(section)
            handles[name] = handle
        self.handles = handles
        # remote servers: their own key (never the stack's server key) and their own health path; https:// ones
        # verified by the system's CAs and their ca_file (a dict shared with every client that reaches them)
        self.remote_auth = {name: bearer(_remote_key(cfg, name)) for name in cfg.remotes}
        self.tls.clear()
        for name, section in cfg.remotes.items():
            context, problem = tls.remote_verification(cfg, name)
            if problem:
                log.warning("%s", problem)
            if context is not None:
                self.tls[(section.host, section.port)] = context

    def __getitem__(self, server: str) -> Server:
        return self.handles[server]

    def get(self, server: str) -> Server | None:
        return self.handles.get(server)

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
        handle = self.handles.get(server)
        return handle.threads if handle is not None else 8

    def servers_with_role(self, roles: tuple[str, ...]) -> list[str]:
        return [n for n, s in self.servers.items() if s.role in roles]

    def _servers_saved(self) -> dict[str, dict[str, Any]]:
        """The stack's saved server entries, read at most every STATE_TTL seconds."""
        if time.monotonic() - self._saved_at >= STATE_TTL and self.state is not None:
            self._saved = self.state.read().get("servers", {})
            self._saved_at = time.monotonic()
        return self._saved

    # -- addresses ----------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Look up the servers' replicas and addresses (the engine asked in a thread); a replica new, or back at
        another address, is probed once before it takes requests."""
        self._loop = asyncio.get_running_loop()
        self.refreshed = time.monotonic()  # also when the look fails: an engine that is gone is not asked in a loop
        found = await asyncio.to_thread(self.discover)
        old = {r.container: r for h in self.handles.values() for r in h.replicas}
        if found is None:  # the engine did not answer: its servers as last seen, the remote ones as configured
            found = [Target(r.server, r.container, r.host, r.port, r.lineage) for r in old.values()
                     if not r.container.startswith(REMOTE)]
        found = [*found, *(Target(n, REMOTE + n, r.host, r.port) for n, r in self.cfg.remotes.items())]
        placed: dict[str, list[Replica]] = {name: [] for name in self.handles}
        new = []
        for t in found:
            if t.server not in placed:
                continue
            prev = old.get(t.container)
            if prev is None or prev.host != t.host or prev.port != t.port:
                prev = Replica(t.server, t.container, t.host, t.port)
                new.append(prev)
            prev.lineage = t.lineage
            placed[t.server].append(prev)
        await asyncio.gather(*(self._probe(r) for r in new))
        for name, replicas in placed.items():
            self.handles[name].place(replicas)

    def refresh_from_thread(self) -> None:
        """refresh(), from a thread that is not the event loop's (the management API's workers, the supervisor);
        nothing before the loop first looked (it looks when it starts)."""
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.refresh(), self._loop).result(timeout=60)

    async def refresh_soon(self, at_most_every: float = 1.0) -> None:
        """Look again now (a server seems gone: the supervisor may have restarted it elsewhere)."""
        if time.monotonic() - self.refreshed >= at_most_every:
            await self.refresh()

    def observed(self, container: str) -> str | None:
        """CONTAINER's health as last probed (None: not a replica the registry knows). Read from the supervisor's
        thread: a look at plain attributes."""
        for handle in list(self.handles.values()):
            for r in list(handle.replicas):
                if r.container == container:
                    return r.state
        return None

    def mark_down(self, replica: Replica) -> None:
        """A request found REPLICA gone."""
        handle = self.handles.get(replica.server)
        if handle is not None:
            handle.observe(replica, DOWN)

    # -- health -------------------------------------------------------------------------------------------
    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(r) for h in list(self.handles.values()) for r in h.replicas))

    async def _probe(self, r: Replica) -> None:
        """One look at R's health: the gateway's one health probe."""
        try:
            path, auth = self.health_request(r.server)
            resp = await self.probes.request(r.host, r.port, "GET", path.encode(), auth)
            await resp.read(self.probes.idle_timeout)
            state = STATES.get(resp.status, DOWN)
        except UpstreamError:
            state = DOWN
        handle, before = self.handles.get(r.server), r.state
        if handle is None:  # its server left the config meanwhile
            r.state = state
        elif handle.observe(r, state):
            log.info("%s: %s → %s", r.container, before, state)

    async def run(self, stop: asyncio.Event, every: float = 2.0, refresh_busy: float = 2.0,
                  refresh_idle: float = 30.0, on_round: Callable[[], object] | None = None) -> None:
        """Keep addresses and health current until STOP is set. Health is a cheap HTTP probe every round;
        discovery (costly with an engine: it runs the engine's client) every 30 s while everything is healthy,
        and every 2 s while some server is missing, loading or down. ON_ROUND runs first in every round."""
        last_refresh = time.monotonic()
        while not stop.is_set():
            if on_round is not None:
                on_round()
            healthy = all(h.replicas and all(r.state == OK for r in h.replicas) for h in self.handles.values())
            if time.monotonic() - last_refresh >= (refresh_idle if healthy else refresh_busy):
                await self.refresh()
                last_refresh = time.monotonic()
            await self.probe_all()
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass

    async def wait_ready(self, server: str, timeout: float) -> Replica | None:
        """A healthy replica of SERVER, waiting up to TIMEOUT while it loads or comes back (None at once when it
        is not coming); woken by each change its handle sees."""
        handle = self.handles[server]
        deadline = time.monotonic() + timeout
        handle.waiters += 1
        if handle.watcher is None:
            handle.watcher = asyncio.create_task(self._watch(handle))
        try:
            while True:
                replica = handle.pick()
                left = deadline - time.monotonic()
                if replica is not None or left <= 0 or not handle.coming():
                    return replica
                await handle.changed(min(left, WAIT_PROBE_EVERY))
        finally:
            handle.waiters -= 1

    async def _watch(self, handle: Server) -> None:
        """While requests wait for HANDLE's server: its replicas probed often, its containers looked up again."""
        try:
            while handle.waiters:
                if handle.pick() is None:
                    await self.refresh_soon(WAIT_LOOKUP_EVERY)
                    await asyncio.gather(*(self._probe(r) for r in list(handle.replicas)))
                await asyncio.sleep(WAIT_PROBE_EVERY)
        finally:
            handle.watcher = None
