"""On-demand servers: started by their first request, stopped when idle or when another server needs their
memory, within the memory budget of each device ([placement]).

- A request for an on-demand server that does not run loads it; every request for it meanwhile waits on the
  same load. Loads happen one at a time (a decision about memory is only good while nothing else changes it).
- To make room, placement.py picks the least recently used idle on-demand servers; those are stopped first.
  A server with a request in flight (a stream included) is never stopped, nor an `always` server.
- What a server holds: estimated from its GGUF files before its first start (memory.py), then measured (the
  resident memory of its process; on a GPU, what the driver says the process holds) while it runs; the largest
  figure measured for its current settings is kept in the stack's state and used from then on.
- Prompt caches survive a swap: an unloaded server's slots are saved (llama-server's slot save) into its
  directory under the stack's state directory, and restored when it is loaded again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any

from ...access.credentials import bearer
from ...engine import EngineError
from ...engine.health import DOWN
from ...models import memory
from ...models.gguf_meta import GGUFError
from ...stack import Stack, StackError, container_name, placement
from ...stack.state import RUNNING, UNLOADED
from ...units import human
from ..front.client import Client, UpstreamError
from .servers import Figure, Phase, Server, Ticket
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


class Loader:
    """The placement policy: which on-demand server to load, and which to stop for it. What it knows of each
    server lives in the server's handle (servers.py); the loader moves it through its phases."""

    def __init__(self, stack: Stack, registry: Registry, load_timeout: float, server_key: str | None) -> None:
        self.stack, self.registry = stack, registry
        self.client = Client(connect_timeout=2, first_byte_timeout=120, idle_timeout=120, queue_timeout=30)
        self._lock = asyncio.Lock()  # one load or unload at a time
        self._noted: dict[str, dict[str, Any]] = {}
        self._measured_at = -math.inf  # never
        self.configure(load_timeout, server_key)

    def configure(self, load_timeout: float, server_key: str | None) -> None:
        self.load_timeout = load_timeout
        self.auth = bearer(server_key)

    def handles(self) -> list[Server]:
        """The handles of the servers podllama runs (not the remote ones)."""
        return [h for h in self.registry.handles.values() if h.remote is None]

    def manages(self, server: str) -> bool:
        h = self.registry.get(server)
        return h is not None and h.remote is None and h.section.on_demand

    # -- requests -----------------------------------------------------------------------------------------
    async def acquire(self, server: str) -> None:
        """Have SERVER loaded, then count the request in flight (so it is not stopped under it); raises Refused
        when it cannot be loaded, TimeoutError after load_timeout. Every acquire needs its release.

        A request that waited for a load is counted by the load itself, before the next load may run: else the
        next one could find the server idle and stop it before its waiters got their turn (with three servers
        and one budget, each load would undo the last)."""
        h = self.registry[server]
        deadline = time.monotonic() + self.load_timeout
        h.last_used = time.time()
        ticket = Ticket()
        h.tickets.add(ticket)
        try:
            while not ticket.granted and not h.ready():  # nothing awaited between check and count
                await self.ensure(server, max(0.0, deadline - time.monotonic()))
        except BaseException:
            if ticket.granted:  # counted by the load, then given up (the client went, or a timeout)
                h.release()
            raise
        finally:
            h.tickets.discard(ticket)
        if not ticket.granted:
            h.admit()

    def release(self, server: str) -> None:
        self.registry[server].release()

    async def ensure(self, server: str, timeout: float | None = None) -> None:
        """SERVER loaded and answering; loads it when it is not (one load shared by all who wait)."""
        h = self.registry[server]
        task = h.loading
        if task is None:
            h.loading_since = time.monotonic()
            task = h.loading = asyncio.create_task(self._load(h))
            task.add_done_callback(lambda t: self._loaded(h, t))
        await asyncio.wait_for(asyncio.shield(task), timeout if timeout is not None else self.load_timeout)

    @staticmethod
    def _loaded(h: Server, task: asyncio.Task[None]) -> None:
        if h.loading is task:
            h.loading = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("loading %s failed: %s", h.name, task.exception())

    # -- loading ------------------------------------------------------------------------------------------
    async def _load(self, h: Server) -> None:
        if self._lock.locked():
            h.stage("queued behind another load")
        async with self._lock:
            if h.pick() is None:  # (else loaded meanwhile)
                h.move(Phase.STARTING)
                try:
                    await self._load_locked(h)
                finally:
                    h.stage("")
                    h.move(None)
            for ticket in h.tickets:  # the requests that waited are in flight from here
                if not ticket.granted:
                    ticket.granted = True
                    h.admit()
        await self.measure()

    async def _load_locked(self, h: Server) -> None:
        """Under the lock: room made, H's server started, up and its prompt caches restored."""
        server, started = h.name, time.monotonic()
        info = await asyncio.to_thread(self.stack.engine.inspect, container_name(self.stack.name, server, 1))
        if info is None or not info.running:
            figure = await asyncio.to_thread(self.figure, h)
            if any(not held.devices for held in self.held(exclude=server)):
                await self.measure()  # a running server not measured yet (the gateway just started)
            room = placement.make_room(server, figure.devices, self.stack.budgets(), self.held(exclude=server),
                                       self._settings())
            if room.refusal:
                raise Refused(503, room.refusal)
            if room.victims:
                h.stage(f"making room (stopping {', '.join(room.victims)})")
            for victim in room.victims:
                await self._drain(self.registry[victim], server)
                await self._unload(self.registry[victim], f"making room for '{server}'")
            h.stage("starting container")
            try:
                await asyncio.to_thread(self.stack.load, server)
            except (StackError, EngineError) as e:
                raise Refused(503, f"server '{server}' could not be started: {e}") from None
        else:  # already on its way (the supervisor restarted it, or another gateway started it)
            await asyncio.to_thread(self.stack.state.set_desired, h.keys, RUNNING)
        h.stage("loading model")
        await self._wait_up(h)
        if h.section.saves_slots:
            h.stage("restoring prompt caches")
        await self._restore(h)
        h.last_used = time.time()
        h.load_seconds = time.monotonic() - started
        self._event("load", h, f"in {h.load_seconds:.1f}s")

    async def _wait_up(self, h: Server) -> None:
        """Until H's server answers /health; an exit while loading is a refusal with its last log lines (and
        the server is left unloaded rather than restarted in a loop)."""
        server = h.name
        cname = container_name(self.stack.name, server, 1)
        deadline = time.monotonic() + self.load_timeout
        checked = 0.0
        await self.registry.refresh()
        while True:
            replica = await self.registry.wait_ready(server, 1.0)
            if replica is not None:
                return
            if time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                info = await asyncio.to_thread(self.stack.engine.inspect, cname)
                if info is not None and not info.running:  # (missing: being recreated by the supervisor)
                    tail = await asyncio.to_thread(self.stack.tail, cname, 15)
                    await asyncio.to_thread(self.stack.state.set_desired, h.keys, UNLOADED)
                    raise Refused(502, f"server '{server}' exited while loading; its last log lines:\n{tail}")
                await self.registry.refresh()
            if time.monotonic() > deadline:
                raise Refused(503, f"server '{server}' is still loading after {self.load_timeout:.0f}s "
                                   "([gateway] load_timeout)", retry_after=5)

    async def _drain(self, victim: Server, server: str) -> None:
        """Until VICTIM has no request in flight; requests for it that come meanwhile wait for its next load."""
        if not victim.in_flight:
            return
        victim.move(Phase.DRAINING)
        deadline = time.monotonic() + self.load_timeout
        try:
            while victim.in_flight:
                if time.monotonic() > deadline:
                    raise Refused(503, f"server '{server}' needs the memory of '{victim.name}', whose requests did "
                                       f"not finish within {self.load_timeout:.0f}s ([gateway] load_timeout)",
                                  retry_after=5)
                await asyncio.sleep(0.05)
        finally:
            victim.move(None)

    # -- unloading ----------------------------------------------------------------------------------------
    async def unload(self, server: str, reason: str = "asked to") -> bool:
        """Stop SERVER (its prompt caches saved first). False when it was not loaded. Refused while busy."""
        h = self.registry[server]
        async with self._lock:
            if h.in_flight:
                raise Refused(409, f"server '{server}' has {h.in_flight} requests in flight; unload it when "
                                   "they are done", retry_after=5)
            info = await asyncio.to_thread(self.stack.engine.inspect, container_name(self.stack.name, server, 1))
            if info is None or not info.running:
                await asyncio.to_thread(self.stack.state.set_desired, h.keys, UNLOADED)
                return False
            await self._unload(h, reason)
            return True

    async def _unload(self, h: Server, reason: str) -> None:
        """Under the lock: save H's server's slots, stop it, forget its address."""
        h.move(Phase.STOPPING)
        try:
            await self._save(h)
            await asyncio.to_thread(self.stack.unload, h.name)
            h.place([])
            self._event("unload", h, reason)
        finally:
            h.move(None)

    # -- prompt caches ------------------------------------------------------------------------------------
    @staticmethod
    def _slot_file(h: Server, slot: int) -> str:
        return f"{(h.figure.hash if h.figure else '') or 'slot'}-{slot}.bin"

    async def _call(self, h: Server, method: str, target: str, body: dict[str, Any] | None = None
                    ) -> tuple[int, Any]:
        replica = h.pick()
        if replica is None:
            return 0, None
        data = json.dumps(body).encode() if body is not None else b""
        headers = self.auth + ([(b"content-type", b"application/json")] if body is not None else [])
        try:
            resp = await self.client.request(replica.host, replica.port, method, target.encode(), headers, data)
            raw = await resp.read(self.client.idle_timeout)
        except UpstreamError as e:
            log.warning("%s %s on %s: %s", method, target, h.name, e)
            return 0, None
        try:
            return resp.status, json.loads(raw or b"null")
        except ValueError:
            return resp.status, None

    async def _save(self, h: Server) -> None:
        if not h.section.saves_slots:
            return
        status, slots = await self._call(h, "GET", "/slots")
        if status != 200 or not isinstance(slots, list):
            return
        directory = self.stack.slot_dir(h.name)
        for old in directory.glob("*.bin"):  # caches of other settings, and slots now empty
            old.unlink(missing_ok=True)
        for slot in slots:
            if isinstance(slot, dict) and isinstance(slot.get("id"), int) and slot.get("n_prompt_tokens"):
                status, answer = await self._call(h, "POST", f"/slots/{slot['id']}?action=save",
                                                  {"filename": self._slot_file(h, slot["id"])})
                if status != 200:
                    log.warning("%s: saving slot %s failed: %s", h.name, slot["id"], answer)

    async def _restore(self, h: Server) -> None:
        if not h.section.saves_slots:
            return
        directory = self.stack.slot_dir(h.name)
        for path in sorted(directory.glob("*.bin")):
            prefix, _, slot = path.stem.rpartition("-")
            if prefix != self._slot_file(h, 0).rpartition("-")[0] or not slot.isdigit():
                continue
            status, answer = await self._call(h, "POST", f"/slots/{slot}?action=restore", {"filename": path.name})
            if status == 200:
                log.info("%s: slot %s restored (%s tokens)", h.name, slot, (answer or {}).get("n_restored"))
            else:
                log.warning("%s: restoring slot %s failed: %s", h.name, slot, answer)

    # -- memory -------------------------------------------------------------------------------------------
    def figure(self, h: Server) -> Figure:
        """What H's server will hold (blocking: reads its GGUF files, asks the engine for its image's flags)."""
        unit = self.stack.units([h.name])[0]
        figure = h.figure
        if figure is not None and figure.hash == unit.hash and figure.estimate:
            return figure
        try:
            estimate = self.stack.estimate(h.name).devices
        except (GGUFError, OSError) as e:
            raise Refused(503, f"server '{h.name}': its model cannot be read to estimate its memory: {e}") from None
        h.figure = Figure(unit.hash, estimate, {})
        return h.figure

    def _settings(self) -> dict[str, str]:
        p = self.stack.cfg.placement
        out = {"cpu": f"[placement] cpu_memory = \"{p.cpu_memory}\""}
        out.update({d: f"[placement] gpu_memory.\"{d}\" = \"{v}\"" for d, v in p.gpu_memory.items()})
        return out

    def held(self, exclude: str | None = None) -> list[placement.Held]:
        """What the running servers hold (always ones included), by the figures known."""
        return [placement.Held(h.name, h.held(), h.section.on_demand, h.in_flight, h.last_used)
                for h in self.handles()  # a server not running, or whose load is only queued, holds nothing yet
                if h.name != exclude and (h.health() != DOWN or h.coming())]

    async def measure(self) -> None:
        """What each running server's process holds now; the largest figure seen for its settings is kept."""
        self._measured_at = time.monotonic()
        for h in self.handles():
            if h.pick() is None or h.driving is Phase.STOPPING:
                continue
            if h.figure is None or not h.figure.hash:
                try:
                    await asyncio.to_thread(self.figure, h)
                except (Refused, StackError, EngineError) as e:
                    log.debug("no estimate for %s: %s", h.name, e)
                    continue
            figure = h.figure
            assert figure is not None
            await self._read_back_context(h, figure)
            device, container = self.stack.device_of(h.name), container_name(self.stack.name, h.name, 1)
            if device == "cpu":  # the process's resident memory
                used = await asyncio.to_thread(self.stack.engine.memory, container)
            else:  # what the GPU's driver says the process holds
                used = await asyncio.to_thread(self.stack.engine.gpu_memory, container, device.split(":")[0])
            if used is not None:
                figure.measured[device] = max(figure.measured.get(device, 0), used)
        await self._note()

    async def _read_back_context(self, h: Server, figure: Figure) -> None:
        """A server whose context was fitted (ctx_size = "fit"): the context llama-server chose, read from its
        /props once per settings, and its estimate made again for that context instead of the model's most."""
        if not h.section.fits_context or figure.context is not None:
            return
        status, props = await self._call(h, "GET", "/props")
        try:
            per_request, slots = int(props["default_generation_settings"]["n_ctx"]), int(props["total_slots"])
        except (TypeError, KeyError, ValueError):
            log.debug("%s: no context in /props (%s)", h.name, status)
            return
        if not (0 < per_request < 2**24 and 0 < slots <= 4096):
            return
        figure.context = per_request
        section = h.section.model_copy(update={"ctx_size": memory.kv_cells(h.section, per_request, slots)})
        try:
            figure.estimate = (await asyncio.to_thread(self.stack.estimate, h.name, section)).devices
        except (GGUFError, OSError, StackError) as e:
            log.debug("%s: no estimate for its fitted context: %s", h.name, e)

    async def _note(self) -> None:
        """Memory figures and last uses into the stack's state (for `podllama status`), when they changed."""
        fields: dict[str, dict[str, Any]] = {}
        for h in self.handles():
            entry: dict[str, Any] = {}
            if h.figure is not None:
                f = h.figure
                entry["memory"] = {"hash": f.hash, "estimate": f.estimate, "measured": f.measured} | (
                    {"context": f.context} if f.context else {})
            if h.last_used:
                entry["last_used"] = round(h.last_used, 1)
            if entry and self._noted.get(h.name) != entry:
                fields[h.keys[0]] = entry
                self._noted[h.name] = entry
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
        for h in self.handles():
            cfg = h.section
            if not cfg.on_demand or h.in_flight or h.loading is not None or h.pick() is None:
                continue
            h.last_used = h.last_used or now
            idle = now - h.last_used
            if idle >= cfg.idle_seconds:
                try:
                    if await self.unload(h.name, f"idle for {idle:.0f}s (idle_timeout {cfg.idle_seconds:g}s)"):
                        stopped.append(h.name)
                except Refused:
                    pass  # a request came in meanwhile
        every = MEASURE_EVERY if any(h.section.on_demand for h in self.handles()) else MEASURE_ALWAYS_EVERY
        if time.monotonic() - self._measured_at >= every:
            await self.measure()
        return stopped

    # -- what it did --------------------------------------------------------------------------------------
    @staticmethod
    def _event(action: str, h: Server, detail: str) -> None:
        log.info("%s %s (%s)%s", action, h.name, detail,
                 f"; holds {human(sum(h.held().values()))}" if h.figure else "")

    async def close(self) -> None:
        self.client.close()


__all__ = ["Loader", "Refused"]
