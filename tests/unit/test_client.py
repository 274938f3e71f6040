"""The gateway's upstream client against a scripted upstream that misbehaves on purpose."""

from __future__ import annotations

import asyncio

import pytest

from podllama.gateway.front.client import BrokenOff, Client, FirstByteTimeout, QueueTimeout
from tests import scripted


def run(coro):
    return asyncio.run(coro)


async def _get(client: Client, port: int, path: str, method: str = "GET", body: bytes = b"") -> tuple[int, bytes]:
    r = await client.request("127.0.0.1", port, method, path.encode(), [], body)
    return r.status, await r.read(5)


def test_only_idempotent_requests_are_sent_again_on_a_stale_connection(upstream):
    upstream.on("/x", scripted.closes_on_reuse())

    async def go() -> None:
        client = Client(first_byte_timeout=5)
        assert (await _get(client, upstream.port, "/x"))[0] == 200  # connection 1
        assert (await _get(client, upstream.port, "/x"))[0] == 200  # 1 is dropped: GET sent again on 2
        with pytest.raises(BrokenOff):  # POST on 2, which the server drops: not sent again
            await _get(client, upstream.port, "/x", "POST", b"{}")
        assert (await _get(client, upstream.port, "/x", "POST", b"{}"))[0] == 200  # a fresh connection: fine
        client.close()

    run(go())
    seen = [(r.method, r.connection) for r in upstream.received("/x")]
    assert seen == [("GET", 1), ("GET", 1), ("GET", 2), ("POST", 2), ("POST", 3)], seen


def test_a_server_that_never_answers_times_out_and_frees_its_slot(upstream):
    upstream.on("/slow", scripted.stall(30))

    async def go() -> None:
        client = Client(first_byte_timeout=0.5)
        with pytest.raises(FirstByteTimeout):
            await _get(client, upstream.port, "/slow")
        pool = client.pools[("127.0.0.1", upstream.port)]
        await asyncio.sleep(0.05)
        assert pool.slots == 0
        assert (await _get(client, upstream.port, "/health"))[0] == 200

    run(go())


def test_waiting_for_a_slot_is_bounded_and_a_cancelled_waiter_passes_it_on(upstream):
    upstream.on("/slow", scripted.stall(1.0))

    async def go() -> None:
        client = Client(queue_timeout=0.3)
        busy = asyncio.ensure_future(client.request("127.0.0.1", upstream.port, "GET", b"/slow", [], limit=1))
        await asyncio.sleep(0.1)
        with pytest.raises(QueueTimeout):
            await client.request("127.0.0.1", upstream.port, "GET", b"/health", [], limit=1)
        gone = asyncio.ensure_future(client.request("127.0.0.1", upstream.port, "GET", b"/health", [], limit=1))
        await asyncio.sleep(0.05)
        gone.cancel()  # a client that left while queued
        r = await busy
        await r.read(5)
        # the slot went back: the next request gets it at once
        r2 = await asyncio.wait_for(client.request("127.0.0.1", upstream.port, "GET", b"/health", [], limit=1), 2)
        assert r2.status == 200
        await r2.read(5)
        assert client.pools[("127.0.0.1", upstream.port)].slots == 1  # that one connection, idle

    run(go())


def test_uploads_wait_for_a_slow_server(upstream):
    """Backpressure: an upstream that reads nothing stops the upload, instead of the gateway buffering it."""
    upstream.on("/upload", scripted.never_reads(5), before_body=True)
    pulled = 0

    async def body():
        nonlocal pulled
        while True:
            pulled += 1
            yield b"u" * (1 << 20)

    async def go() -> None:
        client = Client(first_byte_timeout=30)
        task = asyncio.ensure_future(client.request("127.0.0.1", upstream.port, "POST", b"/upload", [],
                                                    body_stream=body()))
        await asyncio.sleep(1.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
    assert pulled < 64, f"{pulled} MiB were taken from the client while the server read nothing"


def test_a_response_that_is_not_http_is_a_clear_error(upstream):
    upstream.on("/bad", scripted.garbage)

    async def go() -> None:
        client = Client()
        with pytest.raises(BrokenOff) as e:
            await _get(client, upstream.port, "/bad")
        assert "invalid HTTP" in str(e.value) or "closed" in str(e.value)

    run(go())
