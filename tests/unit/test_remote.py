"""Remote servers ([servers.X] url = …): routed and health-checked by the gateway in-process, with their own key,
in front of a second scripted upstream standing for a server on another machine."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from tests import scripted
from tests.helpers import wait_until
from tests.unit.conftest import SERVERS

CHAT = {"model": "big-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}


@pytest.fixture
def remote():
    up = scripted.Upstream()
    yield up
    up.stop()


def remote_servers(port: int, health: str = "/v1/models") -> str:
    return SERVERS + f"""
[servers.far]
url = "http://127.0.0.1:{port}"
alias = "big-model"
api_key_file = "far.key"
health = "{health}"
"""


def test_a_remote_server_gets_its_requests_with_its_own_key(gateway, upstream, remote, tmp_path):
    (tmp_path / "far.key").write_text("sk-far\n")
    gw = gateway(servers=remote_servers(remote.port))
    r = gw.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-podllama-server"] == "far"
    [req] = remote.received("/v1/chat/completions")
    assert req.headers[b"authorization"] == b"Bearer sk-far"  # its key, never the stack's server key
    assert json.loads(req.body)["model"] == "big-model"  # the name the client sent, unchanged
    assert not upstream.received("/v1/chat/completions")
    local = gw.post("/v1/chat/completions", json=CHAT | {"model": "tiny-chat"})
    assert local.headers["x-podllama-server"] == "chat"
    assert upstream.received("/v1/chat/completions")[0].headers[b"authorization"] != b"Bearer sk-far"
    models = {m["id"]: m for m in gw.get("/v1/models").json()["data"]}
    assert models["big-model"]["server"] == "far" and models["big-model"]["status"]["value"] == "loaded"
    assert "big-model" in {m.model for m in ollama.Client(host=gw.url).list().models}


def test_a_remote_server_is_health_checked_on_its_own_path(gateway, upstream, remote, tmp_path):
    (tmp_path / "far.key").write_text("sk-far\n")
    gw = gateway(servers=remote_servers(remote.port))
    assert wait_until(lambda: len(remote.received("/v1/models")) >= 2, 5)  # probed every round
    assert all(r.headers[b"authorization"] == b"Bearer sk-far" for r in remote.received("/v1/models"))
    assert not remote.received("/health")
    remote.on("/v1/models", scripted.json_reply({"error": "loading"}, 503))
    assert wait_until(lambda: gw.get("/v1/models").json()["data"][2]["status"]["value"] == "loading", 5)


def test_a_remote_server_that_stops_answering_is_refused_at_once_naming_it(gateway, upstream, remote, tmp_path):
    (tmp_path / "far.key").write_text("sk-far\n")
    gw = gateway(servers=remote_servers(remote.port))
    remote.stop()
    far = f"http://127.0.0.1:{remote.port}"
    assert wait_until(lambda: gw.get("/v1/models").json()["data"][2]["status"]["value"] == "unloaded", 5)
    r = gw.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and far in r.json()["error"]["message"]
    assert gw.post("/v1/chat/completions", json=CHAT | {"model": "tiny-chat"}).status_code == 200


def test_a_remote_server_cannot_be_started_or_stopped_from_here(gateway, remote, tmp_path):
    (tmp_path / "far.key").write_text("sk-far\n")
    gw = gateway(servers=remote_servers(remote.port))
    r = httpx.post(f"{gw.url}/admin/servers/far/restart", headers=gw.admin, timeout=10)
    assert r.status_code == 409 and "remote" in r.json()["error"]["message"]
    listed = {s["name"] for s in httpx.get(f"{gw.url}/admin/servers", headers=gw.admin, timeout=10).json()}
    assert listed == {"chat", "embed", "far"}


def test_a_changed_key_file_is_used_without_a_restart_and_an_unreadable_one_is_refused(gateway, remote, tmp_path):
    key = tmp_path / "far.key"
    key.write_text("sk-far\n")
    gw = gateway(servers=remote_servers(remote.port))
    key.write_text("sk-new\n")
    assert wait_until(lambda: gw.post("/v1/chat/completions", json=CHAT).status_code == 200 and
                      remote.received("/v1/chat/completions")[-1].headers[b"authorization"] == b"Bearer sk-new", 5)
    key.unlink()
    reload = httpx.post(f"{gw.url}/admin/reload", headers=gw.admin, timeout=10).json()
    assert "far.key" in reload["error"]  # reported; the running config (and key) stay
    gw.post("/v1/chat/completions", json=CHAT)
    assert remote.received("/v1/chat/completions")[-1].headers[b"authorization"] == b"Bearer sk-new"


def test_a_remote_server_on_an_ipv6_address_is_probed_there():
    """url = "http://[::1]:PORT" is accepted by the config, so the probes must reach it (status and the gateway's
    first look use health.probe; the address a replica is reached at keeps its brackets)."""
    import http.server
    import socket
    import threading

    from podllama.engine import health
    from podllama.gateway.routing.servers import Replica

    class V6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = V6(("::1", 0), Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        assert health.probe(f"http://[::1]:{port}", path="/v1/models") == "ok"
        assert health.probe(Replica("far", "remote:far", "::1", port).url, path="/v1/models") == "ok"
    finally:
        srv.shutdown()
