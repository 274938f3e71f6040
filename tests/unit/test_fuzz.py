"""Property-based fuzzing (Hypothesis), time-boxed: the body inspectors and the HTTP front take any bytes and
answer in bounded time, never with a crash."""

from __future__ import annotations

import asyncio
import json
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from podllama.gateway.front import body as bodies
from podllama.gateway.front import jsonbody

JSON_TYPE = b"application/json"
MULTIPART = b"multipart/form-data; boundary=b"
FAST = 0.25  # seconds one inspection of at most 64 KiB may take, on a busy machine

# JSON-like text: the characters that steer parsers and patterns, in any order and count
steering = st.text(alphabet='{}[]":,\\ \n\tmodel<>/sd_cpp_extra_argstype0123456789ab\x00\xff', max_size=4096)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                           lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner,
                                                                                        max_size=6), max_leaves=60)


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    assert time.perf_counter() - t0 < FAST, f"{fn.__name__} took {time.perf_counter() - t0:.3f}s"
    return result


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=65536), steering.map(lambda s: s.encode(errors="replace")),
                 json_values.map(lambda v: json.dumps({"model": "m", "messages": [{"content": v}]}).encode())))
def test_the_body_inspectors_take_any_bytes(data):
    for ctype in (JSON_TYPE, MULTIPART, b"text/plain"):
        model, media = timed(bodies.inspect, ctype, data, True)
        assert model is None or isinstance(model, str)
        assert media in (None, "vision", "audio")
        assert timed(bodies.multipart_field, MULTIPART, data, b"model") is None or True
        problem = timed(bodies.image_problem, ctype, data, 4, 2048)
        assert problem is None or isinstance(problem, str)
    value, problem = timed(bodies.read_json, data)
    assert problem is None or problem.status == 400
    try:
        timed(jsonbody.loads, data)
    except jsonbody.JsonProblem as e:
        assert e.status in (400, 413)
    text = data.decode(errors="replace")
    assert timed(bodies.extra_args, text) is None or isinstance(bodies.extra_args(text), str)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=200_000), st.sampled_from(["[", "{\"a\":", "[1,"]))
def test_nesting_of_any_depth_is_a_400_or_fine(depth, opener):
    closer = {"[": "]", "{\"a\":": "}", "[1,": "]"}[opener]
    data = (opener * depth + "0" + closer * depth).encode()
    value, problem = timed(bodies.read_json, data)
    if depth > jsonbody.MAX_DEPTH:
        assert problem is not None and problem.status == 400 or value is None
    else:
        assert problem is None and value is not None


token = st.text(alphabet="!#$%&'*+-.^_`|~abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1,
                max_size=12)
header_value = st.binary(max_size=200).filter(lambda b: b"\r" not in b and b"\n" not in b)
path = st.binary(max_size=200).filter(lambda b: b" " not in b and b"\r" not in b and b"\n" not in b)


def test_the_http_front_answers_any_head_without_a_crash(gateway):
    gw = gateway()

    @settings(max_examples=80, deadline=None)
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"]) | token,
           target=path, headers=st.lists(st.tuples(token, header_value), max_size=8), body=st.binary(max_size=2048))
    def attack(method, target, headers, body):
        head = method.encode() + b" /" + target.lstrip(b"/") + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        head += b"".join(k.encode() + b": " + v + b"\r\n" for k, v in headers if k.lower() not in (
            "host", "content-length", "transfer-encoding"))
        answer = gw.raw(head + b"Content-Length: %d\r\n\r\n" % len(body) + body, timeout=5)
        if answer:  # no answer only where the parser closed on a malformed head
            assert answer.startswith(b"HTTP/1.1 "), answer[:80]
            assert answer[9:12] != b"500", (head, answer[:300])
        assert gw.get("/health").status_code == 200

    attack()


def test_a_big_form_in_a_file_is_read_at_its_ends_only():
    """A multipart form over the memory threshold: its model field and image limits are found whether the
    field comes before or after the big file part, and the file part itself is never read."""
    big = b"\x89PNG" + b"z" * (3 << 20)
    part = b'--b\r\nContent-Disposition: form-data; name="%b"%b\r\n\r\n%b\r\n'
    for fields_first in (True, False):
        fields = part % (b"model", b"", b"ears") + part % (b"n", b"", b"99")
        image = part % (b"image", b'; filename="a.png"', big)
        form = (fields + image if fields_first else image + fields) + b"--b--\r\n"
        spool = bodies.Spool()
        for i in range(0, len(form), 65536):
            spool.write(form[i:i + 65536])
        assert not spool.in_memory
        try:
            assert asyncio.run(bodies.inspect_spool(MULTIPART, spool, True)) == ("ears", None), fields_first
            problem = asyncio.run(bodies.image_problem_of(MULTIPART, spool, 4, 2048))
            assert problem is not None and "n 99" in problem, (fields_first, problem)
        finally:
            spool.close()
