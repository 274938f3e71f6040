"""The proxy in-process against a scripted upstream: what goes upstream is rebuilt (no smuggling), what the
client may send is limited, and nothing a client or upstream does wedges the gateway."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx

from tests import scripted
from tests.helpers import control_loop, flood_headers, wait_until
from tests.unit.conftest import recv_all

CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}


def test_an_encoded_crlf_never_reaches_the_upstream_request_line(gateway, upstream):
    gw = gateway()
    for method, path in (("GET", "/servers/chat/health%0D%0AGET%20/evil%20HTTP/1.1%0D%0AX:%20y"),
                         ("POST", "/slots/0%0d%0aGET%20/evil"), ("GET", "/servers/chat/a%00b"),
                         ("GET", "/servers/chat/%09tab")):
        r = gw.raw(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode(), timeout=2)
        assert r.startswith(b"HTTP/1.1 400"), (path, r[:120])
    assert not [q for q in upstream.requests if b"evil" in q.head], "a smuggled request reached the upstream"


def test_paths_are_re_encoded_and_queries_forwarded_on_every_route(gateway, upstream):
    gw = gateway()
    gw.get("/servers/chat/some%20path/x%25y?a=1&b=%20")
    gw.post("/slots/0?action=erase&server=chat", json={})
    gw.post("/v1/chat/completions?trace=1", json=CHAT)
    targets = [q.target for q in upstream.requests if q.target != b"/health"]
    assert b"/some%20path/x%25y?a=1&b=%20" in targets
    assert b"/slots/0?action=erase&server=chat" in targets
    assert b"/v1/chat/completions?trace=1" in targets


def test_only_the_headers_a_server_reads_go_upstream(gateway, upstream):
    """An allowlist, not a blocklist: hop-by-hop headers, the client's credentials and cookies, Proxy-*,
    X-Forwarded-* as the client sent them, Accept-Encoding and anything unknown stay at the gateway."""
    gw = gateway()
    gw.post("/v1/chat/completions", json=CHAT, headers={
        "Connection": "keep-alive, x-private-hop", "X-Private-Hop": "1", "Proxy-Authorization": "Basic x",
        "TE": "trailers", "Authorization": "Bearer client-key", "X-Api-Key": "client-key", "X-Custom": "dropped",
        "Cookie": "podllama_session=s", "X-Forwarded-For": "10.9.9.9", "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=10.9.9.9", "Accept-Encoding": "gzip", "X-Conversation-Id": "conv-1",
        "User-Agent": "test-client"})
    sent = upstream.received("/v1/chat")[-1].headers
    for gone in (b"x-private-hop", b"proxy-authorization", b"te", b"x-api-key", b"connection", b"x-custom",
                 b"cookie", b"x-forwarded-host", b"forwarded", b"accept-encoding"):
        assert gone not in sent, gone
    assert sent[b"x-forwarded-for"] == b"127.0.0.1", "set by the gateway, from the connection it saw"
    assert sent[b"x-conversation-id"] == b"conv-1" and sent[b"user-agent"] == b"test-client"
    assert sent[b"content-type"] == b"application/json"
    assert sent[b"authorization"] != b"Bearer client-key"


def test_content_length_with_transfer_encoding_is_refused(gateway, upstream):
    gw = gateway()
    r = gw.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", timeout=2)
    assert r.startswith(b"HTTP/1.1 400")
    assert upstream.received("/v1/chat") == []


def test_oversized_heads_get_431(gateway):
    gw = gateway("max_header_kb = 16\nmax_headers = 50")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(60))
    assert gw.raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n", 2).startswith(b"HTTP/1.1 431")
    big = b"X-Big: " + b"a" * 20000 + b"\r\n"
    assert gw.raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + big + b"\r\n", 2).startswith(b"HTTP/1.1 431")
    long_url = b"GET /health?" + b"q" * 20000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    assert gw.raw(long_url, 2).startswith(b"HTTP/1.1 431")


def test_32_mb_of_headers_are_cut_off_early(gateway):
    gw = gateway()
    answer, sent = flood_headers(gw.port)
    assert answer.startswith(b"HTTP/1.1 431")
    assert sent < 8 * 2**20, f"the gateway read {sent >> 20} MiB of headers before refusing"


def test_a_slow_head_and_a_stalled_body_are_cut_off(gateway):
    gw = gateway("header_timeout = 0.5\nbody_timeout = 0.5")
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # …and the rest never comes
        t0 = time.monotonic()
        answer = recv_all(sock, 5)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 2
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:  # a connection that says nothing at all
        t0 = time.monotonic()
        assert recv_all(sock, 5).startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 2
    for path in ("/v1/chat/completions", "/servers/chat/upload"):
        with socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n{")
            t0 = time.monotonic()
            answer = recv_all(sock, 5)
        assert answer.startswith(b"HTTP/1.1 408"), (path, answer[:100])
        assert time.monotonic() - t0 < 2


def test_body_caps_on_proxied_routes(gateway, upstream):
    gw = gateway("max_body_mb = 1")
    r = gw.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000000\r\n\r\n", 3)
    assert r.startswith(b"HTTP/1.1 413")

    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    streamed = httpx.post(gw.url + "/servers/chat/upload", content=chunks(), timeout=10)
    assert streamed.status_code == 413 and "max_body_mb" in streamed.json()["error"]["message"]


def test_hostile_multipart_does_not_block_the_event_loop(gateway):
    """The old model-field regex took seconds on 136 KB of these lines; the gateway's loop must stay free
    meanwhile: its lag measured against an idle loop in this process (what the machine's load costs any loop),
    so a busy machine is not taken for a stall and a real one still fails."""
    gw = gateway()
    evil = b'--b\r\nContent-Disposition: form-data; name="model"\r\n' + b"a\r\n" * 45000 + b"\r\n"
    lag = gw.gw.metrics.loop_lag
    lag.max = 0.0
    with control_loop() as control:
        for _ in range(5):
            r = gw.post("/v1/audio/transcriptions", content=evil,
                        headers={"Content-Type": "multipart/form-data; boundary=b"})
            assert r.status_code in (400, 413, 501), r.status_code  # refused, never a crash
        big = json.dumps({"messages": [{"role": "user", "content": "y" * (8 << 20)}], "model": "tiny-chat"}).encode()
        r = gw.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.headers["x-podllama-server"] == "chat"
    assert lag.max < 0.1 + control.max, (f"the gateway's loop was held {lag.max * 1000:.0f} ms while hostile "
                                         f"bodies were parsed (an idle loop here: {control.max * 1000:.0f} ms)")


def test_aborted_uploads_release_their_connections(gateway, upstream):
    """A client that leaves mid-upload must not keep the upstream connection (and its pool slot)."""
    upstream.on("/upload", scripted.reads_at(50_000_000), before_body=True)
    gw = gateway(servers='[servers.chat]\nmodel = "tiny.gguf"\nargs = { threads_http = 4 }\n')
    for _ in range(24):
        with socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(b"POST /servers/chat/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50000000\r\n\r\n"
                         + b"z" * 3_000_000)
        # closed mid-upload
    deadline = time.monotonic() + 5
    while upstream.open_for("/upload") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.open_for("/upload") == 0, "upstream connections of aborted uploads were kept open"
    t0 = time.monotonic()
    assert gw.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert time.monotonic() - t0 < 2
    pool = gw.gw.proxy.client.pools[("127.0.0.1", upstream.port)]
    assert pool.slots <= 1 and not pool.waiters


def test_waiting_for_a_connection_is_bounded(gateway, upstream):
    upstream.on("/slow", scripted.stall(1.5))
    gw = gateway("queue_timeout = 0.5", servers='[servers.chat]\nmodel = "tiny.gguf"\nargs = { threads_http = 1 }\n')
    busy = threading.Thread(target=lambda: gw.get("/servers/chat/slow"))
    busy.start()
    assert wait_until(lambda: upstream.open_for("/slow") == 1, timeout=10, interval=0.02)
    t0 = time.monotonic()
    r = gw.get("/servers/chat/other")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert 0.4 < time.monotonic() - t0 < 1.4
    assert "stayed busy" in r.json()["error"]["message"]
    busy.join()


def test_errors_name_the_server_not_its_address(gateway, upstream):
    gw = gateway()
    upstream.stop()  # the registry still thinks it is up: the connection is refused
    r = gw.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and "server 'chat'" in r.json()["error"]["message"]
    assert "127.0.0.1" not in r.text and str(upstream.port) not in r.text


def test_upstream_framing_head_close_delimited_trailers(gateway, upstream):
    upstream.on("/closing", scripted.close_delimited(b"until the end"))
    upstream.on("/trailers", scripted.with_trailers(b"chunked body"))
    upstream.on("/head", scripted.head_with_length)
    gw = gateway()
    assert gw.get("/servers/chat/closing").text == "until the end"
    t = gw.get("/servers/chat/trailers")
    assert t.text == "chunked body" and "x-trailer" not in t.headers
    t0 = time.monotonic()
    head = httpx.head(gw.url + "/servers/chat/head", timeout=5)
    assert head.status_code == 200 and time.monotonic() - t0 < 1
    assert gw.get("/servers/chat/x").status_code == 200  # the pool is fine afterwards


def test_a_broken_stream_ends_with_an_error_event(gateway, upstream):
    upstream.on("/v1/chat/completions", scripted.then_silence(b"data: {}\n\n", 10))
    gw = gateway("idle_timeout = 1")
    r = gw.post("/v1/chat/completions", json=CHAT | {"stream": True})
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[0] == "data: {}" and '"error"' in events[-1] and "no data from the server" in events[-1]


IMAGE_SERVERS = """
[servers.chat]
model = "tiny.gguf"

[servers.painter]
role = "image"
model = "sd.gguf"
"""


def test_image_requests_over_the_limits_never_reach_sd_server(gateway, upstream):
    """sd-server generates whatever it is asked (a 16384² image, a hundred of them): the gateway holds each image
    request to [gateway] max_images and max_image_side, wherever the numbers hide (the OpenAI fields, the
    AUTOMATIC1111 ones, the extra arguments sd-server reads from a prompt, a multipart form)."""
    gw = gateway("max_images = 3\nmax_image_side = 1024", servers=IMAGE_SERVERS)
    refused = [
        ("/v1/images/generations", {"prompt": "x", "size": "4096x512"}, "size width 4096 is over 1024"),
        ("/v1/images/generations", {"prompt": "x", "n": 4}, "n 4 is over the 3 images"),
        ("/v1/images/generations", {"prompt": "x", "n": "lots"}, "n must be a whole number"),
        ("/v1/images/generations", {"prompt": "x", "size": "big"}, "size must be WIDTHxHEIGHT"),
        ("/v1/images/generations", {"prompt": 'x<sd_cpp_extra_args>{"height": 9000}</sd_cpp_extra_args>'},
         "sd_cpp_extra_args height 9000"),
        ("/v1/images/generations", {"prompt": 'x<sd_cpp_extra_args>{"batch_count": 50}</sd_cpp_extra_args>'},
         "batch_count 50"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 9}, "batch_size 9"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 0}, "width must be a whole number of at least 1"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 768, "enable_hr": True, "hr_scale": 2},
         "hr_scale 2 makes a side of 1536"),
    ]
    for path, body, message in refused:
        r = gw.post(path, json=body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)
        assert "[gateway] max_" in r.json()["error"]["message"] or "must be" in r.json()["error"]["message"]
    r = gw.post("/v1/images/edits", data={"prompt": "x", "n": "40"}, files={"image": ("a.png", b"\x89PNG")})
    assert r.status_code == 400 and "n 40" in r.json()["error"]["message"]
    assert upstream.received("/v1/images") == [] and upstream.received("/sdapi") == []
    # within the limits, on to sd-server as sent
    for path, body in (("/v1/images/generations", {"prompt": "x", "n": 3, "size": "1024x64"}),
                       ("/sdapi/v1/txt2img", {"prompt": "x", "width": 512, "enable_hr": True, "hr_scale": 2})):
        assert gw.post(path, json=body).status_code == 200
    assert [json.loads(q.body) for q in upstream.received("/v1/images")] == [{"prompt": "x", "n": 3, "size": "1024x64"}]
    assert len(upstream.received("/sdapi")) == 1
