"""JSON from a request, read in bounded time: the one place the gateway turns request bytes into objects.

A JSON parse costs about 150 ns of one core per element and holds the interpreter's lock throughout, so a
body of many small elements stalls the event loop whatever thread parses it (a worker thread does not help).
Three limits make every parse cheap or refused:
- **elements**: the structural characters (`,` `:` `[` `{`) are counted first (C speed, strings included, so
  it can only overestimate); more than MAX_ELEMENTS → 413. A real request has few: text and images are long
  strings, which cost little per byte.
- **depth**: more than MAX_DEPTH levels → 400 (never a RecursionError, never a 500).
- **size**: bodies up to 1 MiB (body.EXACT_LIMIT) are parsed on the event loop (under ~5 ms); bigger ones,
  which can only be a few long strings after the element check, in a worker process (`offload`), reading the
  body's temporary file there. What must be read whole (Ollama's requests) comes back thinned (Slim): its long
  strings stay in a file and are spliced back into the JSON made from it, a piece at a time, so no big string
  is ever made or copied on the event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

MAX_ELEMENTS = 50_000
MAX_DEPTH = 64
PIECE = 256 * 1024  # bytes per read when a body in a file is sent on (here and body.Spool)
T = TypeVar("T")


class JsonProblem(ValueError):
    """A body that is not JSON the gateway will read: STATUS (400 or 413) and a message naming the limit."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)  # both in args: it crosses from the worker process by pickle
        self.status, self.message = status, message

    def __str__(self) -> str:
        return self.message


def elements(data: bytes) -> int:
    """An upper bound on the JSON elements in DATA."""
    return data.count(b",") + data.count(b":") + data.count(b"[") + data.count(b"{")


def _depth_over(value: Any, limit: int) -> bool:
    """True when VALUE nests containers deeper than LIMIT (iterative: no recursion on hostile data)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def loads(data: bytes | str) -> Any:
    """DATA parsed, or JsonProblem: 413 past MAX_ELEMENTS, 400 when not JSON or deeper than MAX_DEPTH."""
    raw = data.encode() if isinstance(data, str) else data
    count = elements(raw)
    if count > MAX_ELEMENTS:
        raise JsonProblem(413, f"the JSON body has more than {MAX_ELEMENTS} elements (arrays, objects, values); "
                               "the gateway reads no more")
    try:
        value = json.loads(raw)
    except RecursionError:
        value, count = None, MAX_DEPTH + 1
    except ValueError as e:
        raise JsonProblem(400, f"the body is not JSON: {e}") from None
    if count > MAX_DEPTH and (value is None or _depth_over(value, MAX_DEPTH)):
        raise JsonProblem(400, f"the JSON body nests deeper than {MAX_DEPTH} levels")
    return value


_pool: concurrent.futures.ProcessPoolExecutor | None = None


def _worker() -> concurrent.futures.ProcessPoolExecutor:
    global _pool  # one worker process for the gateway's process, started on first use
    if _pool is None:
        _pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        atexit.register(_pool.shutdown, cancel_futures=True)  # before the interpreter tears its modules down
    return _pool


async def offload(fn: Callable[..., T], *args: Any) -> T:
    """FN(*ARGS) in the gateway's worker process (FN a module-level function; ARGS and the result small, or
    the cost of copying them comes back to the loop)."""
    return await asyncio.get_running_loop().run_in_executor(_worker(), fn, *args)


# -- a big body, thinned: its long strings stay in a file ----------------------------------------------------------
LONG = 64 * 1024  # characters of a string past which it is kept in the file
KEEP = 64  # characters of a long string kept in the value (its start says what it is: base64 of a PNG …)


@dataclass
class Slim:
    """A parsed body whose long strings are cut to their first KEEP characters plus a marker; the rest of each,
    JSON-escaped, lies in the file at PATH (removed by drop()). splice() puts them back into any JSON made from
    the value. Small to pickle, so it comes back from the worker process at no cost to the event loop."""

    value: Any
    path: str
    parts: dict[str, tuple[int, int]]  # marker → (offset, length) in the file

    def drop(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def splice(self, data: bytes) -> tuple[int, Iterator[bytes]]:
        """(length, pieces) of DATA — JSON made from the value — with every marker replaced by its rest."""
        cuts = sorted((at, marker) for marker in self.parts
                      if (at := data.find(marker.encode())) != -1)
        length = len(data) + sum(self.parts[m][1] - len(m) for _, m in cuts)

        def pieces() -> Iterator[bytes]:
            at = 0
            with open(self.path, "rb") as f:
                for where, marker in cuts:
                    yield data[at:where]
                    offset, size = self.parts[marker]
                    f.seek(offset)
                    while size > 0:
                        piece = f.read(min(size, PIECE))
                        if not piece:
                            break
                        size -= len(piece)
                        yield piece
                    at = where + len(marker)
            yield data[at:]

        return length, pieces()


def slim_file(path: str) -> Slim:
    """The body in the file at PATH, parsed (loads' limits) and thinned (run in the worker process)."""
    with open(path, "rb") as f:
        value = loads(f.read())
    out = tempfile.NamedTemporaryFile(prefix="podllama-slim-", delete=False)
    parts: dict[str, tuple[int, int]] = {}
    tag = uuid.uuid4().hex

    def thin(item: Any) -> Any:
        if isinstance(item, str) and len(item) > LONG:
            marker = f"~podllama-{tag}-{len(parts)}~"
            rest = json.dumps(item[KEEP:])[1:-1].encode()
            parts[marker] = (out.tell(), len(rest))
            out.write(rest)
            return item[:KEEP] + marker
        if isinstance(item, list):
            return [thin(i) for i in item]
        if isinstance(item, dict):
            return {k: thin(v) for k, v in item.items()}
        return item

    with out:
        value = thin(value)
    return Slim(value, out.name, parts)
