"""What an answer held, counted as it streams past: its bytes, its server-sent events and the token counts
the server reported, for every answer shape the route table can produce (Endpoint.answer).

Each shape has its reader: the pairs of (prompt, completion) names its server reports, looked for in the
answer's last TAIL bytes (where whole answers and the last events of a stream put them) and its first HEAD
bytes (where an Anthropic stream's `message_start` puts the prompt's count):
- openai (chat, completions): `usage.prompt_tokens`/`completion_tokens`, else llama-server's `timings`
  (`prompt_n`, `predicted_n`);
- anthropic (messages) and responses: `input_tokens`/`output_tokens`;
- native (/completion, /infill): `tokens_evaluated`/`tokens_predicted`, else `timings`;
- embedding, rerank: `prompt_tokens` (no completion);
- count (token counting routes), image, speech, transcription, none: no tokens are generated.
A stream that reports none is counted by its events (one token each; the prompt unknown). An answer with a
content encoding (a remote server that compresses whatever it is asked) is decoded for counting, up to
DECODE_LIMIT bytes. With KEEP, the first KEEP bytes of the answer are kept as well, for the request log.
"""

from __future__ import annotations

import re
import zlib

TAIL = 16 * 1024
HEAD = 4 * 1024
DECODE_LIMIT = 64 << 20  # decoded bytes read from a compressed answer before counting gives up
_NAMES = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "prompt_n", "predicted_n",
          "tokens_evaluated", "tokens_predicted")
_NUMBERS = {name: re.compile(rb'"' + name.encode() + rb'"\s{0,16}:\s{0,16}(\d{1,12})') for name in _NAMES}
_TIMINGS = ("prompt_n", "predicted_n")
# answer shape → the (prompt, completion) name pairs its server reports, best first; () : no tokens
READERS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "openai": (("prompt_tokens", "completion_tokens"), _TIMINGS, ("tokens_evaluated", "tokens_predicted")),
    "anthropic": (("input_tokens", "output_tokens"), _TIMINGS),
    "responses": (("input_tokens", "output_tokens"), ("prompt_tokens", "completion_tokens"), _TIMINGS),
    "native": (("tokens_evaluated", "tokens_predicted"), _TIMINGS, ("prompt_tokens", "completion_tokens")),
    "embedding": (("prompt_tokens", None),),
    "rerank": (("prompt_tokens", None),),
    "count": (), "image": (), "speech": (), "transcription": (), "none": (),
}
GENERATES = frozenset({"openai", "anthropic", "responses", "native"})  # shapes whose streams are counted by events
ANY = "any"  # an answer of unknown shape (a passthrough): every reader, in this order
_ANY_PAIRS = tuple(dict.fromkeys(p for shape in ("openai", "anthropic", "native") for p in READERS[shape]))


class Tally:
    __slots__ = ("size", "events", "tail", "head", "keep", "kept", "shape", "sse", "_before", "_decoder",
                 "_decoded")

    def __init__(self, keep: int = 0, shape: str = ANY) -> None:
        self.size = 0
        self.events = 0
        self.tail = bytearray()
        self.head = bytearray()
        self.keep = keep
        self.kept = bytearray()
        self.shape = shape
        self.sse = False
        self._before = b"\n"  # the stream's last bytes before this chunk (an event may begin across two)
        self._decoder: zlib._Decompress | None = None
        self._decoded = 0

    def begin(self, headers: list[tuple[bytes, bytes]]) -> None:
        """The answer's headers: an event stream, a content encoding."""
        for k, v in headers:
            if k == b"content-type":
                self.sse = v.startswith(b"text/event-stream")
            elif k == b"content-encoding" and v.strip().lower() in (b"gzip", b"deflate", b"x-gzip"):
                self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, told by the header

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if len(self.kept) < self.keep:
            self.kept += chunk[: self.keep - len(self.kept)]
        if self._decoder is not None:
            chunk = self._decode(chunk)
        joined = self._before + chunk[:5]  # "\ndata:" is 6 bytes: at most 5 of it came before
        self.events += joined.count(b"\ndata:") + chunk.count(b"\ndata:")
        self._before = (self._before + chunk)[-5:]
        if len(self.head) < HEAD:
            self.head += chunk[: HEAD - len(self.head)]
        self.tail += chunk
        if len(self.tail) > 2 * TAIL:
            del self.tail[:-TAIL]

    def _decode(self, chunk: bytes) -> bytes:
        decoder = self._decoder
        assert decoder is not None
        room = DECODE_LIMIT - self._decoded
        try:
            out = decoder.decompress(chunk, room) if room > 0 else b""
        except zlib.error:
            out = b""
        if room <= 0 or len(out) >= room or decoder.unconsumed_tail:
            self._decoder = None  # past the limit (or a bomb): what was read so far is all that is counted
            self.tail.clear()
        self._decoded += len(out)
        return out

    def tokens(self, sse: bool | None = None) -> tuple[int | None, int | None]:
        """(prompt tokens, completion tokens) as the server reported them; None where it did not."""
        sse = self.sse if sse is None else sse
        tail, head = bytes(self.tail[-TAIL:]), bytes(self.head)
        for prompt_name, completion_name in _ANY_PAIRS if self.shape == ANY else READERS[self.shape]:
            prompt = _last(prompt_name, tail)
            if prompt is None:
                prompt = _last(prompt_name, head)
            completion = _last(completion_name, tail) if completion_name else None
            if prompt is not None or completion is not None:
                return prompt, completion
        if sse and self.events and (self.shape == ANY or self.shape in GENERATES):
            done = 1 if b"data: [DONE]" in tail else 0
            return None, max(0, self.events - done)
        return None, None


def _last(name: str, data: bytes) -> int | None:
    matches = _NUMBERS[name].findall(data)
    return int(matches[-1]) if matches else None
