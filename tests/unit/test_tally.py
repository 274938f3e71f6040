"""Counting an answer's tokens as it streams past: the server's own counts, wherever the chunks split them,
never a number the model wrote; the limits' windows on a clock of the test's own."""

from __future__ import annotations

import gzip
import json

import pytest

from podllama.access.keys import Key
from podllama.gateway.routing.quota import OverLimit, Quota
from podllama.gateway.routing.routes import ENDPOINTS
from podllama.gateway.routing.tally import DECODE_LIMIT, READERS, TAIL, Tally


def fed(data: bytes, piece: int) -> Tally:
    t = Tally()
    for i in range(0, len(data), piece):
        t.feed(data[i:i + piece])
    return t


def test_the_servers_counts_are_found_however_the_chunks_fall():
    tricky = b'"content":"say \\"prompt_tokens\\": 999 and \\"completion_tokens\\":999"'
    answer = (b'{"choices":[{"message":{' + tricky + b'}}],"usage":{"completion_tokens":12,"prompt_tokens":34,'
              b'"total_tokens":46,"prompt_tokens_details":{"cached_tokens":5}},"timings":{"prompt_n":1,"predicted_n":2}}')
    for piece in (1, 7, 64, len(answer)):
        assert fed(answer, piece).tokens(sse=False) == (34, 12), piece
    assert fed(b'{"content":"x","tokens_evaluated":9,"tokens_predicted":3}', 5).tokens(sse=False) == (9, 3)
    assert fed(b'data: {"timings":{"prompt_n":4,"predicted_n":6}}\n\ndata: [DONE]\n\n', 3).tokens(sse=True) == (4, 6)
    assert fed(b'{"object":"list","usage":{"prompt_tokens":8,"total_tokens":8}}', 4).tokens(sse=False) == (8, None)


def test_a_stream_without_counts_is_counted_by_its_events():
    stream = b"".join(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n' for _ in range(9)) + b"data: [DONE]\n\n"
    for piece in (1, 5, 50, len(stream)):
        t = fed(stream, piece)
        assert t.tokens(sse=True) == (None, 9) and t.size == len(stream), piece
    assert Tally().tokens(sse=False) == (None, None)


def test_only_the_tail_is_kept_and_the_first_bytes_when_asked():
    t = Tally(keep=10)
    for _ in range(100):
        t.feed(b"x" * 1000)
    t.feed(b'"usage":{"prompt_tokens":1,"completion_tokens":2}')
    assert len(t.tail) <= 2 * TAIL and t.tokens(sse=False) == (1, 2) and bytes(t.kept) == b"x" * 10


def test_limits_slide_with_the_clock():
    now = [1000.0]
    q = Quota(clock=lambda: now[0])
    key = Key("key_1", "k", "pk-", rpm=3, tpm=100, concurrency=2)
    a = q.admit(key)
    now[0] = 1005.0
    b = q.admit(key)
    assert a is not None and b is not None
    with pytest.raises(OverLimit, match="concurrency 2") as e:
        q.admit(key)
    assert e.value.retry_after == 1
    a.tokens, b.tokens = 60, 50
    q.done(key, a)
    q.done(key, b)
    now[0] = 1010.0
    with pytest.raises(OverLimit, match="110 tokens") as e:  # 110 of 100 used
        q.admit(key)
    assert e.value.retry_after == 50  # when a's 60 leave the window
    now[0] = 1060.5
    for _ in range(2):  # a has left: b, and these two
        q.done(key, q.admit(key))
    with pytest.raises(OverLimit, match="rpm 3") as e:
        q.admit(key)
    assert e.value.retry_after == 5  # when b leaves
    q.seed([("key_2", now[0] - 5, 10), ("key_2", now[0] - 90, 10)])
    assert len(q.windows["key_2"].uses) == 1  # only the last minute
    assert q.admit(Key("key_3", "free", "pk-")) is None  # no limits: nothing counted


# -- one reader per answer shape, chosen from the route table -------------------------------------------------------
def sse_of(*payloads: dict, done: bool = True) -> bytes:
    return b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads) + (b"data: [DONE]\n\n" if done else b"")


FILLER = [{"choices": [{"delta": {"content": "x" * 200}}]}] * 200  # pushes the start of a stream out of the tail
# answer shape → (a whole answer, a streamed answer), each reporting 3 prompt and 5 completion tokens as its
# server does
SAMPLES: dict[str, tuple[bytes, bytes]] = {
    "openai": (json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}).encode(),
               sse_of(*FILLER, {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}})),
    "anthropic": (json.dumps({"type": "message", "usage": {"input_tokens": 3, "output_tokens": 5}}).encode(),
                  sse_of({"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}},
                         *FILLER, {"type": "message_delta", "usage": {"output_tokens": 5}}, done=False)),
    "responses": (json.dumps({"object": "response", "usage": {"input_tokens": 3, "output_tokens": 5}}).encode(),
                  sse_of(*FILLER, {"type": "response.completed", "response": {
                      "usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}}}, done=False)),
    "native": (json.dumps({"content": "x", "tokens_evaluated": 3, "tokens_predicted": 5}).encode(),
               sse_of(*FILLER, {"content": "", "stop": True, "tokens_evaluated": 3, "tokens_predicted": 5})),
    "embedding": (json.dumps({"data": [], "usage": {"prompt_tokens": 3, "total_tokens": 3}}).encode(), b""),
    "rerank": (json.dumps({"results": [], "usage": {"prompt_tokens": 3, "total_tokens": 3}}).encode(), b""),
}
EXPECTED = {"embedding": (3, None), "rerank": (3, None)}


def test_every_route_that_makes_tokens_has_a_reader():
    """Walks the route table: a route whose server generates or embeds must name an answer shape whose reader
    finds that shape's counts, whole and streamed; a new such route without one fails here."""
    for ep in ENDPOINTS:
        assert ep.answer in READERS, (ep.name, ep.answer)
        # generation (a route that can stream text), embeddings and rerank are where tokens are made and billed
        makes_tokens = ep.scope == "model" and (ep.capability in ("embedding", "rerank") or (
            ep.streams and ep.capability in ("generate", "infill")))
        if makes_tokens:
            assert READERS[ep.answer], f"{ep.name}: its answers carry tokens but its shape '{ep.answer}' reads none"
            assert ep.answer in SAMPLES, f"{ep.name}: no sample answer of shape '{ep.answer}' to check its reader"
    for shape, (whole, streamed) in SAMPLES.items():
        want = EXPECTED.get(shape, (3, 5))
        t = Tally(shape=shape)
        t.feed(whole)
        assert t.tokens(sse=False) == want, (shape, "whole")
        if streamed:
            for piece in (7, 1000):
                t = fed_shape(streamed, piece, shape)
                assert t.tokens(sse=True) == want, (shape, "streamed", piece)


def fed_shape(data: bytes, piece: int, shape: str, headers: list | None = None) -> Tally:
    t = Tally(shape=shape)
    t.begin(headers or [(b"content-type", b"text/event-stream")])
    for i in range(0, len(data), piece):
        t.feed(data[i:i + piece])
    return t


def test_a_compressed_answer_is_counted():
    whole, streamed = SAMPLES["openai"]
    t = fed_shape(gzip.compress(streamed), 50, "openai", [(b"content-type", b"text/event-stream"),
                                                          (b"content-encoding", b"gzip")])
    assert t.tokens() == (3, 5)
    bomb = gzip.compress(b"0" * (DECODE_LIMIT + 1000))
    t = fed_shape(bomb, 1 << 16, "openai", [(b"content-encoding", b"gzip")])
    assert t.tokens() == (None, None), "past the decode limit nothing more is read"


def test_image_speech_and_count_answers_report_no_tokens():
    for shape in ("image", "speech", "transcription", "count", "none"):
        t = Tally(shape=shape)
        t.feed(json.dumps({"usage": {"prompt_tokens": 9, "completion_tokens": 9}}).encode())
        assert t.tokens(sse=False) == (None, None), shape
