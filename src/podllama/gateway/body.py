"""What a request body says about where it should go: the model it names, and whether it carries image or
audio parts. Every function here is linear in the body's size and never blocks the event loop for long:
bodies up to EXACT_LIMIT are parsed as JSON; bigger ones (images, audio) are scanned with bounded patterns
(a JSON parse of 16 MiB takes ~80 ms of one core, a scan ~8 ms).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

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


def inspect(content_type: bytes, body: bytes, multimodal: bool) -> tuple[str | None, str | None]:
    """(model, media role) of a request body; (None, None) where it names none or cannot be read."""
    if content_type.startswith(b"multipart/form-data"):
        return multipart_field(content_type, body, b"model"), None
    if len(body) > EXACT_LIMIT:
        return _scan(body, multimodal)
    try:
        data = json.loads(body)
    except ValueError:
        return None, None  # llama-server will say what is wrong with it
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
_EXTRA_ARGS = re.compile(r"<sd_cpp_extra_args>(.*?)</sd_cpp_extra_args>")  # as sd-server finds them in a prompt


def image_problem(content_type: bytes, body: bytes, max_images: int, max_side: int) -> str | None:
    """What in an image request (OpenAI `n` and `size`, AUTOMATIC1111 `batch_size`, `width`, `height` and
    hires sizes, and the `<sd_cpp_extra_args>` a prompt may carry) is over the gateway's limits or not a whole
    number; None when it is within them or is not readable (sd-server answers that itself)."""
    if content_type.startswith(b"multipart/form-data"):
        fields: dict[str, Any] = {k: v for k in ("n", "size", "prompt")
                                  if (v := multipart_field(content_type, body, k.encode(), limit=65536)) is not None}
    else:
        try:
            fields = json.loads(body)
        except ValueError:
            return None
        if not isinstance(fields, dict):
            return None
    prompt = fields.get("prompt")
    extra = _EXTRA_ARGS.search(prompt) if isinstance(prompt, str) else None
    try:
        extra_args = json.loads(extra.group(1)) if extra else {}
    except ValueError:
        extra_args = {}  # sd-server refuses it
    extra_args = extra_args if isinstance(extra_args, dict) else {}
    counts = {"n": fields.get("n"), "batch_size": fields.get("batch_size"), "batch_count": extra_args.get("batch_count")}
    sides = {k: v for k, v in (("width", fields.get("width")), ("height", fields.get("height")),
                               ("hr_resize_x", fields.get("hr_resize_x")), ("hr_resize_y", fields.get("hr_resize_y")),
                               ("sd_cpp_extra_args width", extra_args.get("width")),
                               ("sd_cpp_extra_args height", extra_args.get("height")))}
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


# -- reading a request body, within limits ------------------------------------------------------------------------
# (a body that stalls is cut off by the server protocol: gateway/server.py, body_timeout)
def too_large(limit: int, setting: str) -> str:
    size = f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit // 1024} KiB"
    return f"request body over {size} ({setting})"


async def pieces(receive: Receive, limit: int, setting: str = "[gateway] max_body_mb") -> AsyncIterator[bytes]:
    """The request body as it arrives; ClientGone when the client leaves, BodyTooLarge past LIMIT bytes
    (its message names SETTING, what raises the limit)."""
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone("the client went away while sending")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(too_large(limit, setting))
        yield chunk
        if not msg.get("more_body"):
            return


async def read_all(receive: Receive, limit: int, setting: str = "[gateway] max_body_mb") -> bytes:
    return b"".join([chunk async for chunk in pieces(receive, limit, setting)])


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
