"""A real stack (gateway container, llama-servers, Podman) attacked as a hostile web page, a neighbour on the
host and a hostile client would. Each test is one class of attack; each fails if its defence goes."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from podllama.build.doctor import service_log
from tests.helpers import flood_headers, stack_name, wait_until
from tests.integration.conftest import CHAT_AND_EMBED, StackFiles, free_port

STACK = stack_name("ptatk")
CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
SERVERS = CHAT_AND_EMBED.replace("args = { parallel = 2 }", 'args = { parallel = 2, slot_save_path = "/tmp/" }')


@pytest.fixture(scope="module")
def stack(podman, models_dir, cpu_image, tmp_path_factory):
    sf = StackFiles(tmp_path_factory.mktemp("attacks"), STACK, podman, models_dir, free_port()).write(SERVERS)
    sf.run("start")
    sf.url = f"http://127.0.0.1:{sf.port}"
    yield sf
    sf.run("down", check=False)


def ids(podman) -> dict[str, str]:
    return {c.name: c.id for c in podman.list({"podllama.stack": STACK})}


def raw(sf, data: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", sf.port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        try:
            while piece := sock.recv(65536):
                out += piece
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_the_admin_api_is_closed_without_its_key(stack, podman):
    before = ids(podman)
    assert httpx.get(f"{stack.url}/admin/config").status_code == 401
    assert httpx.post(f"{stack.url}/admin/servers/chat/restart").status_code == 401
    assert ids(podman) == before
    key = stack.dir / ".podllama" / "secrets" / "admin.key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o777 == 0o700
    assert stack.api().get("/admin/config").status_code == 200


def test_dns_rebinding_gets_no_answer(stack):
    rebound = {"Host": f"attacker.example:{stack.port}"}
    assert httpx.get(f"{stack.url}/admin/status", headers=rebound | stack.admin).status_code == 421
    assert httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, headers=rebound).status_code == 421
    assert httpx.get(f"{stack.url}/v1/models", headers=rebound).status_code == 421


def test_a_cross_site_page_cannot_drive_the_stack(stack, podman):
    before = ids(podman)
    evil = {"Origin": "http://attacker.example"}
    assert httpx.post(f"{stack.url}/admin/servers/chat/restart", headers=evil | stack.admin).status_code == 403
    simple = httpx.post(f"{stack.url}/v1/chat/completions", content=json.dumps(CHAT),
                        headers=evil | {"Content-Type": "text/plain"})
    assert simple.status_code == 403
    assert ids(podman) == before


def test_cors_belongs_to_the_gateway(stack):
    r = httpx.get(f"{stack.url}/props", headers={"Origin": "http://attacker.example"})
    assert r.status_code == 200 and not [h for h in r.headers if h.startswith("access-control")]
    pre = httpx.options(f"{stack.url}/v1/chat/completions",
                        headers={"Origin": "http://attacker.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403


def test_no_command_reaches_git_through_the_update_job(stack, podman):
    for body in ({"remote": "--upload-pack=touch /tmp/podllama-pwned;false", "ref": "."},
                 {"ref": "--upload-pack=touch /tmp/podllama-pwned"}):
        r = stack.api().post("/admin/jobs/update", json=body)
        assert r.status_code == 422, r.text
    probe = podman.exec(f"{STACK}-gateway", ["sh", "-c", "ls /tmp/podllama-pwned || echo absent"])
    assert "absent" in probe.stdout
    assert stack.api().get("/admin/jobs").json() == []


def test_an_encoded_line_break_never_splits_the_upstream_request(stack):
    smuggle = b"GET /servers/chat/health%0D%0A%0D%0APOST%20/slots/0?action=erase%20HTTP/1.1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    assert raw(stack, smuggle, 3).startswith(b"HTTP/1.1 400")


def test_the_query_string_reaches_the_server_on_routed_endpoints(stack):
    r = httpx.post(f"{stack.url}/slots/0?action=erase&server=chat", timeout=30)
    assert r.status_code == 200 and r.json()["id_slot"] == 0, r.text


def test_servers_answer_only_the_gateway(stack, podman):
    ip = podman.inspect(f"{STACK}-chat-1").ip
    assert httpx.get(f"http://{ip}:8080/props").status_code == 401
    assert httpx.post(f"http://{ip}:8080/v1/chat/completions", json=CHAT).status_code == 401
    assert httpx.get(f"http://{ip}:8080/health").status_code == 200  # liveness stays public
    inspected = json.dumps(podman.inspect(f"{STACK}-chat-1").raw)
    key = stack.server_key["Authorization"].removeprefix("Bearer ")
    assert key not in inspected


def test_huge_heads_and_bodies_are_cut_off_before_they_are_read(stack):
    answer, sent = flood_headers(stack.port)
    assert answer.startswith(b"HTTP/1.1 431") and sent < 8 * 2**20
    head = b"POST /admin/models/pull HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 300000000\r\n"
    assert raw(stack, head + b"\r\n", 3).startswith(b"HTTP/1.1 401")
    keyed = head + b"Authorization: " + stack.admin["Authorization"].encode() + b"\r\n\r\n"
    assert raw(stack, keyed, 3).startswith(b"HTTP/1.1 413")


def test_a_hostile_multipart_body_does_not_stall_other_requests(stack):
    """The old model-field regex took seconds of the event loop on these 136 KB; every request waited."""
    evil = b'--b\r\nContent-Disposition: form-data; name="model"\r\n' + b"a\r\n" * 45000 + b"\r\n"
    pings: list[float] = []
    posts: list[float] = []
    stop = threading.Event()

    def ping() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            httpx.get(f"{stack.url}/health")
            pings.append(time.monotonic() - t0)

    pinger = threading.Thread(target=ping)
    pinger.start()
    for _ in range(20):
        t0 = time.monotonic()
        r = httpx.post(f"{stack.url}/v1/audio/transcriptions", content=evil,
                       headers={"Content-Type": "multipart/form-data; boundary=b"})
        posts.append(time.monotonic() - t0)
        assert r.status_code == 501  # read, inspected, answered: no audio server here
    stop.set()
    pinger.join()
    assert pings and max(pings) < 0.5, f"/health took up to {max(pings) * 1000:.0f} ms"
    assert max(posts) < 0.5, f"a hostile body took {max(posts) * 1000:.0f} ms to answer"


def test_aborted_uploads_leave_the_server_reachable(stack):
    for _ in range(24):
        with socket.create_connection(("127.0.0.1", stack.port)) as sock:
            sock.sendall(b"POST /servers/chat/completion HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{\"prompt\": \""
                         + b"a" * 2_000_000)
    t0 = time.monotonic()
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200 and time.monotonic() - t0 < 5


def test_two_changes_from_one_version_cannot_both_win(stack, podman):
    """If-Match is checked under the stack's lock: of two changes made from the same version, one applies
    and the other is told the config changed (412), never both written one over the other."""
    api = stack.api(timeout=120)
    since = int(time.time())
    etag = api.get("/admin/config").headers["etag"]
    results: dict[int, httpx.Response] = {}

    def change(size: int) -> None:
        results[size] = api.patch("/admin/servers/embed", json={"ctx_size": size}, headers={"If-Match": etag})

    threads = [threading.Thread(target=change, args=(s,)) for s in (640, 768)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if sorted(r.status_code for r in results.values()) != [200, 412]:  # the whole story, untruncated
        gateway_log = "".join(podman.logs(f"{STACK}-gateway", tail=40))
        service = service_log()
        said = service.read_text(errors="replace")[-4000:] if service.exists() else "(none)"
        raise AssertionError("\n".join([r.text for r in results.values()] + ["gateway log:", gateway_log,
                                                                             "podman service log:", said]))
    winner = next(size for size, r in results.items() if r.status_code == 200)
    assert f"ctx_size = {winner}" in stack.path.read_text()
    loser = next(r for r in results.values() if r.status_code == 412)
    assert "changed since" in loser.json()["error"]["message"]
    # the gateway checked the args against the flags `podllama start` recorded in the stack's state directory,
    # without starting a container of its own to read them
    image_id = podman.inspect(f"{STACK}-embed-1").image_id
    assert (stack.dir / ".podllama" / "images" / f"{image_id[:24]}.json").is_file()
    created = podman.run_cli("events", f"--since={since}", "--stream=false", "--filter=event=create",
                             "--format={{.Name}}").stdout.split()
    assert not [n for n in created if n.startswith("podllama-flags-")], created


def test_the_gateway_follows_the_config_and_the_keys_given_to_start(podman, models_dir, cpu_image, tmp_path):
    sf = StackFiles(tmp_path, stack_name("ptfol"), podman, models_dir, free_port()).write(CHAT_AND_EMBED)
    url = f"http://127.0.0.1:{sf.port}"
    try:
        sf.run("start")
        text = sf.path.read_text()
        sf.path.write_text(text[:text.index("[servers.embed]")])
        sf.run("start", env={"PODLLAMA_API_KEYS": "sk-given-to-start"})
        time.sleep(3)  # several supervisor rounds (every 0.5 s): the removed server must stay removed
        assert podman.inspect(f"{sf.name}-embed-1") is None
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-given-to-start"}).json()
        assert [m["server"] for m in models["data"]] == ["chat"]
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 401
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT,
                          headers={"Authorization": "Bearer sk-given-to-start"}).status_code == 200
        assert "sk-given-to-start" not in json.dumps(podman.inspect(f"{sf.name}-gateway").raw)
    finally:
        sf.run("down", check=False)


# -- the front's mechanisms, one real-stack test per class (docs/security.md, "The front") ---------------------------
def pinging(url: str) -> tuple[list[float], threading.Event, threading.Thread]:
    """/health asked in a loop, each answer's time noted, until the event is set."""
    times: list[float] = []
    stop = threading.Event()

    def ping() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            httpx.get(f"{url}/health", timeout=30)
            times.append(time.monotonic() - t0)

    thread = threading.Thread(target=ping)
    thread.start()
    return times, stop, thread


def test_hostile_json_is_a_clear_4xx_and_never_stalls_the_gateway(stack):
    times, stop, pinger = pinging(stack.url)
    deep = b"[" * 100_000 + b"]" * 100_000
    for path, headers in (("/v1/chat/completions", {}), ("/completion", {}), ("/api/chat", {}),
                          ("/admin/config", stack.admin)):
        method = "PUT" if path == "/admin/config" else "POST"
        r = httpx.request(method, stack.url + path, content=deep, timeout=30,
                          headers=headers | {"Content-Type": "application/json"})
        # refused for its depth, or (where the gateway reads it all) already for its 100,000 elements
        assert (r.status_code, "nests deeper" in r.text or "elements" in r.text) in ((400, True), (413, True)), (
            path, r.status_code, r.text[:200])
    wide = json.dumps({"model": "chat", "messages": [{"role": "user", "content": [1] * 4_000_000}]}).encode()
    r = httpx.post(f"{stack.url}/api/chat", content=wide, timeout=60)  # 12 MB of tiny elements
    assert r.status_code == 413 and "elements" in r.text
    tags = json.dumps({"prompt": "<sd_cpp_extra_args>" * 200_000}).encode()
    assert httpx.post(f"{stack.url}/v1/images/generations", content=tags, timeout=30).status_code == 501
    stop.set()
    pinger.join()
    # the stall itself is measured inside the gateway (its loop's own lag); what a client sees of /health also
    # holds this test process's threads and the host's scheduling (this process serializes and uploads the 12 MB
    # body beside the pinger), so it only has to stay far below a stall of parsing such bodies on the loop
    lag = httpx.get(f"{stack.url}/metrics").text
    worst = float(next(line.split()[-1] for line in lag.splitlines()
                       if line.startswith("podllama_event_loop_lag_max_seconds")))
    assert worst < 0.25, f"the gateway's loop stalled for {worst * 1000:.0f} ms (/health: up to {max(times):.2f} s)"
    assert times and max(times) < 1.0, f"/health took up to {max(times) * 1000:.0f} ms (loop lag {worst:.3f} s)"
    assert httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_trickling_bodies_never_reach_a_server_and_are_cut_off(stack):
    socks = []
    for _ in range(48):
        sock = socket.create_connection(("127.0.0.1", stack.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{")
        socks.append(sock)
    t0 = time.monotonic()
    assert httpx.get(f"{stack.url}/props", timeout=10).status_code == 200  # routed to the chat server
    assert httpx.get(f"{stack.url}/servers/chat/health", timeout=10).status_code == 200
    assert time.monotonic() - t0 < 3
    answers = []
    for sock in socks:  # one byte every 2 s is under min_body_rate: each is refused once body_grace is over
        sock.settimeout(20)
        deadline = time.monotonic() + 20
        answer = b""
        while not answer and time.monotonic() < deadline:
            try:
                sock.sendall(b" ")
                sock.settimeout(0.5)
                answer = sock.recv(200)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        answers.append(answer)
        sock.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), [a[:40] for a in answers if not a.startswith(
        b"HTTP/1.1 408")][:3]


def test_clients_that_never_read_do_not_hold_a_server(stack):
    body = json.dumps({"input": ["hello there"] * 2000}).encode()  # about 2.5 MB of vectors back
    socks = []
    for _ in range(12):
        sock = socket.create_connection(("127.0.0.1", stack.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        socks.append(sock)
    try:
        # the answers were read from the server into the clients' outboxes: the server answers others at once
        def free() -> bool:
            t0 = time.monotonic()
            try:
                ok = httpx.get(f"{stack.url}/props?server=embed", timeout=10).status_code == 200
            except httpx.TimeoutException:  # still computing the vectors: not yet
                return False
            return ok and time.monotonic() - t0 < 1

        assert wait_until(free, timeout=60)
        r = httpx.post(f"{stack.url}/v1/embeddings", json={"input": "x"}, timeout=30)
        assert r.status_code == 200
    finally:
        for sock in socks:
            sock.close()


def test_every_generating_api_counts_its_tokens_on_a_real_server(stack):
    def counted() -> int:
        text = httpx.get(f"{stack.url}/metrics").text
        return sum(int(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("podllama_tokens_total{") and 'type="completion"' in line)

    for path, body in (("/v1/messages", {"model": "chat", "max_tokens": 3, "messages": [
            {"role": "user", "content": "x"}]}), ("/v1/responses", {"model": "chat", "input": "x",
                                                                     "max_output_tokens": 3}),
            ("/v1/chat/completions", CHAT | {"max_tokens": 3})):
        before = counted()
        r = httpx.post(stack.url + path, json=body, headers={"Accept-Encoding": "gzip"}, timeout=60)
        assert r.status_code == 200, (path, r.text[:300])
        usage = r.json()["usage"]
        reported = usage.get("output_tokens", usage.get("completion_tokens"))
        assert reported and counted() - before == reported, (path, usage)


def test_the_gateways_metrics_carry_what_prometheus_clients_expect(stack):
    r = httpx.get(f"{stack.url}/metrics")
    assert r.status_code == 200 and int(r.headers["process-start-time-unix"]) > 1_700_000_000
    assert "podllama_event_loop_lag_seconds_bucket" in r.text
    own = httpx.get(f"{stack.url}/metrics?server=chat")
    assert own.status_code == 200 and "llamacpp:" in own.text and "process-start-time-unix" in own.headers


def test_a_scoped_key_sees_only_its_own(stack):
    """Last in this module: once a database key exists, inference needs a key."""
    made = json.loads(stack.run("keys", "create", "embed-only", "--roles", "embedding", "--json").stdout)
    scoped = {"Authorization": f"Bearer {made['key']}"}

    # the gateway has read the key: without one, inference is now closed
    assert wait_until(lambda: httpx.get(f"{stack.url}/v1/models").status_code == 401, 10)
    assert httpx.post(f"{stack.url}/v1/embeddings", json={"input": "x"}, headers=scoped).status_code == 200
    models = httpx.get(f"{stack.url}/v1/models", headers=scoped).json()["data"]
    assert [m["server"] for m in models] == ["embed"]
    metrics = httpx.get(f"{stack.url}/metrics", headers=scoped).text
    assert 'server="chat"' not in metrics and 'model="tiny-chat"' not in metrics and 'server="embed"' in metrics
    routes = [e["routes_to"] for e in httpx.get(f"{stack.url}/help", headers=scoped).json()["endpoints"]]
    assert not [r for r in routes if "'chat'" in r or "tiny-chat" in r], routes  # ("role chat" is a role)
    assert "servers: embed" in httpx.get(f"{stack.url}/servers/nope/x", headers=scoped).text
    assert 'server="chat"' in httpx.get(f"{stack.url}/metrics", headers=stack.admin).text
