"""A server's handle (gateway/servers.py): its phase, observed and driven, and the moves it may make."""

from __future__ import annotations

import asyncio

import pytest

from podllama.config import ServerSection
from podllama.engine.health import DOWN, LOADING, OK
from podllama.gateway.routing.servers import MOVES, BadMove, Phase, Replica, Server


def handle(saved: dict | None = None, replicas: int = 1, **kw) -> Server:
    section = ServerSection(model="m.gguf", replicas=replicas, **kw)
    return Server("chat", section, (lambda: saved) if saved is not None else None)


def test_the_observed_phase_follows_the_replicas_and_the_saved_desire():
    h = handle({"chat-1": {"desired": "running"}})
    assert h.phase is Phase.STARTING and h.coming()  # nothing answers yet, but it should run: coming
    a, b = Replica("chat", "c-1", "10.0.0.1"), Replica("chat", "c-2", "10.0.0.2")
    h.place([a, b])
    assert h.observe(a, LOADING) and not h.observe(a, LOADING)  # a change is reported once
    assert h.phase is Phase.STARTING and h.model_state == "loading" and h.pick() is None
    h.observe(b, OK)
    assert h.phase is Phase.READY and h.ready() and h.pick() is b and h.model_state == "loaded"
    b.in_flight, a.state = 3, OK
    assert h.pick() is a  # the fewest requests in flight


@pytest.mark.parametrize(("entry", "why"), [
    ({"desired": "stopped"}, "stopped"),
    ({"desired": "unloaded"}, "not loaded"),
    ({"desired": "running", "failed": {"reason": "crash loop"}}, "failed"),
    (None, "not running"),
])
def test_a_server_not_coming_says_why(entry, why):
    h = handle({"chat-1": entry} if entry else {})
    assert h.phase is Phase.STOPPED and not h.coming() and h.model_state == "unloaded"
    assert (h.expected() or "").startswith(why)


def test_a_server_of_several_replicas_comes_while_any_should_run():
    h = handle({"chat-1": {"desired": "stopped"}, "chat-2": {"desired": "running"}}, replicas=2)
    assert h.keys == ["chat-1", "chat-2"] and h.expected() is None


def test_driven_phases_hold_until_released_and_move_only_as_allowed():
    h = handle({"chat-1": {"desired": "running"}})
    r = Replica("chat", "c-1", "10.0.0.1", state=OK)
    h.place([r])
    h.move(Phase.DRAINING)
    assert h.phase is Phase.DRAINING and not h.ready() and h.pick() is r  # its requests go on; new ones wait
    with pytest.raises(BadMove):
        h.move(Phase.STARTING)  # a draining server is stopped or released, never loaded
    h.move(Phase.STOPPING)
    assert h.model_state == "unloaded"
    h.place([])
    h.move(None)
    assert h.phase is Phase.STARTING  # the state still says running: coming back
    for start, ends in MOVES.items():
        for end in set(Phase) | {None}:
            h.driving = start
            if end in ends:
                h.move(end)
                assert h.driving is end
            else:
                with pytest.raises(BadMove):
                    h.move(end)


def test_a_waiter_is_woken_by_a_change_not_by_its_timeout():
    async def scenario() -> float:
        h = handle({"chat-1": {"desired": "running"}})
        r = Replica("chat", "c-1", "10.0.0.1", state=DOWN)
        h.place([r])
        loop = asyncio.get_running_loop()
        loop.call_soon(h.observe, r, OK)
        t0 = loop.time()
        await h.changed(timeout=30)
        return loop.time() - t0

    assert asyncio.run(scenario()) < 29  # woken by the change (the timeout is 30 s)


def test_a_remote_server_is_never_waited_for():
    h = Server("far", ServerSection(model="m.gguf"), lambda: {"far-1": {"desired": "running"}}, remote="http://far:8080")
    assert h.phase is Phase.STOPPED and "remote" in (h.expected() or "")
