"""An answer on its way to one client, decoupled from the server that writes it (nginx's proxy_buffering).

The server is read as fast as it writes; what the client has not taken yet waits here — in memory up to
MEMORY bytes, then in an unnamed temporary file — up to a cap. So the server's connection goes back to its pool
(and llama-server's slot to the next request) when the server is done, whatever the client does. A client that
reads nothing for `send_timeout` is closed by the server protocol (server.py); one that falls more than the cap
behind while the server still writes is closed here, and the server's connection with it, so llama-server
stops generating for nobody.
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
from collections.abc import Callable
from typing import IO, Any

from .client import ClientGone
from .errors import Send

MEMORY = 1 << 20  # bytes held in memory per client before the rest goes to a file
PIECE = 256 * 1024


def drive(coro: Any, resume: Callable[[], object]) -> bool:
    """Run an ASGI send() to completion right now if it does not have to wait (it waits only when the client
    reads slower than the server writes); else finish it when it can, then call RESUME. True: done now."""
    try:
        future = coro.send(None)
    except StopIteration:
        return True

    def later(_: object) -> None:
        if drive(coro, resume):
            resume()

    future.add_done_callback(later)
    return False


class Outbox:
    __slots__ = ("send", "cap", "memory", "chunks", "in_memory", "file", "read_at", "write_at", "busy", "closed",
                 "_idle")

    def __init__(self, send: Send, cap: int, memory: int = MEMORY) -> None:
        self.send, self.cap, self.memory = send, cap, memory
        self.chunks: collections.deque[bytes] = collections.deque()
        self.in_memory = 0
        self.file: IO[bytes] | None = None
        self.read_at = self.write_at = 0  # the file's unsent bytes lie between these offsets
        self.busy = False  # a send() is waiting for the client
        self.closed = False
        self._idle: asyncio.Future[None] | None = None

    @property
    def held(self) -> int:
        """Bytes the client has not taken yet."""
        return self.in_memory + self.write_at - self.read_at

    def put(self, chunk: bytes) -> bool:
        """A piece of the answer (the sink of Response.stream_to: it never asks the server to wait). Raises
        ClientGone when the client is more than the cap behind."""
        if self.closed:
            raise ClientGone("the client is gone")
        if not self.busy and not self.held:
            self._start(chunk)  # the client keeps up: straight on
            return True
        if self.held + len(chunk) > self.cap:
            raise ClientGone(f"the client fell more than {self.cap // 2**20} MiB behind the server "
                             "([gateway] answer_buffer_mb)")
        if self.file is None and self.in_memory + len(chunk) <= self.memory:
            self.chunks.append(chunk)
            self.in_memory += len(chunk)
        else:
            if self.file is None:
                self.file = tempfile.TemporaryFile(prefix="podllama-answer-")
            self.file.seek(self.write_at)
            self.file.write(chunk)
            self.write_at += len(chunk)
        return True

    def _take(self) -> bytes | None:
        if self.chunks:
            chunk = self.chunks.popleft()
            self.in_memory -= len(chunk)
            return chunk
        if self.file is not None and self.read_at < self.write_at:
            self.file.seek(self.read_at)
            chunk = self.file.read(min(PIECE, self.write_at - self.read_at))
            self.read_at += len(chunk)
            if self.read_at == self.write_at:  # all sent: back to memory for what comes next
                self.file.close()
                self.file, self.read_at, self.write_at = None, 0, 0
            return chunk
        return None

    def _start(self, chunk: bytes) -> None:
        self.busy = True
        if drive(self.send({"type": "http.response.body", "body": chunk, "more_body": True}), self._sent):
            self.busy = False

    def _sent(self) -> None:
        self.busy = False
        while not self.busy and not self.closed:
            chunk = self._take()
            if chunk is None:
                break
            self._start(chunk)
        if not self.busy and (self.closed or not self.held) and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def flush(self) -> None:
        """Until the client has taken everything (or is gone: close())."""
        if self.busy or self.held:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def close(self) -> None:
        """The client is gone: nothing more is sent; what was held is dropped."""
        self.closed = True
        self.chunks.clear()
        self.in_memory = 0
        if self.file is not None:
            self.file.close()
            self.file, self.read_at, self.write_at = None, 0, 0
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
