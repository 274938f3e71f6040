"""Which servers to stop so that another fits in the memory budget: a pure decision, tested on its own.

Every running server holds memory on one or more devices (measured once it ran, estimated before). To start
server X, each device's budget must hold what runs there plus X. Room is made by stopping on-demand servers:
those with no request in flight first, the least recently used first; then, if that is not enough, busy ones
(the loader lets their requests finish before it stops them, and holds new ones back meanwhile). `always`
servers are never chosen. When even stopping every on-demand server would not be enough, the refusal names
what holds the memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..units import human


@dataclass
class Held:
    """A running (or starting) server and what it holds."""

    server: str
    devices: dict[str, int]  # bytes per device
    on_demand: bool
    busy: int = 0  # requests in flight
    last_used: float = 0.0  # when its last request ended (any clock, compared among servers)


@dataclass
class Room:
    victims: list[str] = field(default_factory=list)  # stop these, in this order
    refusal: str | None = None  # why it cannot fit (then victims is empty)


def make_room(server: str, need: dict[str, int], budgets: dict[str, int | None], held: list[Held],
              setting: dict[str, str] | None = None) -> Room:
    """What to stop so that SERVER, needing NEED bytes per device, fits in BUDGETS (None: no limit on that
    device) next to HELD. SETTING names each device's budget in the config, for the messages."""
    setting = setting or {}
    others = [h for h in held if h.server != server]
    candidates = sorted((h for h in others if h.on_demand), key=lambda h: (h.busy > 0, h.last_used))
    victims: list[str] = []
    for device, bytes_needed in need.items():
        limit = budgets.get(device)
        if limit is None or bytes_needed <= 0:
            continue
        where = setting.get(device, f"[placement] {'cpu_memory' if device == 'cpu' else 'gpu_memory'}")
        if bytes_needed > limit:
            return Room(refusal=f"server '{server}' needs {human(bytes_needed)} on {device}, more than the whole "
                                f"budget of {human(limit)} ({where}); raise the budget, or make the server smaller "
                                "(ctx_size, parallel, a smaller quantization, cache_type_k/v)")
        used = sum(h.devices.get(device, 0) for h in others if h.server not in victims)
        for h in candidates:
            if used + bytes_needed <= limit:
                break
            if h.server in victims or not h.devices.get(device):
                continue
            victims.append(h.server)
            used -= h.devices[device]
        if used + bytes_needed > limit:
            holders = [h for h in others if h.server not in victims and h.devices.get(device)]
            described = ", ".join(f"'{h.server}' {human(h.devices[device])}"
                                  for h in sorted(holders, key=lambda h: -h.devices[device]))
            return Room(refusal=f"server '{server}' needs {human(bytes_needed)} on {device} and cannot be loaded: "
                                f"the budget is {human(limit)} ({where}) and {human(used)} of it is held by servers "
                                f"that always run ({described}); raise the budget, or make one of them "
                                "start = \"on-demand\"")
    return Room(victims=victims)
