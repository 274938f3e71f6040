"""A scripted upstream: a raw HTTP/1.1 server on 127.0.0.1, in a thread of its own, that answers each path the
way a test tells it to — well, or badly on purpose (closing early, sending trailers, stalling, answering HEAD
with a length and no body, ending a body by closing, not reading an upload). It records every request it
received exactly as it came off the socket."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httptools


@dataclass
class Received:
    method: str
    target: bytes
    head: bytes  # the raw request line and headers
    headers: dict[bytes, bytes]
    body: bytes = b""
    connection: int = 0  # which connection it came on (1, 2, …)


Reply = Callable[["Exchange"], Awaitable[None]]


@dataclass
class Exchange:
    """One request, and the means to answer it."""

    request: Received
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    upstream: Upstream
    keep_open: bool = True

    async def send(self, status: int = 200, body: bytes = b"{}", headers: dict[str, str] | None = None) -> None:
        head = {"content-type": "application/json", "content-length": str(len(body))} | (headers or {})
        self.writer.write(f"HTTP/1.1 {status} X\r\n".encode()
                          + b"".join(f"{k}: {v}\r\n".encode() for k, v in head.items()) + b"\r\n" + body)
        await self.writer.drain()


class _Parser:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.raw_head = b""
        self.body = b""
        self.done = False
        self.head_done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def echo(ex: Exchange) -> None:
    """The default: 200 with what arrived (method, target, headers)."""
    r = ex.request
    await ex.send(200, json.dumps({"method": r.method, "target": r.target.decode("latin-1"),
                                   "headers": {k.decode(): v.decode("latin-1") for k, v in r.headers.items()},
                                   "body_bytes": len(r.body)}).encode())


class Upstream:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        """TLS: serve HTTPS with this server context."""
        self.tls = tls
        self.replies: dict[str, Reply] = {"/health": lambda ex: ex.send(200, b'{"status":"ok"}')}
        self.requests: list[Received] = []
        self.connections = 0
        self.open: dict[int, bytes] = {}  # connections open now → the target of their first request
        self.heads_only: dict[str, Reply] = {}  # answered as soon as the head is in (the body is not read)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def on(self, path: str, reply: Reply, before_body: bool = False) -> None:
        (self.heads_only if before_body else self.replies)[path] = reply

    def open_for(self, path_prefix: str) -> int:
        """How many connections are open now that came for PATH_PREFIX."""
        return sum(1 for target in self.open.values() if target.startswith(path_prefix.encode()))

    def received(self, path_prefix: str = "") -> list[Received]:
        return [r for r in self.requests if r.target.startswith(path_prefix.encode())]

    def stop(self) -> None:
        """Close the listening socket and every connection at once (a server that died)."""
        if not self.thread.is_alive():
            return

        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.open[number] = b""
        state = _Parser()
        parser = httptools.HttpRequestParser(state)
        try:
            while True:
                head_seen = False
                while not state.done:
                    data = await reader.read(65536)
                    if not data:
                        return
                    if not state.head_done:
                        state.raw_head += data
                    parser.feed_data(data)
                    if state.head_done and not head_seen:
                        head_seen = True
                        self.open[number] = self.open[number] or state.url
                        path = state.url.split(b"?")[0].decode("latin-1")
                        early = self.heads_only.get(path)
                        if early is not None:
                            req = Received(parser.get_method().decode(), state.url,
                                           state.raw_head.split(b"\r\n\r\n")[0], dict(state.headers), b"", number)
                            self.requests.append(req)
                            ex = Exchange(req, reader, writer, self)
                            await early(ex)
                            return
                req = Received(parser.get_method().decode(), state.url, state.raw_head.split(b"\r\n\r\n")[0],
                               dict(state.headers), state.body, number)
                self.requests.append(req)
                path = state.url.split(b"?")[0].decode("latin-1")
                ex = Exchange(req, reader, writer, self)
                await self.replies.get(path, echo)(ex)
                if not ex.keep_open:
                    return
                state.reset()
        except (ConnectionError, httptools.HttpParserError, asyncio.CancelledError):
            return
        finally:
            self.open.pop(number, None)
            writer.close()


# -- replies that misbehave ---------------------------------------------------------------------------------------
def close_delimited(body: bytes) -> Reply:
    async def reply(ex: Exchange) -> None:
        ex.writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n" + body)
        await ex.writer.drain()
        ex.keep_open = False
    return reply


def with_trailers(body: bytes) -> Reply:
    async def reply(ex: Exchange) -> None:
        ex.writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n"
                        b"trailer: x-trailer\r\n\r\n%x\r\n%b\r\n0\r\nx-trailer: sneaky\r\n\r\n" % (len(body), body))
        await ex.writer.drain()
    return reply


async def head_with_length(ex: Exchange) -> None:
    ex.writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1234\r\n\r\n")
    await ex.writer.drain()


def stall(seconds: float) -> Reply:
    async def reply(ex: Exchange) -> None:
        await asyncio.sleep(seconds)
        await ex.send(200, b'{"late":true}')
    return reply


def sse(events: int, gap: float) -> Reply:
    """A streamed chat completion as llama-server sends it: EVENTS chunks of "tok", GAP seconds apart."""
    async def reply(ex: Exchange) -> None:
        ex.writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(events):
            event = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}],"i":%d}\n\n' % i
            ex.writer.write(b"%x\r\n%b\r\n" % (len(event), event))
            await ex.writer.drain()
            await asyncio.sleep(gap)
        done = b"data: [DONE]\n\n"
        ex.writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
        await ex.writer.drain()
        ex.keep_open = False
    return reply


def events(*payloads: dict) -> Reply:
    """A stream of server-sent events with these JSON payloads, then [DONE], as llama-server sends them."""
    async def reply(ex: Exchange) -> None:
        ex.writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for p in [*(b"data: " + json.dumps(p).encode() for p in payloads), b"data: [DONE]"]:
            ex.writer.write(b"%x\r\n%b\n\n\r\n" % (len(p) + 2, p))
            await ex.writer.drain()
        ex.writer.write(b"0\r\n\r\n")
        await ex.writer.drain()
        ex.keep_open = False
    return reply


def json_reply(data: dict, status: int = 200) -> Reply:
    async def reply(ex: Exchange) -> None:
        await ex.send(status, json.dumps(data).encode())
    return reply


def then_silence(first: bytes, seconds: float) -> Reply:
    """A response head and one piece of a chunked body, then nothing."""
    async def reply(ex: Exchange) -> None:
        ex.writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                        b"%x\r\n%b\r\n" % (len(first), first))
        await ex.writer.drain()
        await asyncio.sleep(seconds)
    return reply


async def garbage(ex: Exchange) -> None:
    ex.writer.write(b"HELLO THERE\r\n\r\n")
    await ex.writer.drain()
    ex.keep_open = False


def never_reads(seconds: float) -> Reply:
    """Takes the head, then reads nothing of the body for SECONDS (uploads must wait, not pile up)."""
    async def reply(ex: Exchange) -> None:
        await asyncio.sleep(seconds)
    return reply


def reads_at(per_second: int) -> Reply:
    """Takes the head, then reads the body at PER_SECOND bytes a second until the client closes (or resets:
    then at once, whatever is still buffered)."""
    async def reply(ex: Exchange) -> None:
        while ex.reader.exception() is None and await ex.reader.read(max(1, per_second // 10)):
            await asyncio.sleep(0.1)
    return reply


def closes_on_reuse() -> Reply:
    """Answers a connection's first request with keep-alive, and closes the connection when a second
    request comes on it (an idle connection the server dropped, as the client sees it)."""
    async def reply(ex: Exchange) -> None:
        if sum(1 for r in ex.upstream.requests if r.connection == ex.request.connection) > 1:
            ex.keep_open = False
            return
        await echo(ex)
    return reply
