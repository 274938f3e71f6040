"""Keeps a stack's servers up: restarts what exits or stops answering, with exponential backoff and a
crash-loop limit; leaves alone what is still loading (unless it makes no progress for `stall_timeout`).

It runs inside the gateway process (so it lives as long as the stack) in a thread of its own, and one round
is `check_once()`, which the tests drive directly. It skips a round while a lifecycle command holds the
stack's operation lock, and never restarts a server the user stopped. The gateway wakes it early when a
request finds a server gone, and hears from it when a server was restarted (to look up its new address).

When the engine cannot be asked (its API service is gone), supervision pauses: `engine_problem` says since
when and why, requests keep flowing to the servers that run, and the next round that reaches the engine
carries on where the last one stopped.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import SupervisorSection
from ..config.kinds import of_role
from ..engine import ContainerInfo, EngineError
from ..engine.health import DOWN, LOADING, OK, container_health, probe
from . import SERVER_PORT, Stack, StackError, Unit
from .state import RUNNING
from .status import uptime

log = logging.getLogger("podllama.supervisor")
UNITS_TTL = 300.0  # seconds before the container specs are computed again from the config and images
ENGINE_EVERY = 30.0  # while every server answers, the engine (costly to ask) is consulted this often
WAKE_GAP = 0.5  # at least this long between rounds, however often it is woken


@dataclass
class Watch:
    """What the supervisor knows of one container between rounds."""

    failures: int = 0  # consecutive failed probes
    loaded: bool = False  # answered 200 at least once since its last (re)start
    progress_at: float = field(default_factory=time.monotonic)
    last_log: str = ""
    started_at: str | None = None  # the container's start this watch is about
    backoff: float = 0.0
    not_before: float = 0.0  # no restart before this time (backoff)


class Supervisor:
    def __init__(self, stack: Stack, policy: SupervisorSection | None = None,
                 units: Callable[[], list[Unit]] | None = None,
                 before_round: Callable[[], object] | None = None,
                 loading: Callable[[], set[str]] = set,
                 on_restart: Callable[[Unit], object] = lambda unit: None,
                 observed: Callable[[str], str | None] | None = None) -> None:
        """UNITS: where the containers to watch come from (default: the stack's config). BEFORE_ROUND runs at
        the start of every round, once no lifecycle command holds the stack (the gateway re-reads its config
        there, so a server removed from services.toml is never brought back). LOADING: the servers someone else
        is bringing up (the gateway's on-demand loads), whose exits are theirs to handle. ON_RESTART hears of
        each container restarted. OBSERVED: a container's health as someone else's probes see it (the gateway's;
        None where they do not know it), read instead of a probe of its own for the cheap look of each round."""
        self.stack = stack
        self.policy = policy or stack.cfg.supervisor
        self._source = units or stack.units
        self._before_round = before_round
        self.watch: dict[str, Watch] = {}
        self.events: list[dict[str, Any]] = []
        self.rounds = 0  # rounds begun (skipped ones not counted)
        self._units: list[Unit] = []
        self._units_at = -math.inf  # never (a fresh machine's monotonic clock starts near 0)
        self._addresses: dict[str, str] = {}  # container → address, from the last look at the engine
        self._engine_at = -math.inf
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.on_restart, self.loading, self.observed = on_restart, loading, observed
        # {"since": epoch seconds, "error": text}; carried over from a gateway that went away meanwhile
        self.engine_problem: dict[str, Any] | None = stack.state.read().get("engine_problem")

    def wake(self, *_: object) -> None:
        """Look now rather than at the next interval (a request found a server gone)."""
        self._wake.set()
    def refresh(self) -> None:
        """Forget the cached container specs (after a config change)."""
        self._units_at = -math.inf

    def configure(self, policy: SupervisorSection) -> None:
        """A new config: its policy, and container specs computed afresh."""
        self.policy = policy
        self.refresh()

    def units(self) -> list[Unit]:
        if time.monotonic() - self._units_at > UNITS_TTL:
            self._units = self._source()
            self._units_at = time.monotonic()
        return self._units

    # -- one round ----------------------------------------------------------------------------------------
    def check_once(self) -> list[dict[str, Any]]:
        """Look at every server once; restart or give up on the ones that need it. Returns what it did."""
        with self._lock, self.stack.state.operation(blocking=False) as got:
            if not got:
                return []
            self.rounds += 1
            if self._before_round is not None:
                self._before_round()
            try:
                units = self.units()
            except EngineError as e:
                self._engine_down(e)
                return []
            except StackError as e:
                log.warning("supervisor: cannot compute the stack's containers: %s", e)
                return []
            saved = self.stack.state.read().get("servers", {})
            # what should run: not stopped by the user, not an unloaded on-demand server, not given up on, not
            # being loaded (a server that exits while it loads is reported to its requests, not restarted)
            loading = self.loading()
            active = [u for u in units if saved.get(u.key, {}).get("desired", RUNNING) == RUNNING
                      and not saved.get(u.key, {}).get("failed") and u.server not in loading]
            # The cheap look first: every server answering /health at its known address needs nothing more.
            healthy = {u.name for u in active if self._answers(u.name)}
            for name in healthy:
                self._healthy(self.watch.setdefault(name, Watch()), name)
            if len(healthy) == len(active) and time.monotonic() - self._engine_at < ENGINE_EVERY:
                return []
            try:
                running = self.stack.containers("server")
            except EngineError as e:
                self._engine_down(e)
                return []
            if self.engine_problem is not None:
                log.warning("the engine answers again (it did not since %s); supervision goes on",
                            time.strftime("%H:%M:%S", time.localtime(self.engine_problem["since"])))
                self.engine_problem = None
                self.stack.state.record_engine(None)
            self._engine_at = time.monotonic()
            self._addresses = {n: i.ip for n, i in running.items() if i.ip and i.running}
            done = []
            for unit in active:
                if unit.name in healthy and unit.name in running and running[unit.name].running:
                    continue
                event = self._check(unit, running.get(unit.name))
                if event:
                    done.append(event)
            self.events = (self.events + done)[-200:]
            return done

    def _answers(self, container: str) -> bool:
        """CONTAINER answered /health with 200 at its known address: as observed, else as probed now."""
        seen = self.observed(container) if self.observed is not None else None
        if seen is not None:
            return seen == OK
        address = self._addresses.get(container)
        return bool(address) and probe(f"http://{address}:{SERVER_PORT}") == OK

    def _engine_down(self, e: EngineError) -> None:
        if self.engine_problem is None:
            log.error("cannot reach the engine: %s. Supervision is paused until it answers; requests still go to "
                      "the servers that run (fix: `podllama doctor --fix` on the host)", e)
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            self.engine_problem = {"since": time.time(), "error": (lines[-1] if lines else str(e))[-300:]}
            self.stack.state.record_engine(self.engine_problem["error"])

    def _check(self, unit: Unit, info: ContainerInfo | None) -> dict[str, Any] | None:
        w = self.watch.setdefault(unit.name, Watch())
        now = time.monotonic()
        if info is None:
            return self._restart(unit, w, "container missing", recreate=True)
        if not info.running:
            return self._restart(unit, w, f"exited with code {info.exit_code}", recreate=False)
        if info.started_at != w.started_at:  # started again since the last look (by a load, or by someone else)
            if w.started_at is not None:
                w.failures, w.loaded, w.progress_at, w.last_log = 0, False, now, ""
            w.started_at = info.started_at
        health = container_health(self.stack.engine, info, SERVER_PORT)
        if health == OK:
            self._healthy(w, unit.name)
            return None
        # not listening yet: starting, for a while; loading, for a kind that listens only once loaded
        starting = health == DOWN and ((uptime(info.started_at) or 0) < self.policy.listen_timeout
                                       or of_role(unit.role).listens_when_loaded)
        if (health == LOADING or starting) and not w.loaded:
            # the last whole line: an engine may keep a line written in pieces as several log entries
            line = (self.stack.tail(unit.name, lines=5).splitlines() or [""])[-1]
            if line != w.last_log:
                w.last_log, w.progress_at = line, now
            elif now - w.progress_at > self.policy.stall_timeout:
                return self._restart(unit, w, f"no loading progress for {self.policy.stall_timeout:.0f}s "
                                              f"(last log line: {line[-160:]!r})", recreate=True)
            return None
        w.failures += 1
        if w.failures >= self.policy.unhealthy_after:
            return self._restart(unit, w, f"not answering /health ({health}) {w.failures} times", recreate=True)
        return None

    def _healthy(self, w: Watch, name: str) -> None:
        now = time.monotonic()
        if w.failures or not w.loaded:
            log.info("%s healthy", name)
        w.failures, w.loaded, w.progress_at = 0, True, now
        if now - w.not_before > self.policy.backoff_max:
            w.backoff = 0.0  # healthy for a while: the next crash starts the backoff afresh

    def _restart(self, unit: Unit, w: Watch, reason: str, recreate: bool) -> dict[str, Any] | None:
        now = time.monotonic()
        if now < w.not_before:
            return None  # backing off
        state = self.stack.state
        recent = [t for t in state.server(unit.key).get("recent_restarts", [])
                  if time.time() - t < self.policy.crash_loop_window]
        if len(recent) >= self.policy.crash_loop_limit:
            logs = self.stack.tail(unit.name, lines=30)
            state.record_failure(unit.key, f"crash loop: {len(recent)} restarts in "
                                 f"{self.policy.crash_loop_window:.0f}s, last: {reason}", logs)
            log.error("%s failed (crash loop); last log lines:\n%s", unit.name, logs)
            return {"container": unit.name, "action": "failed", "reason": reason}
        log.warning("restarting %s: %s", unit.name, reason)
        state.record_restart(unit.key, reason)
        try:
            if recreate:
                self.stack.recreate(unit)
            else:
                self.stack.engine.start(unit.name)
            self.on_restart(unit)
        except (EngineError, StackError) as e:
            log.error("restart of %s failed: %s", unit.name, e)
        w.backoff = min(self.policy.backoff_max, max(self.policy.backoff_initial, w.backoff * 2))
        w.not_before = time.monotonic() + w.backoff
        w.failures, w.loaded, w.progress_at, w.last_log = 0, False, time.monotonic(), ""
        return {"container": unit.name, "action": "restart", "reason": reason}

    # -- the thread ---------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        log.info("supervising stack %s every %.1fs", self.stack.name, self.policy.interval)
        while not stop.is_set():
            self._wake.wait(max(0.0, self.policy.interval - WAKE_GAP))
            self._wake.clear()
            if stop.is_set():
                break
            try:
                self.check_once()
            except Exception:  # a round that breaks must not end supervision
                log.exception("supervisor round failed")
            stop.wait(WAKE_GAP)

    def start_thread(self) -> tuple[threading.Thread, threading.Event]:
        stop = _Stop(self._wake)
        thread = threading.Thread(target=self.run, args=(stop,), name="podllama-supervisor", daemon=True)
        thread.start()
        return thread, stop


class _Stop(threading.Event):
    """The thread's stop event; setting it also wakes the thread."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake_too = wake

    def set(self) -> None:
        super().set()
        self._wake_too.set()
