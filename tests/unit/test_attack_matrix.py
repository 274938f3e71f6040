"""The attack matrix: every route the gateway has — the route table's, Ollama's, the passthrough and the
gateway's own management and dashboard routes, found by walking them, not listed here — is sent hostile bodies
and hostile credentials. A route added later is attacked without anyone writing a test for it.

For every route and attack it asserts the status class (never a crash), that nothing reached a server that
should not have, that a key out of scope never hears of a server it may not use; and, once the matrix is
done, that no upstream connection stays held and the event loop was never stalled (its own lag histogram).
"""

from __future__ import annotations

import gzip
import json
import socket
import time

import httpx
import pytest
from fastapi.routing import APIRoute

from podllama.access.keys import KeyStore, NewKey
from podllama.gateway.apis.ollama import ROUTES as OLLAMA_ROUTES
from podllama.gateway.front.guard import ACCESS, Access, access_of_own
from podllama.gateway.routing.routes import ENDPOINTS
from tests.helpers import control_loop, wait_until
from tests.unit.conftest import SERVERS, recv_all

# a server the scoped key below may not use: its names must never reach that key
HIDDEN = '[servers.zeta9]\nmodel = "tiny.gguf"\nalias = "zeta-hidden"\n'
# and the update's request sample on: what every answered request passes through on the request path
GATEWAY = "max_body_mb = 1\nmin_body_rate = 0\nprogress_interval = 0.05\n[update]\nsample = 100\n"
# routes that act on the whole process whatever the body says: their keys are attacked, not their bodies
WHOLE_PROCESS = {("POST", "/admin/shutdown")}


def routes(app) -> list[tuple[str, str, Access]]:
    """(method, path, who may call it) for every route the gateway answers or forwards."""
    out = []
    for ep in ENDPOINTS:
        for method in ep.methods:
            out.append((method, ep.paths[0] + ("0" if ep.prefix else ""), ACCESS[ep.access]))
    out.append(("POST", "/servers/chat/anything", Access.INFERENCE))
    out += [("GET", "/", Access.PUBLIC), ("GET", "/_app/immutable/x.js", Access.PUBLIC)]  # llama.cpp's web UI
    out += [(r.method, r.path, Access.INFERENCE) for r in OLLAMA_ROUTES]
    table = {(m, p) for m, p, _ in out}
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        path = route.path.replace("{path:path}", "x/y")
        while "{" in path:
            path = path[:path.index("{")] + "x" + path[path.index("}") + 1:]
        for method in sorted((route.methods or set()) - {"HEAD"}):
            if (method, path) not in table:
                out.append((method, path, access_of_own(path)))
    return sorted(set(out))


@pytest.fixture
def armed(gateway, upstream):
    """A gateway with keys: an unscoped one, one scoped to embeddings, a revoked and an expired one."""
    gw = gateway(GATEWAY, servers=SERVERS + HIDDEN)
    store = KeyStore(gw.gw.credentials.database(gw.gw.stack.cfg))
    keys = {}
    for name, extra in (("full", {}), ("scoped", {"roles": ["embedding"]}), ("revoked", {}), ("expired", {})):
        keys[name] = {"Authorization": f"Bearer {store.create(NewKey(name, **extra), gw.gw.stack.cfg)[1]}"}
    store.revoke("revoked")
    gw.gw.credentials.database(gw.gw.stack.cfg).execute(
        "UPDATE podllama_keys SET expires = ? WHERE name = 'expired'", (time.time() - 1,))
    assert gw.gw.requests.read_keys()
    keys["wrong"] = {"Authorization": "Bearer not-a-key"}
    keys["missing"] = {}
    keys["admin"] = gw.admin
    return gw, keys


def forwarded(upstream) -> int:
    """Requests that reached the servers (the registry's own health probes aside)."""
    return sum(1 for r in upstream.requests if r.target != b"/health")


def crashed(status: int) -> bool:
    """A status no hostile request may cause: the gateway failed, not the request (501/503: a role with no
    server, which this stack has)."""
    return status >= 500 and status not in (501, 503)


def test_credentials_are_checked_on_every_route_before_the_body(armed, upstream):
    gw, keys = armed
    table = routes(gw.gw.api)
    assert len(table) > 60, "the walk found the routes"
    for method, path, access in table:
        if access is Access.PUBLIC:
            continue
        refused = ["missing", "wrong", "revoked", "expired"] + (["full", "scoped"] if access is Access.ADMIN else [])
        for who in refused:
            before = forwarded(upstream)
            # a head that announces a large body and never sends it: the refusal must not wait for it
            head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: 900000\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in keys[who].items()) + "\r\n").encode()
            t0 = time.monotonic()
            answer = gw.raw(head, timeout=5)
            assert answer.startswith(b"HTTP/1.1 401"), (method, path, who, answer[:120])
            assert time.monotonic() - t0 < 4, (method, path, who, "waited for a body it should not read")
            assert forwarded(upstream) == before, (method, path, who, "reached a server")


def test_a_scoped_key_never_hears_of_servers_outside_its_scope(armed, upstream):
    gw, keys = armed
    for method, path, access in routes(gw.gw.api):
        if access is Access.ADMIN:
            continue
        r = httpx.request(method, gw.url + path, headers=keys["scoped"], json={"model": "x", "input": "y"},
                          timeout=10)
        assert not crashed(r.status_code), (method, path, r.status_code, r.text[:200])
        assert b"zeta" not in r.content, (method, path, "named a server the key may not use", r.text[:300])
    # and the unscoped key does see it (the check above could fail)
    assert b"zeta-hidden" in gw.get("/v1/models", headers=keys["full"]).content


def hostile_bodies() -> dict[str, tuple[bytes, dict[str, str]]]:
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_obj = b'{"a":' * 5000 + b"1" + b"}" * 5000
    wide = json.dumps({"model": "tiny-chat", "prompt": list(range(60_000))}).encode()
    tags = json.dumps({"model": "tiny-chat", "prompt": "<sd_cpp_extra_args>" * 40_000,
                       "messages": [{"role": "user", "content": "<sd_cpp_extra_args>" * 40_000}]}).encode()
    streamed = json.dumps({"model": "tiny-chat", "stream": True, "prompt": "x" * 1000,
                           "messages": [{"role": "user", "content": "x" * 1000}]}).encode()
    json_type = {"Content-Type": "application/json"}
    return {
        "deep": (deep, json_type), "deep object": (deep_obj, json_type), "wide": (wide, json_type),
        "repetitive": (tags, json_type), "malformed": (b'{"model": "tiny-chat", "messages": [{', json_type),
        "streamed": (streamed, json_type),  # a streamed request: its send stands in a load-progress heartbeat
        "not utf-8": (b'{"model": "\xff\xfe"}', json_type),
        "compressed": (gzip.compress(b'{"model":"tiny-chat"}' + b" " * 10_000_000), json_type | {
            "Content-Encoding": "gzip"}),
        "multipart": (b'--b\r\nContent-Disposition: form-data; name="model"\r\n' + b"a\r\n" * 40_000,
                      {"Content-Type": "multipart/form-data; boundary=b"}),
    }


def test_hostile_bodies_on_every_route_end_in_a_clear_answer(armed, upstream):
    gw, keys = armed
    with control_loop() as control:
        hostile_bodies_on_every_route(gw, keys)
    lag = gw.gw.metrics.loop_lag
    # the event loop never stalled: the quadratic parser and the big JSON parses used to hold it for seconds
    # (beyond what the machine's load costs an idle loop in the same process, measured side by side)
    assert lag.n > 10 and lag.max < 0.5 + control.max, \
        f"the event loop stalled for {lag.max * 1000:.0f} ms (an idle loop: {control.max * 1000:.0f} ms)"
    assert lag.quantile(0.99) <= 0.05 + control.quantile(0.99), f"p99 loop lag over 50 ms: {lag.counts}"
    # the sample was drawn from the answered ones meanwhile (so its path was walked under that budget)
    db = gw.gw.credentials.database(gw.gw.stack.cfg)
    assert wait_until(lambda: db.query("SELECT COUNT(*) FROM podllama_samples")[0][0] > 0, timeout=10)


def hostile_bodies_on_every_route(gw, keys) -> None:
    bodies = hostile_bodies()
    statuses: dict[str, set[int]] = {name: set() for name in bodies}
    for method, path, access in routes(gw.gw.api):
        if method not in ("POST", "PUT", "PATCH") or (method, path) in WHOLE_PROCESS:
            continue
        who = keys["admin"] if access is Access.ADMIN else keys["full"]
        for name, (body, headers) in bodies.items():
            r = httpx.request(method, gw.url + path, content=body, headers=headers | who, timeout=20)
            assert not crashed(r.status_code), (method, path, name, r.status_code, r.text[:200])
            statuses[name].add(r.status_code)
            if name in ("deep", "deep object"):
                assert 400 <= r.status_code < 500, (method, path, name, r.status_code, r.text[:200])
        # too large for [gateway] max_body_mb (1 MiB here): refused by its length, before a byte of it
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {2 << 20}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in who.items()) + "\r\n").encode()
        answer = gw.raw(head, timeout=5)
        assert answer[9:12] in (b"413", b"401", b"404", b"405", b"422", b"400", b"501"), (method, path, answer[:100])
    assert statuses["compressed"] & {415}, "a compressed body is refused where a body is forwarded"
    # nothing is held afterwards: every upstream connection is idle or gone, nobody waits for one
    pools = gw.gw.proxy.client.pools.values()
    assert wait_until(lambda: all(p.slots == len(p.idle) and not p.waiters for p in pools), timeout=10)
    assert wait_until(lambda: not any(gw.gw.metrics.in_flight.values()), timeout=10)


def test_a_slow_body_is_cut_off_before_any_server_is_asked(gateway, upstream):
    """Kestrel's minimum data rate: a body that trickles is refused (408) once the grace period is over."""
    gw = gateway("min_body_rate = 50000\nbody_grace = 0.5\n")
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\n\r\n")
        sock.settimeout(0.1)
        answer, deadline = b"", time.monotonic() + 20
        while not answer and time.monotonic() < deadline:
            try:
                sock.sendall(b"x" * 100)
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
    assert answer.startswith(b"HTTP/1.1 408") and b"min_body_rate" in answer, answer[:200]
    assert not upstream.received("/v1/chat"), "nothing reached the server"


def test_a_client_that_never_reads_does_not_hold_the_server(gateway, upstream):
    """The answer is read from the server at once into the client's outbox: the server's only connection is
    free for others while the client reads nothing; after send_timeout the client is closed."""
    big = b'{"data":"' + b"z" * (6 << 20) + b'"}'

    async def large(ex) -> None:
        await ex.send(200, big)

    upstream.on("/big", large)
    gw = gateway("send_timeout = 1.5\n", servers=SERVERS.replace("args = { parallel = 2 }",
                                                                  "args = { parallel = 2, threads_http = 1 }"))
    sleepers = []
    for _ in range(3):  # three clients that ask and never read
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /servers/chat/big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sleepers.append(sock)
    assert wait_until(lambda: len(upstream.received("/big")) == 3, timeout=10)
    t0 = time.monotonic()
    r = gw.get("/servers/chat/props")  # the same server, one connection: free while the three read nothing
    assert r.status_code == 200 and time.monotonic() - t0 < 3
    # the slow clients are closed after send_timeout: their requests end (499) and nothing is in flight
    assert wait_until(lambda: gw.gw.metrics.requests.get(("passthrough", "chat", "499"), 0) == 3, timeout=15)
    assert not any(gw.gw.metrics.in_flight.values())
    for sock in sleepers:
        sock.close()


def test_a_client_far_behind_a_stream_stops_the_server_generating(gateway, upstream):
    """A stream that keeps coming to a client that reads nothing: past answer_buffer_mb the client is closed
    and so is the server's connection (llama-server stops and frees the slot)."""
    async def endless(ex) -> None:
        ex.writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        event = b"data: " + b"t" * 60000 + b"\n\n"
        for _ in range(2000):  # 120 MB, far more than the buffer
            ex.writer.write(b"%x\r\n%b\r\n" % (len(event), event))
            await ex.writer.drain()
        ex.keep_open = False

    upstream.on("/v1/chat/completions", endless)
    gw = gateway("answer_buffer_mb = 2\nsend_timeout = 60\n")
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = b'{"messages":[{"role":"user","content":"x"}],"stream":true}'
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    assert wait_until(lambda: len(upstream.received("/v1/chat")) == 1, timeout=10)
    assert wait_until(lambda: upstream.open_for("/v1/chat") == 0, timeout=15), "the server's connection was closed"
    assert wait_until(lambda: not any(gw.gw.metrics.in_flight.values()), timeout=10)
    sock.close()


@pytest.mark.parametrize("head, why", [
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n", b"exactly one Host"),
    (b"GET /health HTTP/1.1\r\n\r\n", b"exactly one Host"),
    (b"GET http://evil.example/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"differ"),
    (b"GET evil HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"Invalid HTTP request"),  # refused by the parser itself
])
def test_the_request_head_is_strict(gateway, head, why):
    gw = gateway()
    answer = gw.raw(head)
    assert answer.startswith(b"HTTP/1.1 400") and why in answer, answer[:200]
    # the same target in absolute form with a matching Host is fine (RFC 9112 3.2.2)
    port = str(gw.port).encode()
    ok = gw.raw(b"GET http://127.0.0.1:" + port + b"/health HTTP/1.1\r\nHost: 127.0.0.1:" + port + b"\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    assert gw.raw(b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200"), "HTTP/1.0 needs no Host"


def test_the_gateways_metrics_say_when_it_started_and_how_late_its_loop_runs(gateway):
    gw = gateway()
    assert wait_until(lambda: gw.gw.metrics.loop_lag.n > 0, timeout=10)
    r = gw.get("/metrics")
    assert r.status_code == 200 and int(r.headers["process-start-time-unix"]) == gw.gw.started
    assert "podllama_event_loop_lag_seconds_bucket{le=" in r.text and "podllama_event_loop_lag_max_seconds" in r.text


def test_a_dashboard_session_ends_with_its_key(armed):
    gw, keys = armed
    store = KeyStore(gw.gw.credentials.database(gw.gw.stack.cfg))
    secret = store.create(NewKey("ops", admin=True), gw.gw.stack.cfg)[1]
    assert gw.gw.requests.read_keys()
    login = gw.post("/ui/login", json={"key": secret})
    assert login.status_code == 200
    cookie = {"Cookie": f"podllama_session={login.cookies['podllama_session']}"}
    assert gw.get("/admin/keys", headers=cookie).status_code == 200
    store.revoke("ops")
    assert gw.gw.requests.read_keys()
    assert gw.get("/admin/keys", headers=cookie).status_code == 401, "the session outlived its key"


def test_a_stream_id_belongs_to_the_key_that_started_it(armed, upstream):
    gw, keys = armed
    r = gw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                headers=keys["full"] | {"X-Conversation-Id": "conv-a"})
    assert r.status_code == 200
    other = KeyStore(gw.gw.credentials.database(gw.gw.stack.cfg)).create(NewKey("other"), gw.gw.stack.cfg)[1]
    assert gw.gw.requests.read_keys()
    theirs = {"Authorization": f"Bearer {other}"}
    assert gw.get("/v1/stream?conv_id=conv-a", headers=theirs).status_code == 404
    assert gw.post("/v1/streams/lookup", json={"conversation_ids": ["conv-a"]}, headers=theirs).status_code == 404
    r = gw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                headers=theirs | {"X-Conversation-Id": "conv-a"})
    assert r.status_code == 409
    assert gw.get("/v1/stream?conv_id=conv-a", headers=keys["full"]).status_code == 200
    assert not upstream.received("/v1/streams/lookup")
    assert len([x for x in upstream.received("/v1/stream") if b"conv-a" in x.target]) == 1


def test_refusals_before_the_body_close_the_connection(gateway):
    gw = gateway("max_body_mb = 1\n")
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000000\r\n\r\n")
        answer = recv_all(sock, 5)
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()
