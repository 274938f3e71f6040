"""The gateway container in front of real llama-servers: SDKs, every kind of endpoint, routing, streaming,
cancellation, the management API, /help, metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time

import anthropic
import httpx
import ollama
import openai
import pytest

from podllama.gateway.routing.routes import ENDPOINTS
from tests.helpers import stack_name, wait_until
from tests.integration.conftest import StackFiles, free_port

STACK = stack_name("ptgw")
SERVERS = """
[gateway.defaults]
chat = "chat"

[servers.chat]
role = "chat"
model = "tiny.gguf"
alias = "tiny-chat"
ctx_size = 32768
args = { parallel = 2 }

[servers.chat2]
role = "chat"
model = "tiny.gguf"
alias = "tiny-chat-2"
ctx_size = 16384
replicas = 2
args = { parallel = 1 }

[servers.embed]
role = "embedding"
model = "tiny.gguf"
alias = "tiny-embed"
ctx_size = 512
args = { pooling = "mean" }

[servers.rerank]
role = "rerank"
model = "tiny.gguf"
alias = "tiny-rerank"
ctx_size = 512
"""


@pytest.fixture(scope="module")
def gw(podman, models_dir, cpu_image, tmp_path_factory):
    d = tmp_path_factory.mktemp("gateway-stack")
    sf = StackFiles(d, STACK, podman, models_dir, free_port()).write(SERVERS)
    sf.run("start")
    sf.url = f"http://127.0.0.1:{sf.port}"
    yield sf
    sf.run("down", check=False)


def post(gw, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", timeout=60, **kw)


def slots_busy(gw, server: str = "chat") -> bool:
    slots = httpx.get(f"{gw.url}/slots?server={server}", timeout=10).json()
    return any(s["is_processing"] for s in slots)


# -- clients: the OpenAI and Anthropic SDKs ----------------------------------------------------------------------
def test_openai_sdk_chat_completions_embeddings_models(gw):
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused")
    chat = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 5
    stream = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 5
    legacy = client.completions.create(model="tiny-chat", prompt="Once upon", max_tokens=4)
    assert legacy.choices[0].text and legacy.usage.completion_tokens == 4
    legacy_stream = list(client.completions.create(model="tiny-chat", prompt="Once", max_tokens=4, stream=True))
    assert sum(1 for c in legacy_stream if c.choices and c.choices[0].text) >= 3
    emb = client.embeddings.create(model="tiny-embed", input=["a", "b c"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny-chat", "tiny-chat-2", "tiny-embed", "tiny-rerank"}
    extra = models["tiny-embed"].model_extra
    assert extra["role"] == "embedding" and extra["server"] == "embed" and extra["status"] == {"value": "loaded"}
    assert "embedding" in extra["capabilities"] and models["tiny-chat"].owned_by == "podllama"


def test_ollama_client_lists_shows_chats_generates_and_embeds(gw):
    """Ollama's own Python client, pointed at the gateway's root URL, on real llama-servers."""
    client = ollama.Client(host=gw.url, timeout=60)
    models = {m.model: m for m in client.list().models}
    assert {"tiny-chat", "tiny-chat-2", "tiny-embed"} <= set(models) and "tiny-rerank" not in models
    assert models["tiny-chat"].details.format == "gguf" and models["tiny-chat"].size > 0
    assert client.show("tiny-chat").capabilities == ["completion"]
    assert "tiny-chat" in {m.model for m in client.ps().models}
    whole = client.chat(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], stream=False,
                        options={"num_predict": 4, "temperature": 0})
    assert whole.done and whole.message.content and whole.eval_count == 4 and whole.prompt_eval_count > 0
    parts = list(client.chat(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], stream=True,
                             options={"num_predict": 4, "temperature": 0}))
    assert parts[-1].done and parts[-1].eval_count == 4 and len(parts) >= 3
    assert "".join(p.message.content for p in parts) == whole.message.content  # same greedy answer, streamed
    gen = client.generate(model="tiny-chat:latest", prompt="Once upon", raw=True, stream=False,
                          options={"num_predict": 3})
    assert gen.done and gen.response and gen.eval_count == 3
    emb = client.embed(model="tiny-embed", input=["hello", "world"])
    assert len(emb.embeddings) == 2 and len(emb.embeddings[0]) == 64 and emb.embeddings[0] != emb.embeddings[1]


def test_anthropic_sdk_messages(gw):
    client = anthropic.Anthropic(base_url=gw.url, api_key="unused")
    msg = client.messages.create(model="tiny-chat", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert msg.content[0].text and msg.usage.output_tokens == 5
    with client.messages.stream(model="tiny-chat", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]) as s:
        text = "".join(s.text_stream)
    assert text
    count = post(gw, "/v1/messages/count_tokens", json={"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}]})
    assert count.status_code == 200 and count.json()["input_tokens"] > 0


# -- every kind of endpoint ---------------------------------------------------------------------------------
def test_rerank_all_aliases(gw):
    for path in ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking"):
        r = post(gw, path, json={"query": "a", "documents": ["x", "y z"]})
        assert r.status_code == 200 and len(r.json()["results"]) == 2, (path, r.text)
        assert r.headers["x-podllama-server"] == "rerank"


def test_tokens_templates_props_slots(gw):
    tokens = post(gw, "/tokenize", json={"content": "hello world"}).json()["tokens"]
    assert tokens and post(gw, "/detokenize", json={"tokens": tokens}).json()["content"].strip() == "hello world"
    prompt = post(gw, "/apply-template", json={"messages": [{"role": "user", "content": "hey"}]}).json()["prompt"]
    assert "<|im_start|>user\nhey" in prompt
    props = httpx.get(f"{gw.url}/props").json()
    assert props["total_slots"] == 2  # the chat default
    embed_props = httpx.get(f"{gw.url}/props?server=embed")
    assert embed_props.headers["x-podllama-server"] == "embed" and embed_props.json()["total_slots"] >= 1
    by_model = httpx.get(f"{gw.url}/props?model=tiny-chat-2")
    assert by_model.headers["x-podllama-server"] == "chat2" and by_model.json()["total_slots"] == 1
    slots = httpx.get(f"{gw.url}/slots?server=chat").json()
    assert len(slots) == 2 and {"id", "is_processing"} <= set(slots[0])
    assert httpx.get(f"{gw.url}/props?server=nope").status_code == 404


def test_metrics_of_the_gateway_and_of_one_server(gw):
    post(gw, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    own = httpx.get(f"{gw.url}/metrics").text
    assert 'podllama_requests_total{endpoint="chat.completions",server="chat",status="200"}' in own
    assert "podllama_time_to_first_byte_seconds_bucket" in own and "podllama_requests_in_flight" in own
    server = httpx.get(f"{gw.url}/metrics?server=chat")
    assert server.headers["x-podllama-server"] == "chat" and "llamacpp:prompt_tokens_total" in server.text


def test_infill_and_transcriptions_fail_clearly(gw):
    infill = post(gw, "/infill", json={"input_prefix": "def f(", "input_suffix": "):"})
    # the tiny model has no fill-in-the-middle tokens: llama-server's own clear error, passed through unchanged
    assert infill.status_code == 501 and infill.headers["x-podllama-server"] == "chat"
    assert "Infill is not supported by this model" in infill.json()["error"]["message"]
    audio = post(gw, "/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF0000WAVE")}, data={"model": "x"})
    assert audio.status_code == 501
    error = audio.json()["error"]
    assert "role 'transcription' or 'audio'" in error["message"] and error["type"] == "not_supported_error"


# -- routing --------------------------------------------------------------------------------------------------
def test_routing_by_endpoint_type_and_model(gw):
    def server_for(path: str, body: dict) -> tuple[int, str | None]:
        r = post(gw, path, json=body)
        return r.status_code, r.headers.get("x-podllama-server")

    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert server_for("/v1/chat/completions", chat) == (200, "chat")  # no model: the default
    assert server_for("/v1/chat/completions", chat | {"model": "tiny-chat-2"}) == (200, "chat2")  # by alias
    assert server_for("/v1/chat/completions", chat | {"model": "chat2"}) == (200, "chat2")  # by server name
    assert server_for("/v1/chat/completions", chat | {"model": "no-such-model"}) == (200, "chat")  # unknown: default
    assert server_for("/v1/embeddings", {"input": "x"}) == (200, "embed")  # by endpoint type
    assert server_for("/embeddings", {"content": "x"}) == (200, "embed")
    wrong = post(gw, "/v1/embeddings", json={"input": "x", "model": "tiny-chat"})
    assert wrong.status_code == 400
    assert "served by server 'chat' (role chat)" in wrong.json()["error"]["message"]
    assert "/v1/chat/completions" in wrong.json()["error"]["message"]
    q = httpx.post(f"{gw.url}/v1/chat/completions?model=tiny-chat-2", json=chat)
    assert q.headers["x-podllama-server"] == "chat2"


def test_passthrough_and_unknown_paths(gw):
    r = httpx.get(f"{gw.url}/servers/embed/props")
    assert r.status_code == 200 and r.headers["x-podllama-server"] == "embed"
    assert httpx.get(f"{gw.url}/servers/embed/health").json() == {"status": "ok"}
    assert httpx.get(f"{gw.url}/servers/nope/health").status_code == 404
    bad = httpx.get(f"{gw.url}/servers/embed/%2e%2e/etc/passwd")
    assert bad.status_code == 400
    missing = httpx.get(f"{gw.url}/v1/no-such-endpoint")
    assert missing.status_code == 404 and "/help" in missing.json()["error"]["message"]


def test_replicas_share_the_load(gw, podman):
    replicas = [f"{STACK}-chat2-1", f"{STACK}-chat2-2"]

    def decodes(replica: str) -> float:
        # llama-server's count of llama_decode() calls, kept as they happen (tokens_predicted_total is added to
        # only when a slot is reused: one finished request per replica leaves it at 0)
        metrics = httpx.get(f"http://{podman.inspect(replica).ip}:8080/metrics", headers=gw.server_key).text
        return float(next(x for x in metrics.splitlines() if x.startswith("llamacpp:n_decode_total")).split()[-1])

    before = {r: decodes(r) for r in replicas}
    # two answers in flight at once, by construction: the second is sent once the first has begun, and the first
    # cannot have ended by then — thousands of tokens to go, more than the sockets between hold while this client
    # reads nothing of it (a short answer ends in the buffers at once, and its replica counts as free again)
    body = {"model": "tiny-chat-2", "max_tokens": 16000, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "x"}]}
    with httpx.Client(base_url=gw.url, timeout=60) as client, contextlib.ExitStack() as streams:
        readers = []  # held: a line reader dropped is collected at once, and closes its connection
        for _ in range(2):
            r = streams.enter_context(client.stream("POST", "/v1/chat/completions", json=body))
            readers.append(r.iter_lines())
            first = next(line for line in readers[-1] if line.startswith("data: "))
            assert r.status_code == 200 and '"error"' not in first, first
        # both decode now; leaving closes the streams, which stops both generations
        assert wait_until(lambda: all(decodes(r) > before[r] for r in replicas), timeout=30), \
            ({r: decodes(r) - before[r] for r in replicas}, httpx.get(f"{gw.url}/admin/requests?limit=2",
                                                                      headers=gw.admin).text)


# -- streaming and cancellation -------------------------------------------------------------------------------
def open_stream(gw, body: dict) -> socket.socket:
    """A raw HTTP connection (so the test decides exactly when the client goes away)."""
    sock = socket.create_connection(("127.0.0.1", gw.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (len(data), data))
    return sock


def recv_until(sock: socket.socket, marker: bytes, limit: float = 10) -> bytes:
    sock.settimeout(limit)
    data = b""
    while marker not in data:
        piece = sock.recv(65536)
        assert piece, f"connection closed before {marker!r}: {data[:300]!r}"
        data += piece
    return data


# Long enough to still be generating seconds later (the tiny model's context holds 32768 tokens)
LONG = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 30000, "temperature": 1.0}


def test_sse_passes_through_event_by_event(gw):
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no" and r.headers["x-podllama-server"] == "chat"
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 9


def test_a_client_that_goes_away_mid_stream_cancels_the_generation(gw):
    sock = open_stream(gw, LONG | {"stream": True})
    recv_until(sock, b"data: ")
    assert wait_until(lambda: slots_busy(gw), 5)
    sock.close()
    assert wait_until(lambda: not slots_busy(gw), 1.0), "the slot kept generating after the client left"


def test_a_client_that_goes_away_before_the_first_byte_cancels(gw, podman):
    """Not streamed: llama-server looks at the client's connection when a second passes with no result for the
    request (its HTTP_POLLING_SECONDS). So the test looks at /slots only every 1.2 s (other requests' results
    would keep postponing that look), and holds the gateway to what a direct client gets."""
    key = gw.server_key["Authorization"].encode()

    def time_to_idle(host: str, port: int) -> float:
        sock = socket.create_connection((host, port))
        data = json.dumps(LONG).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: %b\r\nContent-Length: %d\r\n\r\n%b" % (key, len(data), data))
        assert wait_until(lambda: slots_busy(gw), 5)
        sock.close()
        t0 = time.monotonic()
        assert wait_until(lambda: not slots_busy(gw), 6, interval=1.2), "the slot kept generating after the client left"
        return time.monotonic() - t0

    direct = time_to_idle(podman.inspect(f"{STACK}-chat-1").ip, 8080)
    through = time_to_idle("127.0.0.1", gw.port)
    assert through <= direct + 1.2 and through < 3.7, (direct, through)


def test_a_queued_request_whose_client_left_never_runs(gw):
    # chat2's replicas each have one slot: fill both, then queue a third and leave
    busy = [open_stream(gw, LONG | {"model": "tiny-chat-2", "stream": True}) for _ in range(2)]
    for s in busy:
        recv_until(s, b"data: ")
    queued = open_stream(gw, LONG | {"model": "tiny-chat-2", "stream": True})
    time.sleep(0.5)
    queued.close()
    for s in busy:
        s.close()
    assert wait_until(lambda: not slots_busy(gw, "chat2"), 1.5)
    time.sleep(1.0)
    assert not slots_busy(gw, "chat2"), "the abandoned request started after all"


def test_an_upstream_that_dies_mid_stream_ends_with_an_error_event(gw, podman):
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=60,
                      json=LONG | {"model": "tiny-chat-2", "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        server = r.headers["x-podllama-server"]
        assert server == "chat2"
        # whichever replica answers: kill both llama-server processes
        for pid in [podman.inspect(f"{STACK}-chat2-{n}").pid for n in (1, 2)]:
            os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest and '"error"' in rest[-1] and "broke off" in rest[-1]
    # the supervisor brings them back
    assert wait_until(lambda: post(gw, "/v1/chat/completions", json={
        "model": "tiny-chat-2", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}).status_code == 200, 60)


def test_many_sequential_requests_reuse_connections_safely(gw):
    for i in range(30):
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": i % 2 == 0}
        r = post(gw, "/v1/chat/completions", json=body)
        assert r.status_code == 200, (i, r.text)
    time.sleep(6)  # longer than llama-server keeps an idle connection
    assert post(gw, "/tokenize", json={"content": "x"}).status_code == 200


def test_body_size_cap(gw):
    huge = b'{"content": "' + b"a" * (65 * 2**20) + b'"}'
    r = httpx.post(f"{gw.url}/tokenize", content=huge, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "max_body_mb" in r.json()["error"]["message"]


# -- /help and OpenAPI ----------------------------------------------------------------------------------------
def test_help_lists_every_route_of_the_table(gw):
    items = httpx.get(f"{gw.url}/help").json()["endpoints"]
    listed = {p for e in items for p in [e["path"], *e["aliases"]]}
    for ep in ENDPOINTS:
        for path in ep.paths:
            assert path + ("{id}" if ep.prefix else "") in listed, path
    embeddings = httpx.get(f"{gw.url}/help/v1/embeddings").json()
    assert embeddings["routes_to"] == "'embed'" and embeddings["llama_server_flag"] == "--embedding"
    chat = httpx.get(f"{gw.url}/help/chat/completions").json()  # by alias
    assert "chat2" in chat["routes_to"] and chat["path"] == "/v1/chat/completions"
    api = {e["path"]: e for e in items if e["path"].startswith("/admin")}
    assert {"/admin/config", "/admin/servers/{name}", "/admin/jobs/update", "/admin/reload", "/admin/shutdown"} <= set(api)
    assert api["/admin/config"]["methods"] == ["GET", "PUT"] or set(api["/admin/config"]["methods"]) >= {"GET"}
    html = httpx.get(f"{gw.url}/help", headers={"accept": "text/html"})
    assert html.headers["content-type"].startswith("text/html") and "/v1/rerank" in html.text
    spec = httpx.get(f"{gw.url}/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"] and "/admin/servers/{name}" in spec["paths"]
    assert "post" in spec["paths"]["/v1/embeddings"]


# -- management API -------------------------------------------------------------------------------------------
def test_config_api_round_trip(gw, podman):
    api = gw.api(timeout=120)
    got = api.get("/admin/config")
    etag = got.headers["etag"]
    assert got.json()["servers"]["embed"]["role"] == "embedding"
    toml = api.get("/admin/config?format=toml")
    assert toml.headers["content-type"].startswith("application/toml") and "[servers.embed]" in toml.text
    ids = {c.name: c.id for c in podman.list({"podllama.stack": STACK})}

    dry = api.patch("/admin/servers/embed?dry_run=1", json={"ctx_size": 768}, timeout=60).json()
    assert dry["dry_run"] and "restart embed" in dry["plan"]["summary"] and "chat" in dry["plan"]["summary"]
    assert "untouched" in dry["plan"]["summary"]

    stale = api.patch("/admin/servers/embed", json={"ctx_size": 768}, headers={"If-Match": '"0000"'}, timeout=60)
    assert stale.status_code == 412

    invalid = api.patch("/admin/servers/embed", json={"args": {"paralel": 3}}, timeout=60)
    assert invalid.status_code == 422 and "paralel" in invalid.json()["error"]["message"]
    assert api.get("/admin/config").headers["etag"] == etag  # nothing changed
    assert {c.name: c.id for c in podman.list({"podllama.stack": STACK})} == ids

    # chat keeps answering while embed restarts
    failures, stop = [], threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            r = post(gw, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
            if r.status_code != 200:
                failures.append(r.status_code)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        applied = api.patch("/admin/servers/embed", json={"ctx_size": 768}, headers={"If-Match": etag}, timeout=120)
    finally:
        stop.set()
        t.join()
    assert applied.status_code == 200, applied.text
    assert failures == []
    after = {c.name: c.id for c in podman.list({"podllama.stack": STACK})}
    assert after[f"{STACK}-embed-1"] != ids[f"{STACK}-embed-1"]
    assert all(after[n] == ids[n] for n in ids if n != f"{STACK}-embed-1")
    assert "ctx_size = 768" in gw.path.read_text() and "[servers.chat]" in gw.path.read_text()
    assert api.get("/admin/config").headers["etag"] != etag
    assert post(gw, "/v1/embeddings", json={"input": "x"}).status_code == 200


def test_server_api_lists_and_acts(gw):
    api = gw.api(timeout=120)
    servers = {s["name"]: s for s in api.get("/admin/servers").json()}
    assert set(servers) == {"chat", "chat2", "embed", "rerank"}
    assert [r["health"] for r in servers["chat2"]["replicas"]] == ["ok", "ok"]
    assert api.get("/admin/servers/nope").status_code == 404
    restarted = api.post("/admin/servers/rerank/restart", timeout=120).json()
    assert restarted["replicas"][0]["health"] == "ok"
    status = api.get("/admin/status").json()
    assert status["stack"] == STACK and len(status["servers"]) == 5


def test_rebuild_job_over_the_api(gw):
    api = gw.api()
    job = api.post("/admin/jobs/rebuild", json={"variant": "cpu"}).json()
    assert job["state"] == "running" and job["kind"] == "rebuild"
    done = wait_until(lambda: (j := api.get(f"/admin/jobs/{job['id']}?log=1").json())["state"] != "running" and j, 900)
    assert done["state"] == "done", (done["error"], done.get("log", [])[-5:])
    assert done["result"]["ok"] and any("building cpu" in line for line in done["log"])
    assert api.post("/admin/jobs/dance").status_code == 404
