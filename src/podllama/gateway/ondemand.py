"""On-demand servers: started by their first request, stopped when idle or when another server needs their
memory, within the memory budget of each device ([placement]).

- A request for an on-demand server that does not run loads it; every request for it meanwhile waits on the
  same load. Loads happen one at a time (a decision about memory is only good while nothing else changes it).
- To make room, placement.py picks the least recently used idle on-demand servers; those are stopped first.
  A server with a request in flight (a stream included) is never stopped, nor an `always` server.
- What a server holds: estimated from its GGUF files before its first start (memory.py), then measured (the
  resident memory of its process) while it runs; the largest figure measured for its current settings is
  kept in the stack's state and used from then on.
- Prompt caches survive a swap: an unloaded server's slots are saved (llama-server's slot save) into its
  directory under the stack's state directory, and restored when it is loaded again.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .. import memory, placement
from ..credentials import bearer
from ..engine import EngineError
from ..gguf_meta import GGUFError
from ..health import DOWN
from ..stack import Stack, StackError, container_name
from ..state import RUNNING, UNLOADED
from ..units import human
from .client import Client, UpstreamError
from .upstreams import Registry

log = logging.getLogger("podllama.gateway")
ROUND_EVERY = 2.0  # seconds between looks for idle servers
MEASURE_EVERY = 5.0  # … and between measurements of what the running servers hold
MEASURE_ALWAYS_EVERY = 60.0  # … in a stack without on-demand servers (only `status` shows the figures there)


class Refused(Exception):
    """A load that cannot happen (no room, a server that will not start); the message says why and what to do."""

    def __init__(self, status: int, message: str, retry_after: int = 10) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass(eq=False)
class Ticket:
    """A request waiting for its server's load; granted: counted in flight by the load."""

    granted: bool = False


@dataclass
class Figure:
    """What a server holds, per device: estimated before it ran, measured since (for the settings of HASH)."""

    hash: str = ""
    estimate: dict[str, int] = field(default_factory=dict)
    measured: dict[str, int] = field(default_factory=dict)

    @property
    def devices(self) -> dict[str, int]:
        """The figure decisions use: measured where it was, else estimated."""
        return self.estimate | self.measured


class Loader:
    def __init__(self, stack: Stack, registry: Registry) -> None:
        """Call configure() before use (the load timeout and the servers' key)."""
        self.stack, self.registry = stack, registry
        self.busy: collections.Counter[str] = collections.Counter()
        self.last_used: dict[str, float] = {}  # epoch seconds
        self.loading: dict[str, asyncio.Task[None]] = {}
        self.unloading: set[str] = set()
        self.draining: set[str] = set()  # to be stopped once their requests are done; new ones wait
        self.waiting: collections.defaultdict[str, set[Ticket]] = collections.defaultdict(set)  # for a load
        self.figures: dict[str, Figure] = {}
        self.load_timeout = 120.0
        self.client = Client(connect_timeout=2, first_byte_timeout=120, idle_timeout=120, queue_timeout=30)
        self.auth: list[tuple[bytes, bytes]] = []
        self._lock = asyncio.Lock()  # one load or unload at a time
        self._noted: dict[str, dict[str, Any]] = {}
        self._measured_at = -math.inf  # never
        saved = stack.state.read().get("servers", {})
        for name in self.servers():
            entry = saved.get(f"{name}-1", {})
            if entry.get("last_used"):
                self.last_used[name] = float(entry["last_used"])
            if entry.get("memory"):
                m = entry["memory"]
                self.figures[name] = Figure(m.get("hash", ""), m.get("estimate", {}), m.get("measured", {}))

    def configure(self, load_timeout: float, server_key: str | None) -> None:
        self.load_timeout = load_timeout
        self.auth = bearer(server_key)

    def servers(self) -> dict[str, Any]:
        return self.stack.cfg.servers

    def manages(self, server: str) -> bool:
        s = self.servers().get(server)
        return s is not None and s.on_demand

    # -- requests -----------------------------------------------------------------------------------------
    def ready(self, server: str) -> bool:
        """SERVER answers and nothing is about to stop it: a request may go to it now."""
        return (server not in self.unloading and server not in self.draining and server not in self.loading
                and self.registry.pick(server) is not None)

    async def acquire(self, server: str) -> None:
        """Have SERVER loaded, then count the request in flight (so it is not stopped under it); raises Refused
        when it cannot be loaded, TimeoutError after load_timeout. Every acquire needs its release.

        A request that waited for a load is counted by the load itself, before the next load may run: else the
        next one could find the server idle and stop it before its waiters got their turn (with three servers
        and one budget, each load would undo the last)."""
        deadline = time.monotonic() + self.load_timeout
        self.last_used[server] = time.time()
        ticket = Ticket()
        self.waiting[server].add(ticket)
        try:
            while not ticket.granted and not self.ready(server):  # nothing awaited between check and count
                await self.ensure(server, max(0.0, deadline - time.monotonic()))
        except BaseException:
            if ticket.granted:  # counted by the load, then given up (the client went, or a timeout)
                self.release(server)
            raise
        finally:
            self.waiting[server].discard(ticket)
        if not ticket.granted:
            self.busy[server] += 1

    def release(self, server: str) -> None:
        self.busy[server] -= 1
        self.last_used[server] = time.time()

    async def ensure(self, server: str, timeout: float | None = None) -> None:
        """SERVER loaded and answering; loads it when it is not (one load shared by all who wait)."""
        task = self.loading.get(server)
        if task is None:
            task = asyncio.create_task(self._load(server))
            self.loading[server] = task
            task.add_done_callback(lambda t, s=server: self._loaded(s, t))  # type: ignore[misc]
        await asyncio.wait_for(asyncio.shield(task), timeout if timeout is not None else self.load_timeout)

    def _loaded(self, server: str, task: asyncio.Task[None]) -> None:
        if self.loading.get(server) is task:
            del self.loading[server]
        if not task.cancelled() and task.exception() is not None:
            log.warning("loading %s failed: %s", server, task.exception())

    def state_of(self, server: str) -> str:
        """loaded | loading | unloaded, as router mode says it in /v1/models."""
        if server in self.loading:
            return "loading"
        if server not in self.unloading and self.registry.pick(server) is not None:
            return "loaded"
        return "loading" if self.registry.coming(server) else "unloaded"

    # -- loading ------------------------------------------------------------------------------------------
    async def _load(self, server: str) -> None:
        async with self._lock:
            await self._load_locked(server)
            for ticket in self.waiting[server]:  # the requests that waited are in flight from here
                if not ticket.granted:
                    ticket.granted = True
                    self.busy[server] += 1
        await self.measure()

    async def _load_locked(self, server: str) -> None:
        """Under the lock: room made, SERVER started, up and its prompt caches restored."""
        if self.registry.pick(server) is not None and server not in self.unloading:
            return  # loaded meanwhile
        started = time.monotonic()
        info = await asyncio.to_thread(self.stack.engine.inspect, container_name(self.stack.name, server, 1))
        if info is None or not info.running:
            figure = await asyncio.to_thread(self.figure, server)
            if any(not h.devices for h in self.held(exclude=server)):
                await self.measure()  # a running server not measured yet (the gateway just started)
            room = placement.make_room(server, figure.devices, self.budgets(), self.held(exclude=server),
                                       self._settings())
            if room.refusal:
                raise Refused(503, room.refusal)
            for victim in room.victims:
                await self._drain(victim, server)
                await self._unload(victim, f"making room for '{server}'")
            try:
                await asyncio.to_thread(self.stack.load, server)
            except (StackError, EngineError) as e:
                raise Refused(503, f"server '{server}' could not be started: {e}") from None
        else:  # already on its way (the supervisor restarted it, or another gateway started it)
            await asyncio.to_thread(self.stack.state.set_desired, [f"{server}-1"], RUNNING)
        await self._wait_up(server)
        await self._restore(server)
        self.last_used[server] = time.time()
        self._event("load", server, f"in {time.monotonic() - started:.1f}s")

    async def _wait_up(self, server: str) -> None:
        """Until SERVER answers /health; an exit while loading is a refusal with its last log lines (and the
        server is left unloaded rather than restarted in a loop)."""
        cname = container_name(self.stack.name, server, 1)
        deadline = time.monotonic() + self.load_timeout
        checked = 0.0
        await asyncio.to_thread(self.registry.refresh)
        while True:
            replica = await self.registry.wait_ready(server, 1.0)
            if replica is not None:
                return
            if time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                info = await asyncio.to_thread(self.stack.engine.inspect, cname)
                if info is not None and not info.running:  # (missing: being recreated by the supervisor)
                    tail = await asyncio.to_thread(self.stack.tail, cname, 15)
                    await asyncio.to_thread(self.stack.state.set_desired, [f"{server}-1"], UNLOADED)
                    raise Refused(502, f"server '{server}' exited while loading; its last log lines:\n{tail}")
                await asyncio.to_thread(self.registry.refresh)
            if time.monotonic() > deadline:
                raise Refused(503, f"server '{server}' is still loading after {self.load_timeout:.0f}s "
                                   "([gateway] load_timeout)", retry_after=5)

    async def _drain(self, victim: str, server: str) -> None:
        """Until VICTIM has no request in flight; requests for it that come meanwhile wait for its next load."""
        if not self.busy[victim]:
            return
        self.draining.add(victim)
        deadline = time.monotonic() + self.load_timeout
        try:
            while self.busy[victim]:
                if time.monotonic() > deadline:
                    raise Refused(503, f"server '{server}' needs the memory of '{victim}', whose requests did not "
                                       f"finish within {self.load_timeout:.0f}s ([gateway] load_timeout)", retry_after=5)
                await asyncio.sleep(0.05)
        finally:
            self.draining.discard(victim)

    # -- unloading ----------------------------------------------------------------------------------------
    async def unload(self, server: str, reason: str = "asked to") -> bool:
        """Stop SERVER (its prompt caches saved first). False when it was not loaded. Refused while busy."""
        async with self._lock:
            if self.busy[server]:
                raise Refused(409, f"server '{server}' has {self.busy[server]} requests in flight; unload it when "
                                   "they are done", retry_after=5)
            info = await asyncio.to_thread(self.stack.engine.inspect, container_name(self.stack.name, server, 1))
            if info is None or not info.running:
                await asyncio.to_thread(self.stack.state.set_desired, [f"{server}-1"], UNLOADED)
                return False
            await self._unload(server, reason)
            return True

    async def _unload(self, server: str, reason: str) -> None:
        """Under the lock: save SERVER's slots, stop it, forget its address."""
        self.unloading.add(server)
        try:
            await self._save(server)
            await asyncio.to_thread(self.stack.unload, server)
            for r in self.registry.replicas.get(server, ()):
                self.registry.mark_down(r)
            self.registry.replicas.pop(server, None)
            self._event("unload", server, reason)
        finally:
            self.unloading.discard(server)

    # -- prompt caches ------------------------------------------------------------------------------------
    def _slot_file(self, server: str, slot: int) -> str:
        figure = self.figures.get(server)
        return f"{(figure.hash if figure else '') or 'slot'}-{slot}.bin"

    async def _call(self, server: str, method: str, target: str, body: dict[str, Any] | None = None
                    ) -> tuple[int, Any]:
        replica = self.registry.pick(server)
        if replica is None:
            return 0, None
        data = json.dumps(body).encode() if body is not None else b""
        headers = self.auth + ([(b"content-type", b"application/json")] if body is not None else [])
        try:
            resp = await self.client.request(replica.host, replica.port, method, target.encode(), headers, data)
            raw = await resp.read(self.client.idle_timeout)
        except UpstreamError as e:
            log.warning("%s %s on %s: %s", method, target, server, e)
            return 0, None
        try:
            return resp.status, json.loads(raw or b"null")
        except ValueError:
            return resp.status, None

    async def _save(self, server: str) -> None:
        if not self._has_slots(server):
            return
        status, slots = await self._call(server, "GET", "/slots")
        if status != 200 or not isinstance(slots, list):
            return
        directory = self.stack.slot_dir(server)
        for old in directory.glob("*.bin"):  # caches of other settings, and slots now empty
            old.unlink(missing_ok=True)
        for slot in slots:
            if isinstance(slot, dict) and isinstance(slot.get("id"), int) and slot.get("n_prompt_tokens"):
                status, answer = await self._call(server, "POST", f"/slots/{slot['id']}?action=save",
                                                  {"filename": self._slot_file(server, slot["id"])})
                if status != 200:
                    log.warning("%s: saving slot %s failed: %s", server, slot["id"], answer)

    async def _restore(self, server: str) -> None:
        if not self._has_slots(server):
            return
        directory = self.stack.slot_dir(server)
        for path in sorted(directory.glob("*.bin")):
            prefix, _, slot = path.stem.rpartition("-")
            if prefix != self._slot_file(server, 0).rpartition("-")[0] or not slot.isdigit():
                continue
            status, answer = await self._call(server, "POST", f"/slots/{slot}?action=restore", {"filename": path.name})
            if status == 200:
                log.info("%s: slot %s restored (%s tokens)", server, slot, (answer or {}).get("n_restored"))
            else:
                log.warning("%s: restoring slot %s failed: %s", server, slot, answer)

    def _has_slots(self, server: str) -> bool:
        s = self.servers().get(server)
        return s is not None and s.saves_slots

    # -- memory -------------------------------------------------------------------------------------------
    def figure(self, server: str) -> Figure:
        """What SERVER will hold (blocking: reads its GGUF files, asks the engine for its image's flags)."""
        unit = self.stack.units([server])[0]
        figure = self.figures.get(server)
        if figure is not None and figure.hash == unit.hash and figure.estimate:
            return figure
        try:
            estimate = self.stack.estimate(server).devices
        except (GGUFError, OSError) as e:
            raise Refused(503, f"server '{server}': its model cannot be read to estimate its memory: {e}") from None
        figure = Figure(unit.hash, estimate, {})
        self.figures[server] = figure
        return figure

    def budgets(self) -> dict[str, int | None]:
        p = self.stack.cfg.placement
        out: dict[str, int | None] = {"cpu": memory.budget(p.cpu_memory, memory.host_memory(), memory.CPU_MARGIN_MIN)}
        totals = memory.gpu_totals(os.environ.get("PODLLAMA_GPU_MEMORY", ""))
        for device in set(totals) | set(p.gpu_memory):
            out[device] = memory.budget(p.gpu_memory.get(device, "auto"), totals.get(device), memory.GPU_MARGIN_MIN)
        return out

    def _settings(self) -> dict[str, str]:
        p = self.stack.cfg.placement
        out = {"cpu": f"[placement] cpu_memory = \"{p.cpu_memory}\""}
        out.update({d: f"[placement] gpu_memory.\"{d}\" = \"{v}\"" for d, v in p.gpu_memory.items()})
        return out

    def held(self, exclude: str | None = None) -> list[placement.Held]:
        """What the running servers hold (always ones included), by the figures known."""
        out = []
        for name, cfg in self.servers().items():
            up = self.registry.state_of(name) != DOWN or self.registry.coming(name)  # a queued load holds nothing yet
            if name == exclude or not up:
                continue
            figure = self.figures.get(name)
            devices = figure.devices if figure else {}
            out.append(placement.Held(name, devices, cfg.on_demand, self.busy[name], self.last_used.get(name, 0.0)))
        return out

    async def measure(self) -> None:
        """What each running server's process holds now; the largest figure seen for its settings is kept."""
        self._measured_at = time.monotonic()
        running = [n for n in self.servers() if self.registry.pick(n) is not None and n not in self.unloading]
        for name in running:
            if name not in self.figures or not self.figures[name].hash:
                try:
                    await asyncio.to_thread(self.figure, name)
                except (Refused, StackError, EngineError) as e:
                    log.debug("no estimate for %s: %s", name, e)
                    continue
            figure = self.figures[name]
            used = await asyncio.to_thread(self.stack.engine.memory, container_name(self.stack.name, name, 1))
            if used is not None and self.stack.device_of(name) == "cpu":
                figure.measured["cpu"] = max(figure.measured.get("cpu", 0), used)
        await self._note()

    async def _note(self) -> None:
        """Memory figures and last uses into the stack's state (for `podllama status`), when they changed."""
        fields: dict[str, dict[str, Any]] = {}
        for name in self.servers():
            entry: dict[str, Any] = {}
            if name in self.figures:
                f = self.figures[name]
                entry["memory"] = {"hash": f.hash, "estimate": f.estimate, "measured": f.measured}
            if name in self.last_used:
                entry["last_used"] = round(self.last_used[name], 1)
            if entry and self._noted.get(name) != entry:
                fields[f"{name}-1"] = entry
                self._noted[name] = entry
        if fields:
            await asyncio.to_thread(self.stack.state.note, fields)

    # -- idle servers -------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Until STOP: idle on-demand servers stopped after their idle_timeout; memory measured every few
        seconds while servers run."""
        while not stop.is_set():
            try:
                await self.round()
            except Exception:  # a round that breaks must not end the loop
                log.exception("on-demand round failed")
            try:
                await asyncio.wait_for(stop.wait(), ROUND_EVERY)
            except TimeoutError:
                pass

    async def round(self) -> list[str]:
        """One look: the idle servers stopped (returned), memory measured when it is time."""
        now = time.time()
        stopped = []
        for name, cfg in self.servers().items():
            if not cfg.on_demand or self.busy[name] or name in self.loading or self.registry.pick(name) is None:
                continue
            idle = now - self.last_used.setdefault(name, now)
            if idle >= cfg.idle_seconds:
                try:
                    if await self.unload(name, f"idle for {idle:.0f}s (idle_timeout {cfg.idle_seconds:g}s)"):
                        stopped.append(name)
                except Refused:
                    pass  # a request came in meanwhile
        every = MEASURE_EVERY if any(s.on_demand for s in self.servers().values()) else MEASURE_ALWAYS_EVERY
        if time.monotonic() - self._measured_at >= every:
            await self.measure()
        return stopped

    # -- what it did --------------------------------------------------------------------------------------
    def _event(self, action: str, server: str, detail: str) -> None:
        figure = self.figures.get(server)
        log.info("%s %s (%s)%s", action, server, detail,
                 f"; holds {human(sum(figure.devices.values()))}" if figure else "")

    async def close(self) -> None:
        self.client.close()


__all__ = ["Loader", "Refused"]
