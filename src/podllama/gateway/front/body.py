"""Request bodies: received whole before anything is sent upstream (memory, then a temporary file), and what
they say about where they should go — the model they name, whether they carry image or audio parts, whether an
image request is within the gateway's limits. Every function here is linear in the body's size with small
constants: JSON up to EXACT_LIMIT is read by jsonbody.loads (capped in elements and depth); bigger bodies
(images, audio) are scanned with bounded patterns (a JSON parse of 16 MiB takes ~80 ms of one core, a scan
~8 ms). No pattern with overlapping repetition ever sees request data.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from . import jsonbody
from .client import BodyTooLarge, ClientGone
from .errors import Receive

EXACT_LIMIT = 1 << 20
_MEDIA = {"image_url": "vision", "input_image": "vision", "image": "vision", "input_video": "vision",
          "input_audio": "audio", "audio": "audio"}
# a string value of a "model" key; bounded so a failed match costs at most a few hundred bytes
_MODEL = re.compile(rb'"model"\s{0,64}:\s{0,64}"((?:[^"\\\x00-\x1f]|\\.){1,256})"')
_MEDIA_TYPE = re.compile(rb'"type"\s{0,64}:\s{0,64}"(image_url|input_image|image|input_video|input_audio|audio)"')
_BOUNDARY = re.compile(rb'boundary="?([^";,\s]{1,200})"?')


def media_role(body: dict[str, Any]) -> str | None:
    """'vision' or 'audio' when a chat/responses/messages body carries image or audio parts."""
    found = None
    items = body.get("messages") or (body.get("input") if isinstance(body.get("input"), list) else []) or []
    for message in items if isinstance(items, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            role = _MEDIA.get(str(part.get("type"))) if isinstance(part, dict) else None
            if role == "audio":
                return "audio"
            found = found or role
    return found


# a run of more than MAX_DEPTH opening brackets: too deep, whatever follows (for bodies too wide to parse here)
_NESTED = re.compile(rb"[\[{](?:[ \t\r\n]{0,8}[\[{]){%d}" % jsonbody.MAX_DEPTH)


def read_json(body: bytes) -> tuple[Any, jsonbody.JsonProblem | None]:
    """A JSON body the gateway forwards: (its value, None) when it was cheap to parse; (None, None) when it is
    not JSON, or too wide to parse here (the server judges those); (None, problem) when it nests deeper than
    the gateway lets through (llama-server's parser recurses)."""
    if len(body) > EXACT_LIMIT or jsonbody.elements(body) > jsonbody.MAX_ELEMENTS:
        if len(body) <= EXACT_LIMIT and _NESTED.search(body):
            return None, jsonbody.JsonProblem(400, f"the JSON body nests deeper than {jsonbody.MAX_DEPTH} levels")
        return None, None
    try:
        return jsonbody.loads(body), None
    except jsonbody.JsonProblem as e:
        return None, (e if e.status == 400 and "nests" in str(e) else None)


def inspect(content_type: bytes, body: bytes, multimodal: bool, data: Any = None) -> tuple[str | None, str | None]:
    """(model, media role) of a request body (DATA: the body parsed already, when it was); (None, None) where it
    names none or cannot be read."""
    if content_type.startswith(b"multipart/form-data"):
        return multipart_field(content_type, body, b"model"), None
    if data is None:
        if len(body) > EXACT_LIMIT or jsonbody.elements(body) > jsonbody.MAX_ELEMENTS:
            return _scan(body, multimodal)
        try:
            data = jsonbody.loads(body)
        except jsonbody.JsonProblem:
            return None, None  # not JSON: llama-server will say what is wrong with it
    if not isinstance(data, dict):
        return None, None
    model = data.get("model") if isinstance(data.get("model"), str) else None
    return model, media_role(data) if multimodal else None


def _scan(body: bytes, multimodal: bool) -> tuple[str | None, str | None]:
    m = _MODEL.search(body)
    model = None
    if m:
        try:
            model = json.loads(b'"' + m.group(1) + b'"')
        except ValueError:
            model = None
    media = None
    if multimodal:
        kinds = {_MEDIA[k.decode()] for k in _MEDIA_TYPE.findall(body)}
        media = "audio" if "audio" in kinds else "vision" if kinds else None
    return model, media


def multipart_field(content_type: bytes, body: bytes, name: bytes, limit: int = 1024) -> str | None:
    """The value of form field NAME in a multipart/form-data BODY (first LIMIT bytes), found by walking the
    parts with bytes.find: linear, whatever the body holds."""
    m = _BOUNDARY.search(content_type)
    if not m:
        return None
    delimiter = b"--" + m.group(1)
    wanted = re.compile(rb'(?:^|[;\s])name="' + re.escape(name) + rb'"')
    pos = body.find(delimiter)
    while pos != -1:
        head_start = pos + len(delimiter)
        if body[head_start:head_start + 2] == b"--":
            return None  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", head_start, head_start + 16384)
        if head_end == -1:
            return None  # no part head ends within 16 KiB: not a form a client sends
        following = body.find(b"\r\n" + delimiter, head_end + 4)
        if wanted.search(body, head_start, head_end):
            end = following if following != -1 else len(body)
            return body[head_end + 4:min(end, head_end + 4 + limit)].decode(errors="replace")
        pos = following + 2 if following != -1 else -1
    return None


# -- image requests, within the gateway's limits -----------------------------------------------------------------
EXTRA_OPEN, EXTRA_CLOSE = "<sd_cpp_extra_args>", "</sd_cpp_extra_args>"  # as sd-server finds them in a prompt


def extra_args(prompt: str) -> str | None:
    """The text between the first <sd_cpp_extra_args> and the next closing tag (found with str.find: linear,
    however many opening tags the prompt repeats)."""
    start = prompt.find(EXTRA_OPEN)
    if start == -1:
        return None
    end = prompt.find(EXTRA_CLOSE, start + len(EXTRA_OPEN))
    return prompt[start + len(EXTRA_OPEN):end] if end != -1 else None


def image_problem(content_type: bytes, body: bytes, max_images: int, max_side: int) -> str | None:
    """What in an image request (OpenAI `n` and `size`, AUTOMATIC1111 `batch_size`, `width`, `height` and
    hires sizes, and the `<sd_cpp_extra_args>` a prompt may carry) is over the gateway's limits or not a whole
    number; None when it is within them or is not readable (sd-server answers that itself)."""
    if content_type.startswith(b"multipart/form-data"):
        fields: dict[str, Any] = {k: v for k in ("n", "size", "prompt")
                                  if (v := multipart_field(content_type, body, k.encode(), limit=65536)) is not None}
    else:
        try:
            fields = jsonbody.loads(body)
        except jsonbody.JsonProblem as e:
            return None if e.status == 400 and "not JSON" in str(e) else str(e)  # sd-server says what is wrong
        if not isinstance(fields, dict):
            return None
    prompt = fields.get("prompt")
    extra = extra_args(prompt) if isinstance(prompt, str) else None
    try:
        extra_fields = jsonbody.loads(extra) if extra else {}
    except jsonbody.JsonProblem:
        extra_fields = {}  # sd-server refuses it
    extra_fields = extra_fields if isinstance(extra_fields, dict) else {}
    counts = {"n": fields.get("n"), "batch_size": fields.get("batch_size"),
              "batch_count": extra_fields.get("batch_count")}
    sides = {k: v for k, v in (("width", fields.get("width")), ("height", fields.get("height")),
                               ("hr_resize_x", fields.get("hr_resize_x")), ("hr_resize_y", fields.get("hr_resize_y")),
                               ("sd_cpp_extra_args width", extra_fields.get("width")),
                               ("sd_cpp_extra_args height", extra_fields.get("height")))}
    size = fields.get("size")
    if isinstance(size, str) and size != "auto":
        w, sep, h = size.partition("x")
        if not sep:
            return f"size must be WIDTHxHEIGHT (like 512x512), not {size[:40]!r}"
        sides |= {"size width": w, "size height": h}
    for name, value in (counts | sides).items():
        if value is None:
            continue
        number = _whole(value)
        if number is None or number < 1:
            return f"{name} must be a whole number of at least 1, not {str(value)[:40]!r}"
        if name in counts and number > max_images:
            return f"{name} {number} is over the {max_images} images a request may ask for ([gateway] max_images)"
        if name in sides and number > max_side:
            return (f"{name} {number} is over {max_side} pixels, the longest side an image may have "
                    "([gateway] max_image_side)")
    scale = fields.get("hr_scale") if fields.get("enable_hr") else None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        longest = max(_whole(fields.get(k)) or 512 for k in ("width", "height"))  # (sd-server's default: 512)
        if longest * scale > max_side:
            return (f"hr_scale {scale} makes a side of {longest * scale:.0f} pixels, over {max_side} "
                    "([gateway] max_image_side)")
    return None


def _whole(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) < 10:
        return int(value)
    return None


# -- the same questions of a body received whole (body.Spool), without holding the event loop ---------------------
OVERLAP = 1024  # bytes two scanned pieces share: longer than any match of _MODEL or _MEDIA_TYPE


def image_problem_file(path: str, content_type: bytes, max_images: int, max_side: int) -> str | None:
    """image_problem of the body in the file at PATH (run in the worker process: the file is read there)."""
    with open(path, "rb") as f:
        return image_problem(content_type, f.read(), max_images, max_side)


async def image_problem_of(content_type: bytes, spool: Spool, max_images: int, max_side: int) -> str | None:
    """image_problem of a received body: here when it is in memory, in the worker process when it is in a file
    (a multipart form's fields are looked for in its first and last MiB: they are small, the image is not)."""
    if spool.in_memory:
        return image_problem(content_type, spool.data(), max_images, max_side)
    if content_type.startswith(b"multipart/form-data"):
        return next(filter(None, (image_problem(content_type, part, max_images, max_side)
                                  for part in _form_ends(content_type, spool))), None)
    path = spool.path
    assert path is not None
    return await jsonbody.offload(image_problem_file, path, content_type, max_images, max_side)


def _form_ends(content_type: bytes, spool: Spool) -> tuple[bytes, bytes]:
    """The first and the last MiB of a multipart form in a file, the last from its first delimiter on: a form's
    small fields are in one of them, whatever order the client put its parts in; the big file is not read."""
    m = _BOUNDARY.search(content_type)
    tail = spool.tail()
    at = tail.find(b"\r\n--" + m.group(1)) if m else -1
    return spool.head(), tail[at + 2:] if at != -1 else b""


async def inspect_spool(content_type: bytes, spool: Spool, multimodal: bool, data: Any = None
                        ) -> tuple[str | None, str | None]:
    """inspect() of a received body; one in a file is read a piece at a time, the loop free between pieces."""
    if spool.in_memory:
        return inspect(content_type, spool.data(), multimodal, data)
    if content_type.startswith(b"multipart/form-data"):
        return next(filter(None, (multipart_field(content_type, part, b"model")
                                  for part in _form_ends(content_type, spool))), None), None
    model, kinds, carry = None, set(), b""
    for piece in spool.pieces():
        window = carry + piece
        if model is None:
            found, _ = _scan(window, False)
            model = found
        if multimodal:
            kinds |= {_MEDIA[k.decode()] for k in _MEDIA_TYPE.findall(window)}
        carry = window[-OVERLAP:]
        await asyncio.sleep(0)
    return model, "audio" if "audio" in kinds else "vision" if kinds else None


# -- receiving a request body whole, within limits ---------------------------------------------------------------
# (a body that stalls or trickles is cut off by the server protocol: gateway/server.py, body_timeout and
# min_body_rate)
SPOOL_MEMORY = 1 << 20  # bytes of a body kept in memory; the rest goes to a temporary file


def has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request says a body follows (a length above zero, or chunks)."""
    return any((k == b"content-length" and v != b"0") or k == b"transfer-encoding" for k, v in headers)


def too_large(limit: int, setting: str) -> str:
    size = f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit // 1024} KiB"
    return f"request body over {size} ({setting})"


def refused_by_head(headers: list[tuple[bytes, bytes]], limit: int, setting: str = "[gateway] max_body_mb"
                    ) -> tuple[int, str] | None:
    """(status, why) when a request's headers already refuse its body — longer than LIMIT, or compressed (it
    would be inflated past every limit by whoever reads it) — so it is answered before a byte is read."""
    for k, v in headers:
        if k == b"content-length" and (not v.isdigit() or int(v) > limit):
            return 413, too_large(limit, setting)
        if k == b"content-encoding" and v.strip().lower() != b"identity":
            return 415, "request bodies are taken uncompressed (no Content-Encoding)"
    return None


class Spool:
    """A request body received whole before anything goes upstream (nginx's proxy_request_buffering): in
    memory up to SPOOL_MEMORY bytes (kept as the pieces that came: a body of one piece is never copied), then in
    a temporary file (mode 0600, removed with close(); named, so the gateway's worker process can read it). It
    can be sent any number of times (a retry sends it again)."""

    def __init__(self, memory: int = SPOOL_MEMORY) -> None:
        self.memory = memory
        self.parts: list[bytes] = []
        self.file: IO[bytes] | None = None
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self.file is None and self.size + len(chunk) <= self.memory:
            self.size += len(chunk)
            if chunk:
                self.parts.append(chunk)
            return
        if self.file is None:
            self.file = tempfile.NamedTemporaryFile(prefix="podllama-body-")
            self.file.write(b"".join(self.parts))
            self.parts = []
        self.size += len(chunk)
        self.file.write(chunk)

    @property
    def in_memory(self) -> bool:
        return self.file is None

    @property
    def path(self) -> str | None:
        """The file holding the body (flushed), when it is not in memory."""
        if self.file is None:
            return None
        self.file.flush()
        return self.file.name

    def data(self) -> bytes:
        """The whole body, when it is in memory (b"" when it is in the file)."""
        if len(self.parts) > 1:
            self.parts = [b"".join(self.parts)]
        return self.parts[0] if self.parts else b""

    def pieces(self) -> Iterator[bytes]:
        if self.file is None:
            yield self.data()
            return
        self.file.flush()
        self.file.seek(0)
        while piece := self.file.read(jsonbody.PIECE):
            yield piece

    def head(self, size: int = SPOOL_MEMORY) -> bytes:
        """The first SIZE bytes."""
        if self.file is None:
            return self.data()[:size]
        self.file.flush()
        self.file.seek(0)
        return self.file.read(size)

    def tail(self, size: int = SPOOL_MEMORY) -> bytes:
        """The last SIZE bytes."""
        if self.file is None:
            return self.data()[-size:]
        self.file.flush()
        self.file.seek(max(0, self.size - size))
        return self.file.read(size)

    def whole(self) -> bytes:
        """Everything, read back into memory (for the few readers that need all of a large body)."""
        return b"".join(self.pieces())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


async def receive_whole(receive: Receive, limit: int, setting: str = "[gateway] max_body_mb") -> Spool:
    """The request body, all of it; ClientGone when the client leaves, BodyTooLarge past LIMIT bytes (its
    message names SETTING, what raises the limit). Nothing is sent anywhere until it is in."""
    spool = Spool()
    try:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone("the client went away while sending")
            chunk = msg.get("body", b"")
            if spool.size + len(chunk) > limit:
                raise BodyTooLarge(too_large(limit, setting))
            spool.write(chunk)
            if not msg.get("more_body"):
                return spool
    except BaseException:
        spool.close()
        raise


async def read_all(receive: Receive, limit: int, setting: str = "[gateway] max_body_mb") -> bytes:
    spool = await receive_whole(receive, limit, setting)
    try:
        return spool.whole()
    finally:
        spool.close()


def replay_pieces(pieces: Iterator[bytes], receive: Receive) -> Receive:
    """A `receive` that gives PIECES as the body, one message each (the event loop free between them), then
    hands on to RECEIVE."""
    pending = iter(pieces)
    queued = next(pending, None)

    async def replayed() -> dict[str, Any]:
        nonlocal queued
        if queued is None:
            return await receive()
        piece, queued = queued, next(pending, None)
        await asyncio.sleep(0)
        return {"type": "http.request", "body": piece, "more_body": queued is not None}

    return replayed


def replay(data: bytes, receive: Receive) -> Receive:
    """A `receive` that gives DATA as the whole body (already read), then hands on to RECEIVE, whose next
    message is the client going away."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    return replayed
