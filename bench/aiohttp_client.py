"""aiohttp's client behind the interface of the gateway's own upstream client (podllama.gateway.front.client), so
bench/gateway.py can run the same gateway with either and compare them in one run. Bench code only: the
gateway keeps whichever measures faster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp

from podllama.gateway.front.client import (
    BrokenOff,
    ClientGone,
    ConnectFailed,
    FirstByteTimeout,
    IdleTimeout,
    UpstreamError,
)


class AiohttpResponse:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: list[tuple[bytes, bytes]] = [(k.lower(), v) for k, v in resp.raw_headers]
        self._go = asyncio.Event()
        self._go.set()

    async def stream_to(self, sink: Callable[[bytes], bool], idle_timeout: float) -> None:
        try:
            while True:
                async with asyncio.timeout(idle_timeout):
                    chunk = await self._resp.content.readany()
                if not chunk:
                    break
                if not sink(chunk):
                    self._go.clear()
                    await self._go.wait()
        except TimeoutError:
            raise IdleTimeout(f"no data from the server for {idle_timeout:.0f}s") from None
        except aiohttp.ClientError as e:
            raise BrokenOff(f"the server broke off ({type(e).__name__})") from None
        finally:
            self._resp.release()

    def resume(self) -> None:
        self._go.set()

    def close(self) -> None:
        self._resp.close()


class AiohttpClient:
    """The gateway's Client interface over aiohttp: per server address, LIMIT connections, in two sessions:
    one that keeps connections for reuse, and one that does not, for streamed requests — llama-server closes
    the connection after a streamed (chunked) response without saying so, and aiohttp would hand it to the
    next request the moment the body ends (podllama's client never reuses those either)."""

    def __init__(self) -> None:
        self.connect_timeout, self.first_byte_timeout, self.idle_timeout, self.queue_timeout = 5.0, 600.0, 300.0, 30.0
        self.sessions: dict[tuple[str, int, bool], aiohttp.ClientSession] = {}
        self.pools: dict[tuple[str, int], object] = {}

    def _session(self, host: str, port: int, limit: int, streamed: bool) -> aiohttp.ClientSession:
        s = self.sessions.get((host, port, streamed))
        if s is None:
            connector = (aiohttp.TCPConnector(limit=limit, force_close=True) if streamed
                         else aiohttp.TCPConnector(limit=limit, keepalive_timeout=3))
            s = self.sessions[(host, port, streamed)] = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return s

    async def request(self, host: str, port: int, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"", body_stream: AsyncIterator[bytes] | None = None,
                      on_start: Callable[[AiohttpResponse], None] | None = None, limit: int = 8) -> AiohttpResponse:
        streamed = b'"stream": true' in body or b'"stream":true' in body
        session = self._session(host, port, limit, streamed)
        timeout = aiohttp.ClientTimeout(total=None, connect=self.queue_timeout + self.connect_timeout,
                                        sock_connect=self.connect_timeout, sock_read=self.first_byte_timeout)
        try:
            resp = await session.request(
                method, f"http://{host}:{port}{target.decode('latin-1')}",
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                data=body_stream if body_stream is not None else body, timeout=timeout, allow_redirects=False)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            raise ConnectFailed(f"cannot connect ({type(e).__name__})") from None
        except TimeoutError:
            raise FirstByteTimeout(f"no data from the server for {self.first_byte_timeout:.0f}s") from None
        except UpstreamError:
            raise
        except aiohttp.ClientError as e:
            raise BrokenOff(f"the server broke off ({type(e).__name__}: {e})") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the body stream's own errors (client gone, too large)
            raise ClientGone(str(e)) from None
        response = AiohttpResponse(resp)
        if on_start:
            on_start(response)
        return response

    def close(self) -> None:
        for s in self.sessions.values():
            asyncio.ensure_future(s.close())
