"""Requests and servers that die or restart, in-process against a scripted upstream: a server expected back is
waited for like a loading one, a request that got no byte of its answer is sent once more, anything else ends
cleanly and at once."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from tests import scripted
from tests.helpers import wait_until
from tests.unit.conftest import free_port

CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}


def started(gw, *names: str) -> None:
    """What `podllama start` records: these servers should run."""
    gw.gw.stack.state.set_desired([f"{n}-1" for n in names], "running")


def dies_once(then: scripted.Reply = scripted.echo) -> scripted.Reply:
    """The first request kills the server: its connection closes before a byte of the answer (as when its
    process is killed); the ones after are answered by THEN."""
    calls = [0]

    async def reply(ex: scripted.Exchange) -> None:
        calls[0] += 1
        if calls[0] == 1:
            ex.keep_open = False
            return
        await then(ex)
    return reply


def health_after(seconds: float):
    """/health answers 503 (loading) until SECONDS from now, then 200."""
    ready_at = time.monotonic() + seconds

    async def reply(ex: scripted.Exchange) -> None:
        if time.monotonic() < ready_at:
            await ex.send(503, b'{"error":{"message":"Loading model"}}')
        else:
            await ex.send(200, b'{"status":"ok"}')
    return reply


def test_a_request_whose_server_died_before_answering_is_sent_again_when_it_is_back(gateway, upstream):
    gw = gateway()
    started(gw, "chat", "embed")
    upstream.on("/v1/chat/completions", dies_once())
    upstream.on("/health", health_after(0))
    # the server dies with the first request; while it comes back it loads for a second
    original = upstream.replies["/v1/chat/completions"]

    async def dies_then_loads(ex: scripted.Exchange) -> None:
        if not upstream.received("/v1/chat/completions")[:-1]:
            upstream.on("/health", health_after(1.0))
        await original(ex)
    upstream.on("/v1/chat/completions", dies_then_loads)
    t0 = time.monotonic()
    r = gw.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    assert len(upstream.received("/v1/chat/completions")) == 2  # sent once more, once
    assert 0.9 < time.monotonic() - t0 < 5  # it waited for the load, and not for a poll interval beyond it


def test_requests_for_a_server_coming_back_wait_for_it(gateway, upstream):
    """The server's port refuses connections (its container is gone) and then answers again elsewhere."""
    dead = free_port()
    ports = {"chat": dead, "embed": upstream.port}
    gw = gateway(targets=ports)
    started(gw, "chat", "embed")
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(gw.post("/v1/chat/completions", json=CHAT)))
               for _ in range(4)]
    for t in threads:
        t.start()
    assert wait_until(lambda: gw.gw.registry["chat"].waiters == 4, timeout=10)
    assert not results  # waiting, not refused
    ports["chat"] = upstream.port  # the supervisor recreated it: a new address
    for t in threads:
        t.join(10)
    assert [r.status_code for r in results] == [200] * 4


def test_a_server_not_expected_back_is_refused_at_once_with_the_reason(gateway, upstream):
    ports = {"chat": free_port(), "embed": upstream.port}
    gw = gateway(targets=ports)
    gw.gw.stack.state.set_desired(["chat-1"], "stopped")
    t0 = time.monotonic()
    r = gw.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and "stopped" in r.json()["error"]["message"] and time.monotonic() - t0 < 2
    started(gw, "chat")
    gw.gw.stack.state.record_failure("chat-1", "crash loop", "")
    # the registry's reading of the state is half a second old at most
    assert wait_until(lambda: "gave up" in (gw.gw.registry["chat"].expected() or ""), timeout=5)
    r = gw.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and "gave up" in r.json()["error"]["message"] and r.headers["retry-after"] == "10"
    # and one never started (no state) is not waited for either
    gw.gw.stack.state.forget(["chat-1"])
    assert wait_until(lambda: (gw.gw.registry["chat"].expected() or "").startswith("not running"), timeout=5)
    t0 = time.monotonic()
    assert gw.post("/v1/chat/completions", json=CHAT).status_code == 503 and time.monotonic() - t0 < 2


def test_waiting_is_bounded_by_load_timeout(gateway, upstream):
    gw = gateway("load_timeout = 1", targets={"chat": free_port(), "embed": upstream.port})
    started(gw, "chat")
    t0 = time.monotonic()
    r = gw.post("/v1/chat/completions", json=CHAT)
    took = time.monotonic() - t0
    assert r.status_code == 503 and "did not come back within 1s" in r.json()["error"]["message"], r.text
    assert 0.9 < took < 3


def test_a_stream_that_had_begun_is_not_sent_again(gateway, upstream):
    async def one_event_then_gone(ex: scripted.Exchange) -> None:
        await scripted.then_silence(b"data: {}\n\n", 0.3)(ex)
        ex.keep_open = False  # the server's process is gone: its connections close

    upstream.on("/v1/chat/completions", one_event_then_gone)
    gw = gateway()
    started(gw, "chat")
    r = gw.post("/v1/chat/completions", json=CHAT | {"stream": True})
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[0] == "data: {}" and '"error"' in events[-1]
    assert len(upstream.received("/v1/chat/completions")) == 1


def test_a_client_that_leaves_while_waiting_ends_the_wait(gateway, upstream):
    gw = gateway(targets={"chat": free_port(), "embed": upstream.port})
    started(gw, "chat")
    body = b'{"messages":[{"role":"user","content":"x"}]}'
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        assert wait_until(lambda: gw.gw.registry["chat"].waiters == 1, timeout=10)
    assert wait_until(lambda: gw.gw.registry["chat"].waiters == 0, timeout=10)  # nobody waits for a client that is gone
    assert not upstream.received("/v1/chat/completions")


def test_a_large_upload_is_received_whole_and_sent_again_when_the_server_died(gateway, upstream):
    """A body over the memory threshold waits in a temporary file: the whole of it goes to the server that
    came back, as a small one does."""
    upstream.on("/v1/audio/transcriptions", dies_once())
    gw = gateway(servers='[servers.chat]\nmodel = "m.gguf"\n'
                         '[servers.ears]\nrole = "audio"\nmodel = "a.gguf"\nmmproj = "p.gguf"\n')
    started(gw, "chat", "ears")
    big = b"x" * (2 << 20)
    r = gw.post("/v1/audio/transcriptions", files={"file": ("a.wav", big, "audio/wav")}, data={"model": "ears"})
    assert r.status_code == 200, r.text
    sent = upstream.received("/v1/audio/transcriptions")
    assert len(sent) == 2 and sent[0].body == sent[1].body and big in sent[1].body
    assert int(sent[1].headers[b"content-length"]) == len(sent[1].body), "sent with its length, not chunked"


def test_the_wait_probes_often(gateway, upstream):
    """While requests wait, the server's /health is asked about four times a second (not every poll round)."""
    gw = gateway("load_timeout = 3")
    for handle in gw.gw.registry.handles.values():  # as after a restart: unknown until looked up
        handle.replicas = []
    started(gw, "chat")
    upstream.on("/health", health_after(1.0))
    before = len(upstream.received("/health"))
    assert gw.post("/v1/chat/completions", json=CHAT).status_code == 200
    probes = len(upstream.received("/health")) - before
    assert probes >= 4, probes


def test_waiting_requests_share_one_watcher(gateway, upstream):
    gw = gateway("load_timeout = 3", targets={"chat": free_port(), "embed": upstream.port})
    started(gw, "chat")
    registry = gw.gw.registry
    threads = [threading.Thread(target=gw.post, args=("/v1/chat/completions",), kwargs={"json": CHAT})
               for _ in range(20)]
    for t in threads:
        t.start()
    # all twenty wait at once, on one watcher (load_timeout 3 s: long enough for slow threads to start)
    assert wait_until(lambda: registry["chat"].waiters == 20, timeout=10, interval=0.01)
    assert [h.name for h in registry.handles.values() if h.watcher is not None] == ["chat"]
    for t in threads:
        t.join(10)
    assert wait_until(lambda: registry["chat"].waiters == 0 and registry["chat"].watcher is None, timeout=5)
