"""The guard, attacked in-process: Host (DNS rebinding), Origin (CSRF), CORS, keys before bodies, body caps."""

from __future__ import annotations

import httpx

CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}


def test_a_rebound_host_name_gets_421_on_every_route(gateway, upstream):
    gw = gateway()
    evil = {"Host": "attacker.example:8080"}
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("GET", "/admin/config"),
                         ("POST", "/v1/chat/completions"), ("GET", "/servers/chat/props"), ("GET", "/help")):
        r = httpx.request(method, gw.url + path, headers=evil | gw.admin, json=CHAT if method == "POST" else None)
        assert r.status_code == 421, (path, r.status_code)
        assert "allowed_hosts" in r.json()["error"]["message"]
    assert upstream.received("/v1/chat") == []  # nothing reached a server
    for host in (f"127.0.0.1:{gw.port}", f"localhost:{gw.port}", "[::1]"):
        assert gw.get("/health", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_let_a_named_host_in(gateway):
    gw = gateway('allowed_hosts = ["llm.lan"]')
    assert gw.get("/health", headers={"Host": "llm.lan:8080"}).status_code == 200
    assert gw.get("/health", headers={"Host": "llm.lan.attacker.example"}).status_code == 421


def test_a_cross_site_post_is_refused_before_it_reaches_anything(gateway, upstream):
    gw = gateway()
    evil = {"Origin": "http://attacker.example", "Content-Type": "text/plain"}
    r = gw.post("/v1/chat/completions", content=b'{"messages":[]}', headers=evil)
    assert r.status_code == 403 and "cors_origins" in r.json()["error"]["message"]
    r = gw.post("/admin/servers/chat/restart", headers=evil | gw.admin)  # even with the key (a browser could hold it)
    assert r.status_code == 403
    assert upstream.received("/v1/chat") == []
    # the gateway's own pages (same origin) may post
    same = gw.post("/v1/chat/completions", json=CHAT, headers={"Origin": gw.url})
    assert same.status_code == 200


def test_cors_is_the_gateways_own(gateway, upstream):
    async def with_cors(ex):
        await ex.send(200, b"{}", {"access-control-allow-origin": "*", "access-control-allow-credentials": "true"})

    upstream.on("/props", with_cors)
    gw = gateway()
    r = gw.get("/props", headers={"Origin": "http://attacker.example"})
    assert r.status_code == 200 and not any(k.startswith("access-control") for k in r.headers)
    preflight = httpx.options(gw.url + "/v1/chat/completions", headers={
        "Origin": "http://attacker.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403
    assert not [r for r in upstream.requests if r.method == "OPTIONS"]  # never passed on


def test_an_allowed_origin_gets_cors_headers(gateway):
    gw = gateway('cors_origins = ["http://localhost:3000"]')
    origin = {"Origin": "http://localhost:3000"}
    pre = httpx.options(gw.url + "/v1/chat/completions", headers=origin | {"Access-Control-Request-Method": "POST"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "authorization" in pre.headers["access-control-allow-headers"]
    r = gw.post("/v1/chat/completions", json=CHAT, headers=origin)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert gw.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://localhost:3001"}).status_code == 403


def test_the_admin_api_needs_its_key_even_from_loopback(gateway):
    gw = gateway()
    assert gw.get("/admin/config").status_code == 401
    assert gw.get("/admin/config", headers={"Authorization": "Bearer guess"}).status_code == 401
    ok = gw.get("/admin/config", headers=gw.admin)
    assert ok.status_code == 200 and ok.json()["servers"]["chat"]["model"] == "tiny.gguf"
    key_file = gw.gw.credentials.path("admin.key")
    assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.parent.stat().st_mode & 0o777 == 0o700


def test_401_comes_before_the_body_is_read(gateway):
    gw = gateway()
    head = (b"POST /admin/models/pull HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 300000000\r\n\r\n")
    answer = gw.raw(head, timeout=3)  # no body is ever sent: the answer must not wait for it
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_management_bodies_are_capped_before_parsing(gateway):
    gw = gateway()
    head = (b"PUT /admin/config HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + gw.admin["Authorization"].encode()
            + b"\r\nContent-Type: application/toml\r\nContent-Length: 300000000\r\n\r\n")
    answer = gw.raw(head, timeout=3)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    chunked = httpx.put(gw.url + "/admin/config", content=chunks(), headers=gw.admin, timeout=10)
    assert chunked.status_code == 413 and "management API" in chunked.json()["error"]["message"]


def test_inference_keys_apply_to_every_inference_route(gateway, upstream, monkeypatch):
    monkeypatch.setenv("PODLLAMA_API_KEYS", "sk-one,sk-two")
    gw = gateway()
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics"),
                         ("GET", "/servers/chat/props"), ("GET", "/props")):
        r = httpx.request(method, gw.url + path, json=CHAT if method == "POST" else None)
        assert r.status_code == 401, path
        ok = httpx.request(method, gw.url + path, json=CHAT if method == "POST" else None,
                           headers={"X-Api-Key": "sk-two"})
        assert ok.status_code == 200, path
    assert gw.get("/health").status_code == 200
    # the client's key stays at the gateway; the server gets the stack's own
    sent = upstream.received("/props")[-1].headers
    assert sent.get(b"x-api-key") is None
    assert sent[b"authorization"] == b"Bearer " + gw.gw.credentials.server_key().encode()
