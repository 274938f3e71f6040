"""A small HTTP/1.1 client for talking to llama-servers: keep-alive pools per address, separate connect,
queue, first-byte and idle timeouts (and no total one), bodies handed over chunk by chunk as they arrive, and
cancellation that closes the connection at once (which is what makes llama-server stop generating).

Built on asyncio protocols and httptools' parser (the one uvicorn uses) rather than a general client: it is
the gateway's hot path, and it forwards bytes with as little work per chunk as possible (bench/gateway.py
measures it against aiohttp's client in the same run).

A connection's life: opened for a request (its pool slot counted from then on) → the request is written →
the response's head arrives → its body is pulled (`chunks`) or pushed (`stream_to`) → at the end of a body
the server will keep open, it goes back to the pool (idle for at most IDLE_REUSE seconds); every other end —
an error, a timeout, a response abandoned, a client gone — closes it, and closing gives its slot back.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Callable

import httptools

MAX_BUFFERED = 1 << 20  # stop reading from the server while this much is waiting for a slow client
IDLE_REUSE = 3.0  # seconds an idle connection is reused; cpp-httplib closes idle ones after 5
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


# -- errors: what went wrong, and the status a client gets for it ----------------------------------------------
class UpstreamError(Exception):
    """The request could not be completed. `status` is what the gateway answers (or 499: nobody to answer)."""

    status = 502
    kind = "upstream"


class ConnectFailed(UpstreamError):
    """Nothing reached the server: safe to try another replica."""

    status, kind = 503, "connect"


class QueueTimeout(UpstreamError):
    """Every connection to the server stayed busy for the whole queue timeout."""

    status, kind = 503, "queue"


class FirstByteTimeout(UpstreamError):
    status, kind = 504, "first_byte_timeout"


class IdleTimeout(UpstreamError):
    status, kind = 504, "idle_timeout"


class BrokenOff(UpstreamError):
    """The server closed the connection, or sent something that is not HTTP."""

    status, kind = 502, "broken"


class ClientGone(UpstreamError):
    status, kind = 499, "client_gone"


class BodyTooLarge(UpstreamError):
    status, kind = 413, "too_large"


class Response:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []

    async def chunks(self, idle_timeout: float) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                data = conn.chunks.popleft()
                conn.buffered -= len(data)
                if conn.paused and conn.buffered < MAX_BUFFERED // 2:
                    conn.paused = False
                    conn.resume_reading()
                yield data
                continue
            if conn.complete:
                conn.release()
                return
            if conn.error is not None:
                raise conn.error
            await conn.wait(idle_timeout, IdleTimeout)

    async def read(self, idle_timeout: float) -> bytes:
        return b"".join([c async for c in self.chunks(idle_timeout)])

    def stream_to(self, sink: Callable[[bytes], bool], idle_timeout: float) -> asyncio.Future[None]:
        """Push mode, for the hot path: every piece of the body goes to SINK from the network callback itself,
        with no task switch per piece. SINK returns False when it took the piece but cannot take another yet;
        `resume()` says it can. The future completes at the end of the body, or fails (UpstreamError)."""
        return self._conn.push(sink, idle_timeout)

    def resume(self) -> None:
        self._conn.unblock()

    def close(self) -> None:
        """Abandon the response: the connection is closed (the server sees the client go)."""
        self._conn.close()


class Connection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False  # reading paused: too much buffered for a slow client
        self.complete = False
        self.keep_alive = False
        self.headers_done = False
        self.head_request = False
        self.body_framed = True  # content-length or chunked; False: the body ends when the server closes
        self.error: UpstreamError | None = None
        self.closed = False
        self.used = False  # has carried a request before
        self.admitted = False  # holds a slot of its pool (set once the connection is made)
        self.response: Response | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        # push mode
        self.sink: Callable[[bytes], bool] | None = None
        self.blocked = False
        self.done: asyncio.Future[None] | None = None
        self.last_data = 0.0
        self.idle_timeout = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.error = BrokenOff(f"the server sent an invalid HTTP response ({e})")
            self.close()
            if self.sink is not None:
                self._finish(self.error)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.admitted:
            self.admitted = False
            self.pool.gone(self)
        if self.headers_done and not self.complete and not self.body_framed:
            self.on_message_complete()  # a body without length or chunks ends where the connection does
        if not self.complete and self.error is None:
            self.error = BrokenOff("the server closed the connection")
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self.sink is not None and not (self.complete and not self.chunks):
            self._finish(self.error or BrokenOff("the server closed the connection"))

    def pause_writing(self) -> None:
        self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # -- httptools callbacks ------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # trailers (headers after a chunked body) are dropped
            self.response.headers.append((name.lower(), value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        response.status = self.parser.get_status_code()
        self.headers_done = True
        names = {k for k, _ in response.headers}
        self.body_framed = (b"content-length" in names or b"transfer-encoding" in names
                            or response.status in (204, 304) or response.status < 200)
        if self.head_request:  # no body follows, whatever content-length says; the parser cannot be told
            self.body_framed = True
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        if self.sink is not None and not self.blocked and not self.chunks:
            try:
                if not self.sink(body):
                    self.block()
            except Exception as e:  # the client side failed: stop reading, give up the request
                self._finish(ClientGone(f"forwarding failed: {e}"))
                self.close()
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > MAX_BUFFERED and not self.paused:
            self.paused = True
            self.pause_reading()

    def on_message_complete(self) -> None:
        if self.complete:
            return
        self.complete = True
        # asked here: once the callback returns, httptools has reset its state and says False
        self.keep_alive = self.headers_done and not self.head_request and self.parser.should_keep_alive()
        if self.sink is not None and not self.blocked and not self.chunks:
            self._finish(None)

    # -- push mode ----------------------------------------------------------------------------------------
    def push(self, sink: Callable[[bytes], bool], idle_timeout: float) -> asyncio.Future[None]:
        self.sink, self.idle_timeout = sink, idle_timeout
        self.done = done = self.loop.create_future()
        self.last_data = self.loop.time()
        self._watchdog = self.loop.call_later(idle_timeout / 2, self._watch)
        if self.paused:
            self.paused = False
            self.resume_reading()
        if self.error is not None and not self.complete:
            self._finish(self.error)
        else:
            self.unblock()  # what arrived before the switch goes first
        return done

    def block(self) -> None:
        self.blocked = True
        self.pause_reading()

    def unblock(self) -> None:
        """The sink can take more: first what was held back, then the network again."""
        if self.sink is None:
            return
        self.blocked = False
        while self.chunks and not self.blocked:
            data = self.chunks.popleft()
            self.buffered -= len(data)
            if not self.sink(data):
                self.blocked = True
        if self.blocked:
            return
        if self.complete:
            self._finish(None)
        else:
            self.resume_reading()

    def _watch(self) -> None:
        if self.done is None or self.done.done():
            return
        if not self.blocked and self.loop.time() - self.last_data > self.idle_timeout:
            self._finish(IdleTimeout(f"no data from the server for {self.idle_timeout:.0f}s"))
            self.close()
            return
        self._watchdog = self.loop.call_later(self.idle_timeout / 2, self._watch)

    def _finish(self, error: UpstreamError | None) -> None:
        done, self.done = self.done, None
        self.sink = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if done is None or done.done():
            return
        if error is None:
            done.set_result(None)
            self.release()
        else:
            done.set_exception(error)

    # -- use ----------------------------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float, on_timeout: type[UpstreamError]) -> None:
        """Until something arrives (or the connection ends); ON_TIMEOUT is raised after TIMEOUT seconds of
        nothing, and the connection is closed."""
        self._waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._timeout, self._waiter)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._timed_out:
            self._timed_out = False
            self.close()
            raise on_timeout(f"no data from the server for {timeout:.0f}s")

    _timed_out = False

    def _timeout(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._timed_out = True
            waiter.set_result(None)

    async def drain(self) -> None:
        """Until the kernel takes more of what was written (uploads wait for a slow server here)."""
        if self._drain is not None:
            await self._drain

    def start(self, head: bytes, body: bytes, method: str) -> Response:
        self.response = Response(self)
        self.chunks.clear()
        self.buffered = 0
        self.complete = self.headers_done = self.blocked = self.keep_alive = False
        self.head_request = method == "HEAD"
        self.error = None
        self.parser = httptools.HttpResponseParser(self)
        assert self.transport is not None
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)
        return self.response

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def release(self) -> None:
        """The response was read to its end: back to the pool, if the server keeps the connection open.
        llama-server closes the connection after a streamed (chunked) response without saying so: those
        connections are not reused; nor those after a HEAD or an unframed body."""
        response = self.response
        chunked = response is None or any(k == b"transfer-encoding" for k, _ in response.headers)
        if not self.closed and not chunked and self.keep_alive and self.body_framed and not self.paused:
            self.used = True
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()  # at once, no lingering: the server must see the client go


class Pool:
    """Connections to one server address, at most LIMIT open at once (busy or idle); requests beyond it wait
    here for one, at most `queue_timeout` seconds. LIMIT should be the server's HTTP thread count: llama-server
    (cpp-httplib) gives each open connection a thread until it closes or idles out, and connections beyond its
    threads would only wait in its accept queue — better to wait here, where a client that goes away simply
    stops waiting.

    `slots` counts connections open or being opened. A slot changes hands without being counted down: a
    closing connection hands its slot (None) to the first waiting request, a finished one hands itself."""

    def __init__(self, host: str, port: int, limit: int = 8, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.tls = tls  # an https server's: how it is verified
        self.idle: list[tuple[Connection, float]] = []
        self.slots = 0
        self.waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self.host_header = f"{host}:{port}".encode()

    async def get(self, connect_timeout: float, queue_timeout: float, fresh: bool = False) -> Connection:
        now = time.monotonic()
        while self.idle and not fresh:
            conn, since = self.idle.pop()
            if not conn.closed and now - since < IDLE_REUSE:
                return conn
            conn.close()  # its slot comes back when it is gone
        if self.slots < self.limit:
            self.slots += 1
        else:
            handed = await self._wait(queue_timeout)
            if handed is not None:
                return handed  # a connection that just finished, with its slot
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(self), self.host, self.port, ssl=self.tls,
                                       server_hostname=self.host if self.tls is not None else None), connect_timeout)
        except BaseException as e:
            self._free_slot()
            if isinstance(e, TimeoutError):
                raise ConnectFailed(f"connecting timed out after {connect_timeout:.0f}s") from None
            if isinstance(e, OSError):
                raise ConnectFailed(f"cannot connect: {e.strerror or type(e).__name__}") from None
            raise
        conn.admitted = True
        return conn

    async def _wait(self, timeout: float) -> Connection | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Connection | None] = loop.create_future()
        self.waiters.append(waiter)

        def expire() -> None:
            if not waiter.done():
                waiter.set_exception(QueueTimeout(f"all {self.limit} connections to the server stayed busy for "
                                                  f"{timeout:.0f}s"))

        timer = loop.call_later(timeout, expire)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._hand(waiter.result())  # handed to us just as we gave up: on to the next
            raise
        finally:
            timer.cancel()

    def put(self, conn: Connection) -> None:
        """A connection free for the next request: to a waiting request, or idle."""
        self._hand(conn)

    def gone(self, conn: Connection) -> None:
        """A connection closed: off the idle list, and its slot to a waiting request or back."""
        self.idle = [(c, t) for c, t in self.idle if c is not conn]
        self._free_slot()

    def _hand(self, conn: Connection | None) -> None:
        if conn is None:
            self._free_slot()
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append((conn, time.monotonic()))

    def _free_slot(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot is the waiter's now
                return
        self.slots -= 1

    def close(self) -> None:
        for conn, _ in list(self.idle):
            conn.close()


class Client:
    def __init__(self, connect_timeout: float = 5, first_byte_timeout: float = 600, idle_timeout: float = 300,
                 queue_timeout: float = 30) -> None:
        self.connect_timeout, self.first_byte_timeout = connect_timeout, first_byte_timeout
        self.idle_timeout, self.queue_timeout = idle_timeout, queue_timeout
        self.pools: dict[tuple[str, int], Pool] = {}
        # the servers spoken to over TLS (remote https:// servers): (host, port) → how each is verified
        self.tls: dict[tuple[str, int], ssl.SSLContext] = {}

    def pool(self, host: str, port: int, limit: int = 8) -> Pool:
        p = self.pools.get((host, port))
        tls = self.tls.get((host, port))
        if p is None or p.tls is not tls:
            if p is not None:
                p.close()
            p = self.pools[(host, port)] = Pool(host, port, limit, tls)
        return p

    async def request(self, host: str, port: int, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"", body_stream: AsyncIterator[bytes] | None = None,
                      on_start: Callable[[Response], None] | None = None, limit: int = 8,
                      length: int | None = None) -> Response:
        """Send a request and return once the response's head is in. With BODY_STREAM the body is sent piece by
        piece (with backpressure): LENGTH bytes with a content-length, or chunked without LENGTH; else BODY in
        one piece. ON_START gets the response object as soon as the request is on its way (so it can be
        abandoned before its head arrives).

        Any failure closes the connection (its slot is given back at once). A request on a reused connection
        that the server had closed meanwhile is sent again on a new one, if its method is idempotent."""
        pool = self.pool(host, port, limit)
        for attempt in (1, 2):
            conn = await pool.get(self.connect_timeout, self.queue_timeout, fresh=attempt > 1)
            reused = conn.used
            try:
                return await self._exchange(conn, pool, method, target, headers, body, body_stream, on_start,
                                            length)
            except BrokenOff:
                if reused and attempt == 1 and method in IDEMPOTENT and body_stream is None and not conn.chunks:
                    continue
                raise
        raise AssertionError("unreachable")

    async def _exchange(self, conn: Connection, pool: Pool, method: str, target: bytes,
                        headers: list[tuple[bytes, bytes]], body: bytes, body_stream: AsyncIterator[bytes] | None,
                        on_start: Callable[[Response], None] | None, length: int | None = None) -> Response:
        lines = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", pool.host_header, b"\r\n"]
        for k, v in headers:
            lines += [k, b": ", v, b"\r\n"]
        try:
            if body_stream is None:
                lines += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n"]
                response = conn.start(b"".join(lines), body, method)
                if on_start:
                    on_start(response)
            else:
                chunked = length is None
                lines += [b"transfer-encoding: chunked\r\n\r\n"] if chunked else [
                    b"content-length: ", str(length).encode(), b"\r\n\r\n"]
                response = conn.start(b"".join(lines), b"", method)
                if on_start:
                    on_start(response)
                async for piece in body_stream:
                    if conn.closed:
                        break  # the server gave up on the upload (its answer, if any, is read below)
                    if piece:
                        conn.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                        await conn.drain()
                if not conn.closed and chunked:
                    conn.write(b"0\r\n\r\n")
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(self.first_byte_timeout, FirstByteTimeout)
        except BaseException:
            conn.close()
            raise
        return response

    def close(self) -> None:
        for p in self.pools.values():
            p.close()
