"""A shared stack on real llama-servers, with its keys and request log in SQLite and in a real Postgres: keys
made by the CLI, their scopes, each limit (429, then let in again), the log's token counts equal to what
llama-server reported, `podllama usage`, and a database stopped under load that loses no request and no row."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from podllama.access.database import Database, DatabaseError
from tests.helpers import wait_until

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8}


@pytest.fixture(params=["sqlite", "postgres"])
def shared(request, podman, stack_files):
    extra = ""
    if request.param == "postgres":
        extra = f'database = "{request.getfixturevalue("postgres").url}"\n'
    sf = stack_files(podman)
    sf.path.write_text(sf.path.read_text().replace("[gateway]\n", "[gateway]\n" + extra, 1))
    sf.run("start")
    sf.url = f"http://127.0.0.1:{sf.port}"
    sf.db = Database.of_stack(request.param == "postgres" and sf.config().gateway.database or None,
                              sf.config().state_path)
    yield sf
    sf.db.close()


def make_key(sf, *args: str) -> tuple[str, dict[str, str]]:
    made = json.loads(sf.run("keys", "create", *args, "--json").stdout)
    return made["id"], {"Authorization": f"Bearer {made['key']}"}


def taken(url: str, headers: dict[str, str]) -> bool:
    """The gateway has read the key: it gets in, and no key does not (the database may hold other keys already)."""
    return wait_until(lambda: httpx.get(f"{url}/v1/models").status_code == 401 and
                      httpx.get(f"{url}/v1/models", headers=headers).status_code == 200, 10)


def logged(sf, key_id: str) -> list[tuple]:
    return sf.db.query("SELECT route, status, prompt_tokens, completion_tokens FROM podllama_requests "
                       "WHERE key_id = ? ORDER BY ts", (key_id,))


def test_keys_scopes_limits_and_the_log_on_real_servers(shared):
    sf, url = shared, shared.url
    alice_id, alice = make_key(sf, "alice", "--models", "tiny-chat", "--rpm", "4")
    _, budget = make_key(sf, "budget", "--tpm", "20")  # the prompt alone is more
    assert taken(url, alice) and taken(url, budget)
    # tokens per minute: let in while under, refused once over (and let in again below, a minute later)
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"max_tokens": 48}, headers=budget,
                      timeout=60).status_code == 200
    over_tokens = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=budget)
    assert over_tokens.status_code == 429 and "tpm 20" in over_tokens.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 401  # a key exists: no key, no entry
    # the log holds the token counts llama-server reported, streamed or not
    plain = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=alice, timeout=60)
    assert plain.status_code == 200
    usage = plain.json()["usage"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=CHAT | {"stream": True}, headers=alice,
                      timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    timings = next(e["timings"] for e in reversed(events) if "timings" in e)
    # out of scope: refused before a server sees it
    r = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, headers=alice)
    assert r.status_code == 403 and "may not use model 'tiny-embed'" in r.json()["error"]["message"]
    assert [m["id"] for m in httpx.get(f"{url}/v1/models", headers=alice).json()["data"]] == ["tiny-chat"]
    # the fourth request let in this minute is the last (a refused one does not count); the fifth waits
    for _ in range(2):
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=alice, timeout=60).status_code == 200
    over = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=alice)
    assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limit_error"
    wait = int(over.headers["retry-after"])
    assert 1 <= wait <= 60
    assert wait_until(lambda: len(logged(sf, alice_id)) == 6, 15)
    rows = logged(sf, alice_id)
    assert rows[0] == ("chat.completions", 200, usage["prompt_tokens"], usage["completion_tokens"])
    assert rows[1] == ("chat.completions", 200, timings["prompt_n"], timings["predicted_n"])
    assert [r[1] for r in rows[2:]] == [403, 200, 200, 429]
    report = json.loads(sf.run("usage", "--by", "key", "--json").stdout)
    mine = next(r for r in report if r["key"] == "alice")
    assert mine["requests"] == 6 and mine["errors"] == 2
    assert mine["prompt_tokens"] == usage["prompt_tokens"] + timings["prompt_n"] + rows[3][2] + rows[4][2]
    metrics = httpx.get(f"{url}/metrics", headers=alice).text
    assert f'podllama_tokens_total{{key="alice",model="tiny-chat",type="prompt"}} {mine["prompt_tokens"]}' in metrics
    time.sleep(wait)  # the minute of alice's first request is over, and of budget's tokens before it
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=alice, timeout=60).status_code == 200
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=budget, timeout=60).status_code == 200
    # requests at once: the first is under way — its answer (about 10 MB of vectors) not yet taken by a client
    # that reads nothing — when the second comes
    _, single = make_key(sf, "single", "--concurrency", "1")
    assert taken(url, single)
    big = json.dumps({"model": "tiny-embed", "input": ["hello there"] * 8000}).encode()
    with socket.create_connection(("127.0.0.1", sf.port)) as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"%b: %b\r\nContent-Length: %d\r\n\r\n%b" % (b"Authorization", single["Authorization"].encode(),
                                                                     len(big), big))
        in_flight = 'podllama_requests_in_flight{endpoint="embeddings.oai",server="embed"} 1'
        assert wait_until(lambda: in_flight in httpx.get(f"{url}/metrics", headers=sf.admin).text, 30)
        second = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=single)
        assert second.status_code == 429, "a second request while the first is under way should be refused"
        assert "concurrency 1" in second.json()["error"]["message"]
        assert second.headers["retry-after"] == "1"
    # the reader left: its request ends, and the key may send again
    assert wait_until(lambda: in_flight not in httpx.get(f"{url}/metrics", headers=sf.admin).text, 30)
    # a request still sending its body holds nothing yet (it is received whole first): not the key's concurrency
    body, go_on = json.dumps(CHAT).encode(), threading.Event()

    def slowly():
        yield body[:10]
        go_on.wait(30)
        yield body[10:]

    first: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: first.append(httpx.post(
        f"{url}/v1/chat/completions", content=slowly(), headers=single | {"Content-Type": "application/json"},
        timeout=60)))
    sender.start()
    try:
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=single).status_code == 200
    finally:
        go_on.set()
        sender.join(60)
    assert first[0].status_code == 200
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=single, timeout=60).status_code == 200
    # revoked from the CLI: refused within the gateway's next look at the database
    sf.run("keys", "revoke", "alice")
    assert wait_until(lambda: httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=alice).status_code == 401, 10)


def test_a_database_stopped_under_load_loses_no_request_and_no_row(podman, stack_files, postgres):
    sf = stack_files(podman)
    sf.path.write_text(sf.path.read_text().replace("[gateway]\n", f'[gateway]\ndatabase = "{postgres.url}"\n', 1))
    sf.run("start")
    url = f"http://127.0.0.1:{sf.port}"
    key_id, h = make_key(sf, "load")
    assert taken(url, h)
    db = Database(postgres.url)
    before = db.query("SELECT COUNT(*) FROM podllama_requests WHERE key_id = ?", (key_id,))[0][0]
    codes: list[int] = []
    stop = threading.Event()

    def one(_: int) -> int:
        return httpx.post(f"{url}/v1/embeddings", json={"input": "hello"}, headers=h, timeout=60).status_code

    def load() -> None:
        with ThreadPoolExecutor(4) as pool:
            while not stop.is_set():
                codes.extend(pool.map(one, range(8)))

    runner = threading.Thread(target=load)
    runner.start()
    try:
        assert wait_until(lambda: len(codes) >= 16, 60)
        postgres.stop()
        down_at = len(codes)
        assert wait_until(lambda: len(codes) >= down_at + 24, 60)  # served while the database is down
        with sf.api() as api:
            state = wait_until(lambda: 'state="waiting"} 0' not in api.get("/metrics").text, 15)
            assert state, [line for line in api.get("/metrics").text.splitlines() if "request_log" in line]
        postgres.start()
        time.sleep(1)
    finally:
        stop.set()
        runner.join(120)
    assert codes and set(codes) == {200}, sorted(set(codes))

    def rows() -> int:
        try:
            return int(db.query("SELECT COUNT(*) FROM podllama_requests WHERE key_id = ?", (key_id,))[0][0])
        except DatabaseError:  # this test's own connection was cut by the restart: made again next time
            return -1

    assert wait_until(lambda: rows() - before == len(codes), 30), (rows() - before, len(codes))
    with sf.api() as api:
        metrics = api.get("/metrics").text
    assert 'podllama_request_log_rows_total{state="dropped"} 0' in metrics
    db.close()
