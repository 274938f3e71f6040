"""A fast stand-in for llama-server, for measuring what the gateway itself costs: it answers /health and
/tokenize at once, and streams chat completions as llama-server does (one SSE event per write, chunked, the
connection closed at the end) as fast as it can, `max_tokens` events each. Runs in its own process.

    python bench/fakeupstream.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import httptools
import uvloop

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}],"object":"chat.completion.chunk"}\n\n'
SMALL = b'{"tokens":[9906,11,18504,0,2650,5043,527,499,3432,30]}'
# a non-streamed chat completion as llama-server answers it, with its usage and timings
ANSWER = (b'{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant","content":"Hi"}}],'
          b'"created":1763900000,"model":"tiny","system_fingerprint":"b1","object":"chat.completion",'
          b'"usage":{"completion_tokens":1,"prompt_tokens":12,"total_tokens":13},"id":"chatcmpl-x",'
          b'"timings":{"prompt_n":12,"prompt_ms":1.0,"predicted_n":1,"predicted_ms":0.5}}')


class Handler(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = b""

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        url, body = self.url, self.body
        self.url, self.body = b"", b""
        if url.startswith(b"/v1/chat/completions") and b'"stream": true' in body.replace(b'"stream":true', b'"stream": true'):
            n = json.loads(body).get("max_tokens", 64)
            asyncio.ensure_future(self.stream(n))
            return
        payload = b'{"status":"ok"}' if url.startswith(b"/health") else \
            ANSWER if url.startswith(b"/v1/chat/completions") else SMALL
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(payload), payload))

    async def stream(self, n: int) -> None:
        t = self.transport
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
        for _ in range(n):
            if t.is_closing():
                return
            t.write(chunk)
            await asyncio.sleep(0.0002)  # one event per write, as a generating server sends them
        done = b"data: [DONE]\n\n"
        t.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
        t.close()


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Handler, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
