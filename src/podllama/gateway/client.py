"""A small HTTP/1.1 client for talking to llama-servers: keep-alive pools per address, separate connect,
first-byte and idle timeouts (and no total one), bodies handed over chunk by chunk as they arrive, and
cancellation that closes the connection at once (which is what makes llama-server stop generating).

Built on asyncio protocols and httptools' parser (the one uvicorn uses) rather than a general client:
it is the gateway's hot path, and it forwards bytes with as little work per chunk as possible.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable

import httptools

MAX_BUFFERED = 1 << 20  # stop reading from the server while this much is waiting for a slow client
IDLE_REUSE = 3.0  # seconds an idle connection is reused; cpp-httplib closes idle ones after 5


class UpstreamError(Exception):
    """The server could not be reached, or broke off. `phase`: connect | first_byte | body."""

    def __init__(self, message: str, phase: str) -> None:
        super().__init__(message)
        self.phase = phase


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
                    conn.transport.resume_reading()
                yield data
                continue
            if conn.complete:
                conn.release()
                return
            if conn.error is not None:
                raise UpstreamError(str(conn.error), "body")
            await conn.wait(idle_timeout, "body")

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
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.complete = False
        self.headers_done = False
        self.error: BaseException | None = None
        self.closed = False
        self._counted_out = False  # its pool slot was given back
        self.response: Response | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.loop = asyncio.get_running_loop()
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
            self.error = e
            self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted_out:
            self._counted_out = True
            self.pool.idle = [(c, t) for c, t in self.pool.idle if c is not self]
            self.pool.dropped()
        self.closed = True
        if not self.complete and self.error is None:
            self.error = exc or ConnectionResetError("the server closed the connection")
        self._wake()
        if self.sink is not None and not (self.complete and not self.chunks):
            self._finish(UpstreamError(str(self.error or "the server closed the connection"), "body"))

    # -- httptools callbacks ------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers.append((name.lower(), value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        self.response.status = self.parser.get_status_code()  # type: ignore[union-attr]
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if self.sink is not None and not self.blocked and not self.chunks:
            try:
                if not self.sink(body):
                    self.block()
            except Exception as e:  # the client side failed: stop reading, give up the request
                self._finish(UpstreamError(f"forwarding failed: {e}", "body"))
                self.close()
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > MAX_BUFFERED and not self.paused:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self.complete = True
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
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.error is not None and not self.complete:
            self._finish(UpstreamError(str(self.error), "body"))
        else:
            self.unblock()  # what arrived before the switch goes first
        return done

    def block(self) -> None:
        self.blocked = True
        self.transport.pause_reading()  # type: ignore[union-attr]

    def unblock(self) -> None:
        """The sink can take more: first what was held back, then the network again."""
        self.blocked = False
        while self.chunks and not self.blocked:
            data = self.chunks.popleft()
            self.buffered -= len(data)
            if not self.sink(data):  # type: ignore[misc]
                self.blocked = True
        if self.blocked:
            return
        if self.complete:
            self._finish(None)
        elif not self.closed:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _watch(self) -> None:
        if self.done is None or self.done.done():
            return
        if not self.blocked and self.loop.time() - self.last_data > self.idle_timeout:
            self._finish(UpstreamError(f"no data from the server for {self.idle_timeout:.0f}s", "body"))
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
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float, phase: str) -> None:
        loop = self.loop
        self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._timeout, self._waiter)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self.error is not None and isinstance(self.error, TimeoutError):
            self.close()
            raise UpstreamError(f"no data from the server for {timeout:.0f}s", phase)

    def _timeout(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self.error = TimeoutError()
            waiter.set_result(None)

    def start(self, head: bytes, body: bytes) -> Response:
        self.response = Response(self)
        self.chunks.clear()
        self.buffered = 0
        self.complete = self.headers_done = self.blocked = False
        self.error = None
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(head + body if len(body) < 65536 else head)  # type: ignore[union-attr]
        if len(body) >= 65536:
            self.transport.write(body)  # type: ignore[union-attr]
        return self.response

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def release(self) -> None:
        """The response was read to its end: back to the pool, if the server keeps the connection open.
        llama-server closes the connection after a streamed (chunked) response without saying so: those
        connections are not reused."""
        chunked = any(k == b"transfer-encoding" for k, _ in self.response.headers) if self.response else True
        if not self.closed and not chunked and self.parser.should_keep_alive() and not self.paused:
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
    here for one. LIMIT should be the server's HTTP thread count: llama-server (cpp-httplib) gives each open
    connection a thread until it closes or idles out, and connections beyond its threads would only wait in
    its accept queue — better to wait here, where a client that goes away simply stops waiting."""

    def __init__(self, host: str, port: int, limit: int = 8) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[tuple[Connection, float]] = []
        self.open = 0
        self.waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self.host_header = f"{host}:{port}".encode()

    async def get(self, connect_timeout: float, fresh: bool = False) -> Connection:
        now = time.monotonic()
        while self.idle and not fresh:
            conn, since = self.idle.pop()
            if not conn.closed and now - since < IDLE_REUSE:
                return conn
            conn.close()  # gives its slot back (connection_lost → dropped)
        if self.open >= self.limit:
            waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._pass_on(waiter.result())  # a slot handed to us just as we gave up
                raise
            if handed is not None:
                return handed
        else:
            self.open += 1  # a slot of our own (a handed-over slot is already counted)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(self), self.host, self.port), connect_timeout)
        except TimeoutError:
            self.dropped()
            raise UpstreamError(f"connecting to {self.host}:{self.port} timed out after {connect_timeout:.0f}s",
                                "connect") from None
        except OSError as e:
            self.dropped()
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {e.strerror or e}", "connect") from None
        return conn

    def put(self, conn: Connection) -> None:
        """A connection free for the next request: to a waiting request, or idle."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append((conn, time.monotonic()))

    def dropped(self) -> None:
        """A connection closed (or never opened): its slot goes to a waiting request, or back."""
        self._pass_on(None)

    def _pass_on(self, conn: Connection | None) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is not None:
            self.idle.append((conn, time.monotonic()))
        else:
            self.open -= 1

    def close(self) -> None:
        for conn, _ in list(self.idle):
            conn.close()
        self.idle.clear()


class Client:
    def __init__(self, connect_timeout: float = 5, first_byte_timeout: float = 600, idle_timeout: float = 300) -> None:
        self.connect_timeout, self.first_byte_timeout, self.idle_timeout = connect_timeout, first_byte_timeout, idle_timeout
        self.pools: dict[tuple[str, int], Pool] = {}

    def pool(self, host: str, port: int, limit: int = 8) -> Pool:
        p = self.pools.get((host, port))
        if p is None:
            p = self.pools[(host, port)] = Pool(host, port, limit)
        return p

    async def request(self, host: str, port: int, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"", body_stream: AsyncIterator[bytes] | None = None,
                      on_start: Callable[[Response], None] | None = None, limit: int = 8) -> Response:
        """Send a request and return once the response's headers are in. With BODY_STREAM the body is sent
        chunked as it comes (uploads), else BODY in one piece. ON_START gets the response object as soon as
        the request is on its way (so it can be abandoned before its headers arrive)."""
        pool = self.pool(host, port, limit)
        for attempt in (1, 2):  # a pooled connection the server closed meanwhile gets one retry on a new one
            conn = await pool.get(self.connect_timeout, fresh=attempt > 1)
            reused = conn.response is not None
            lines = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", pool.host_header, b"\r\n"]
            for k, v in headers:
                lines += [k, b": ", v, b"\r\n"]
            if body_stream is None:
                lines += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n"]
                response = conn.start(b"".join(lines), body)
                if on_start:
                    on_start(response)
            else:
                lines.append(b"transfer-encoding: chunked\r\n\r\n")
                response = conn.start(b"".join(lines), b"")
                if on_start:
                    on_start(response)
                async for piece in body_stream:
                    if piece:
                        conn.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                conn.write(b"0\r\n\r\n")
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise UpstreamError(str(conn.error) or "the server closed the connection", "first_byte")
                    await conn.wait(self.first_byte_timeout, "first_byte")
            except UpstreamError as e:
                conn.close()
                if reused and attempt == 1 and not conn.chunks and body_stream is None and e.phase == "first_byte" \
                        and not isinstance(conn.error, TimeoutError):
                    continue
                raise
            return response
        raise AssertionError("unreachable")

    def close(self) -> None:
        for p in self.pools.values():
            p.close()
