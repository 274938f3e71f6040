"""Counting an answer's tokens as it streams past: the server's own counts, wherever the chunks split them,
never a number the model wrote; the limits' windows on a clock of the test's own."""

from __future__ import annotations

import pytest

from podllama.gateway.quota import OverLimit, Quota
from podllama.gateway.tally import TAIL, Tally
from podllama.keys import Key


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
