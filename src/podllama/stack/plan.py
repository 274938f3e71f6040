"""What `start` would change: a pure comparison of the containers the config asks for with those that run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..engine import ContainerInfo
from .spec import L_HASH, L_REPLICA, L_SERVER, Unit, int_label


@dataclass
class Action:
    action: str  # start | restart | keep | remove | on-demand (not running; its first request starts it)
    server: str
    replica: int | None
    container: str
    reason: str


@dataclass
class Plan:
    steps: list[Action] = field(default_factory=list)

    @property
    def changes(self) -> list[Action]:
        return [s for s in self.steps if s.action not in ("keep", "on-demand")]

    def describe(self) -> str:
        """One line a person reads: "restart embed; start rerank; chat untouched"."""
        by_server: dict[str, set[str]] = {}
        for s in self.steps:
            by_server.setdefault(s.server, set()).add(s.action)
        parts, untouched = [], []
        for server, actions in by_server.items():
            changed = sorted(actions - {"keep", "on-demand"})
            if changed:
                parts.append(f"{'/'.join(changed)} {server}")
            elif "on-demand" in actions:
                parts.append(f"{server} on demand")
            else:
                untouched.append(server)
        if untouched:
            parts.append(f"{', '.join(untouched)} untouched")
        return "; ".join(parts) or "nothing to do"

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.describe(), "steps": [asdict(s) for s in self.steps]}



def plan(units: list[Unit], running: dict[str, ContainerInfo], declared: set[str] | None) -> Plan:
    """For UNITS against the RUNNING server containers: changed ones restarted, missing ones started, matching
    running ones kept; with DECLARED (a whole-stack plan), containers outside it are removed. An on-demand
    unit that does not run is left for its first request; one that runs is treated like any other."""
    out = Plan()
    if declared is not None:
        for cname, orphan in sorted(running.items()):
            if cname not in declared:
                out.steps.append(Action("remove", orphan.labels.get(L_SERVER, "?"),
                                      int_label(orphan.labels.get(L_REPLICA)), cname, "no longer declared in the config"))
    for u in units:
        info = running.get(u.name)
        if u.on_demand and (info is None or not info.running):
            out.steps.append(Action("on-demand", u.server, u.replica, u.name, "started by its first request"))
        elif info is None:
            out.steps.append(Action("start", u.server, u.replica, u.name, "not created yet"))
        elif info.labels.get(L_HASH) != u.hash:
            out.steps.append(Action("restart", u.server, u.replica, u.name, "config or image changed"))
        elif not info.running:
            out.steps.append(Action("start", u.server, u.replica, u.name, f"was {info.state}"))
        else:
            out.steps.append(Action("keep", u.server, u.replica, u.name, "running, unchanged"))
    return out
