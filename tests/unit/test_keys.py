"""Keys made in the stack's database, against the gateway in-process and a scripted upstream: stored only as
hashes, scopes (403), each limit (429 with Retry-After, then let in again), revocation, expiry; the request log
with the token counts the server reported; the database itself (migrations, URLs)."""

from __future__ import annotations

import gzip
import json
import sqlite3
import time

import httpx
import pytest

from podllama import config
from podllama.access.database import LATEST, Database, DatabaseError
from podllama.access.keys import KeyProblem, KeyStore, NewKey
from podllama.access.usage import since_of, summary
from podllama.gateway.routing.servers import Lineage
from podllama.validate import database_url as check_url
from podllama.validate import url_shown as shown
from tests.helpers import wait_until
from tests.scripted import sse

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
USAGE = {"choices": [{"message": {"content": "hi"}}], "usage": {"completion_tokens": 7, "prompt_tokens": 11,
                                                                 "total_tokens": 18, "prompt_tokens_details": {
                                                                     "cached_tokens": 99}}}


def store_of(gw) -> KeyStore:
    return KeyStore(gw.gw.credentials.database(gw.gw.stack.cfg))


def key(gw, name: str, **kw) -> dict[str, str]:
    _, secret = store_of(gw).create(NewKey(name, **kw), gw.gw.stack.cfg)
    assert gw.gw.requests.read_keys()  # what the gateway's own thread does every 2 s
    return {"Authorization": f"Bearer {secret}"}


def usage_reply(body: dict):
    async def reply(ex) -> None:
        await ex.send(200, json.dumps(body).encode())
    return reply


def test_a_key_is_kept_only_as_its_hash(tmp_path):
    db = Database.of_stack(None, tmp_path)
    made, secret = KeyStore(db).create(NewKey("alice", rpm=5))
    db.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("podllama.db"))
    assert secret.encode() not in raw and secret[10:30].encode() not in raw
    assert made.prefix.encode() in raw  # what tells keys apart in a list
    assert oct((tmp_path / "podllama.db").stat().st_mode & 0o777) == "0o600"
    listed = KeyStore(Database.of_stack(None, tmp_path)).list()
    assert [k.name for k in listed] == ["alice"] and listed[0].rpm == 5
    assert secret not in json.dumps(listed[0].public())


def test_keys_are_checked_before_anything_is_written(tmp_path):
    path = tmp_path / "services.toml"
    path.write_text('[servers.chat]\nmodel = "tiny.gguf"\nalias = "tiny-chat"\n')
    cfg = config.load(path)
    keys = KeyStore(Database.of_stack(None, tmp_path))
    for new, words in ((NewKey("Bad Name"), "key name"), (NewKey("a", servers=["nope"]), "no server named nope"),
                       (NewKey("a", roles=["rerank"]), "no server has role rerank"),
                       (NewKey("a", models=["gpt-4"]), "no model gpt-4"), (NewKey("a", rpm=0), "--rpm"),
                       (NewKey("a", expires="2001-01-01"), "in the past"), (NewKey("a", expires="soon"), "not a date")):
        with pytest.raises(KeyProblem, match=words):
            keys.create(new, cfg)
    assert keys.list() == []
    keys.create(NewKey("a", models=["tiny-chat"]), cfg)
    with pytest.raises(KeyProblem, match="already"):
        keys.create(NewKey("a"), cfg)
    with pytest.raises(KeyProblem, match="no active key"):
        keys.revoke("b")


def test_the_schema_is_made_once_and_a_newer_one_is_refused(tmp_path):
    db = Database.of_stack(None, tmp_path)
    assert db.version() == LATEST
    db.close()
    again = Database.of_stack(None, tmp_path)
    assert again.query("SELECT COUNT(*) FROM podllama_schema") == [(LATEST,)]
    again.execute("INSERT INTO podllama_schema (version) VALUES (?)", (LATEST + 1,))
    again.close()
    with pytest.raises(DatabaseError, match="newer than this podllama"):
        Database.of_stack(None, tmp_path).version()


def test_database_urls_are_checked_and_passwords_never_shown(tmp_path):
    for bad in ("mysql://x/y", "sqlite://relative.db", "postgresql:///nohost", "/var/lib/x.db"):
        with pytest.raises(ValueError):
            check_url(bad)
    assert shown("postgresql://podllama:s3cret@db.lan:5432/podllama") == "postgresql://podllama:***@db.lan:5432/podllama"
    with pytest.raises(DatabaseError) as e:  # nothing listens there
        Database("postgresql://u:s3cret@127.0.0.1:9/db").version()
    assert "s3cret" not in str(e.value) and "127.0.0.1" in str(e.value)
    (tmp_path / "services.toml").write_text('[gateway]\ndatabase = "mysql://x"\n')
    with pytest.raises(config.ConfigError, match="database"):
        config.load(tmp_path / "services.toml")


def test_the_first_key_closes_inference_and_a_scope_holds(gateway, upstream):
    gw = gateway()
    assert gw.post("/v1/chat/completions", json=CHAT).status_code == 200  # no key anywhere: open
    embed_only = key(gw, "embedder", roles=["embedding"])
    assert gw.post("/v1/chat/completions", json=CHAT).status_code == 401
    r = gw.post("/v1/chat/completions", json=CHAT, headers=embed_only)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert "may not use role 'chat'" in r.json()["error"]["message"]
    assert gw.post("/v1/embeddings", json={"input": "x"}, headers=embed_only).status_code == 200
    r = gw.get("/servers/chat/props", headers=embed_only)  # the passthrough is scoped too
    assert r.status_code == 403
    assert len(upstream.received("/v1/chat")) == 1 and not upstream.received("/props")  # the one before the key
    # not an admin key
    assert gw.get("/admin/servers", headers=embed_only).status_code == 401
    boss = key(gw, "boss", admin=True)
    assert gw.get("/admin/keys", headers=boss).status_code == 200
    models = {m["id"] for m in gw.get("/v1/models", headers=embed_only).json()["data"]}
    assert models == {"tiny-embed"}  # a scoped key sees only what it may use


def test_requests_per_minute_then_let_in_again(gateway, upstream):
    gw = gateway()
    h = key(gw, "slow", rpm=2)
    assert [gw.post("/v1/chat/completions", json=CHAT, headers=h).status_code for _ in range(2)] == [200, 200]
    r = gw.post("/v1/chat/completions", json=CHAT, headers=h)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert "rpm 2" in r.json()["error"]["message"] and 1 <= int(r.headers["retry-after"]) <= 60
    assert len(upstream.received("/v1/chat")) == 2
    # the window slides: requests older than a minute no longer count
    for use in gw.gw.proxy.quota.windows[store_of(gw).list()[0].id].uses:
        use.at -= 61
    assert gw.post("/v1/chat/completions", json=CHAT, headers=h).status_code == 200


def test_tokens_per_minute_count_what_the_server_reported(gateway, upstream):
    upstream.on("/v1/chat/completions", usage_reply(USAGE))
    gw = gateway()
    h = key(gw, "tokens", tpm=30)
    assert [gw.post("/v1/chat/completions", json=CHAT, headers=h).status_code for _ in range(2)] == [200, 200]
    r = gw.post("/v1/chat/completions", json=CHAT, headers=h)  # 36 tokens used, 30 allowed
    assert r.status_code == 429 and "36 tokens" in r.json()["error"]["message"]


def test_concurrency_refuses_the_request_beyond_the_limit(gateway, upstream):
    upstream.on("/v1/chat/completions", sse(events=8, gap=0.25))
    gw = gateway()
    h = key(gw, "one-at-a-time", concurrency=1)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=CHAT, headers=h, timeout=10) as first:
        assert first.status_code == 200
        second = gw.post("/v1/chat/completions", json=CHAT, headers=h)
        assert second.status_code == 429 and "concurrency 1" in second.json()["error"]["message"]
        assert second.headers["retry-after"] == "1"
        first.read()
    assert gw.post("/v1/chat/completions", json=CHAT, headers=h).status_code == 200


def test_a_revoked_or_expired_key_is_refused(gateway):
    gw = gateway()
    h = key(gw, "temp")
    key(gw, "other")
    assert gw.post("/v1/chat/completions", json=CHAT, headers=h).status_code == 200
    r = httpx.delete(gw.url + "/admin/keys/temp", headers=gw.admin)
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    assert gw.post("/v1/chat/completions", json=CHAT, headers=h).status_code == 401
    h2 = key(gw, "brief", expires="2099-01-01")
    db = gw.gw.credentials.database(gw.gw.stack.cfg)
    db.execute("UPDATE podllama_keys SET expires = ? WHERE name = 'brief'", (time.time() - 1,))
    assert gw.gw.requests.read_keys()
    assert gw.post("/v1/chat/completions", json=CHAT, headers=h2).status_code == 401
    # with every key revoked or expired, the gateway stays closed: revoking never opens it
    assert httpx.delete(gw.url + "/admin/keys/other", headers=gw.admin).status_code == 200
    assert gw.gw.keys.stored == {}
    assert gw.post("/v1/chat/completions", json=CHAT).status_code == 401


def test_keys_over_the_management_api(gateway):
    gw = gateway()
    r = gw.post("/admin/keys", json={"name": "ci", "models": ["tiny-embed"], "rpm": 10}, headers=gw.admin)
    assert r.status_code == 201 and r.json()["key"].startswith("pk-") and r.json()["rpm"] == 10
    secret = r.json()["key"]
    listed = httpx.get(gw.url + "/admin/keys", headers=gw.admin).json()
    assert [k["name"] for k in listed] == ["ci"] and "key" not in listed[0] and secret not in json.dumps(listed)
    assert gw.post("/v1/embeddings", json={"input": "x"}, headers={"X-Api-Key": secret}).status_code == 200
    bad = gw.post("/admin/keys", json={"name": "x", "servers": ["nope"]}, headers=gw.admin)
    assert bad.status_code == 400 and "no server named nope" in bad.json()["error"]["message"]


def test_the_request_log_holds_who_what_and_the_tokens_reported(gateway, upstream):
    upstream.on("/v1/chat/completions", usage_reply(USAGE))
    upstream.on("/completion", sse(events=5, gap=0.01))
    gw = gateway()
    h = key(gw, "logged")
    assert gw.post("/v1/chat/completions", json=CHAT, headers=h).status_code == 200
    assert gw.post("/completion", json={"prompt": "x", "stream": True}, headers=h).status_code == 200
    assert gw.post("/v1/chat/completions", json=CHAT).status_code == 401  # not forwarded: not logged
    log = gw.gw.requests
    assert wait_until(lambda: log.written == 2, 10), (log.written, log.error)
    rows = httpx.get(gw.url + "/admin/requests", headers=gw.admin).json()["requests"]
    chat = next(r for r in rows if r["route"] == "chat.completions")
    assert (chat["key"], chat["model"], chat["status"], chat["prompt_tokens"], chat["completion_tokens"]) == \
        ("logged", "tiny-chat", 200, 11, 7)
    assert chat["bytes_in"] == len(httpx.Request("POST", gw.url, json=CHAT).content)
    assert chat["bytes_out"] == len(json.dumps(USAGE).encode()) and chat["ttft"] is not None
    streamed = next(r for r in rows if r["route"] == "completions.native")
    assert streamed["completion_tokens"] == 5 and streamed["prompt_tokens"] is None  # counted in the stream
    db = gw.gw.credentials.database(gw.gw.stack.cfg)
    assert db.query("SELECT request_body FROM podllama_requests") == [(None,), (None,)]  # bodies: off
    by_key = summary(db, "key", since_of("1h"))
    assert by_key[0]["key"] == "logged" and by_key[0]["requests"] == 2 and by_key[0]["prompt_tokens"] == 11
    metrics = gw.get("/metrics", headers=h).text
    assert 'podllama_tokens_total{key="logged",model="tiny-chat",type="prompt"} 11' in metrics
    assert 'podllama_request_log_rows_total{state="written"} 2' in metrics


def test_limits_hold_across_a_gateway_restart(gateway, upstream):
    gw = gateway()
    h = key(gw, "steady", rpm=2)
    for _ in range(2):
        assert gw.post("/v1/chat/completions", json=CHAT, headers=h).status_code == 200
    assert wait_until(lambda: gw.gw.requests.written == 2, 10)
    again = gateway()  # a new gateway on the same stack (its state directory, its database)
    assert again.post("/v1/chat/completions", json=CHAT, headers=h).status_code == 429


def test_a_database_that_fails_loses_no_request_and_no_row(gateway, upstream):
    gw = gateway()
    h = key(gw, "busy")
    path = gw.gw.stack.cfg.state_path / "podllama.db"
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the database cannot be written now
    try:
        codes = [gw.post("/v1/chat/completions", json=CHAT, headers=h).status_code for _ in range(20)]
        assert codes == [200] * 20  # requests do not wait for the log
        assert wait_until(lambda: gw.gw.requests.error is not None, 20)
        assert gw.gw.requests.written == 0 and gw.gw.requests.waiting == 20
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert wait_until(lambda: gw.gw.requests.written == 20, 20)
    assert gw.gw.requests.dropped == 0 and gw.gw.requests.error is None


def test_switching_api_does_not_dodge_a_token_limit(gateway, upstream):
    """Anthropic's, the Responses API's and a compressed answer's tokens count against tpm as chat's do."""
    upstream.on("/v1/messages", usage_reply({"type": "message", "usage": {"input_tokens": 3, "output_tokens": 5}}))
    upstream.on("/v1/responses", usage_reply({"object": "response", "usage": {"input_tokens": 3, "output_tokens": 5}}))

    async def compressed(ex) -> None:
        body = gzip.compress(json.dumps(USAGE).encode())
        ex.writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
                        b"content-length: %d\r\n\r\n%b" % (len(body), body))
        await ex.writer.drain()

    upstream.on("/v1/chat/completions", compressed)
    gw = gateway()
    h = key(gw, "switcher", tpm=40)
    assert gw.post("/v1/messages", json=CHAT, headers=h).status_code == 200
    assert gw.post("/v1/responses", json=CHAT, headers=h).status_code == 200
    assert gw.post("/v1/chat/completions", json=CHAT, headers=h).status_code == 200  # 18 more: 34 in all
    r = gw.post("/v1/messages", json=CHAT, headers=h)
    assert r.status_code == 200
    r = gw.post("/v1/messages", json=CHAT, headers=h)  # 42 used, 40 allowed
    assert r.status_code == 429 and "42 tokens" in r.json()["error"]["message"], r.text
    text = gw.get("/metrics", headers=gw.admin).text
    assert 'podllama_tokens_total{key="switcher",model="tiny-chat",type="prompt"} 20' in text, text


def test_every_answer_is_logged_with_the_build_that_gave_it(gateway, upstream):
    """Refusals before a server was chosen (413, 501) are rows too, counted against the key; an answered request
    names the image, llama.cpp commit, model file and settings of the replica that answered it, and
    /admin/requests?commit= finds the requests a build served."""
    upstream.on("/v1/chat/completions", usage_reply(USAGE))
    commit = "0c1e57098bba" + "0" * 28
    gw = gateway("max_body_mb = 1", lineage=Lineage("sha256:abc", commit, "e" * 64, "cfg123"))
    h = key(gw, "counted")
    assert gw.post("/v1/chat/completions", json=CHAT, headers=h).status_code == 200
    big = gw.raw(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {h['Authorization']}\r\n"
                 "Content-Length: 5000000\r\n\r\n".encode(), 3)
    assert big.startswith(b"HTTP/1.1 413")
    assert gw.post("/v1/audio/speech", json={"input": "x"}, headers=h).status_code == 501  # no speech server
    log = gw.gw.requests
    assert wait_until(lambda: log.written == 3, 10), (log.written, log.error)
    served = httpx.get(gw.url + "/admin/requests", params={"commit": commit[:8]}, headers=gw.admin).json()
    assert [(r["status"], r["image"], r["model_sha256"], r["config_hash"]) for r in served["requests"]] == [
        (200, "sha256:abc", "e" * 64, "cfg123")]
    every = httpx.get(gw.url + "/admin/requests", headers=gw.admin).json()["requests"]
    assert sorted(r["status"] for r in every) == [200, 413, 501] and {r["key"] for r in every} == {"counted"}
    by_build = httpx.get(gw.url + "/admin/usage", params={"by": "build", "since": "1h"}, headers=gw.admin).json()
    assert {r["build"]: r["requests"] for r in by_build} == {commit: 1, "-": 2}
    assert served["log"]["bytes"] > 0 and served["log"]["retention"]["log_days"] == 30
    bad = httpx.get(gw.url + "/admin/requests", params={"commit": "x' OR 1=1 --"}, headers=gw.admin)
    assert bad.status_code == 422 and "hex digits" in bad.json()["error"]["message"]
