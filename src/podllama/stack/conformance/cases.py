"""What the conformance check replays: built-in cases per role, as data, and what kind of answer each path gives
(which decides how two answers are compared). Every body is made deterministic before it is sent: temperature
0, a fixed seed, a bounded length."""

from __future__ import annotations

import base64
import io
import math
import struct
import wave
import zlib
from dataclasses import dataclass, field
from typing import Any

from ...config import ServerSection

SEED = 1234
MAX_TOKENS = 48  # a replayed answer is cut here: enough to compare, short enough for two cores

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
                 "required": ["answer"]}


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: dict[str, Any] = field(hash=False)

    @property
    def check(self) -> str:
        return check_of(self.path, self.body)


def check_of(path: str, body: dict[str, Any]) -> str:
    """How answers to PATH with BODY are compared (compare.CHECKS): by the endpoint, then what the body asks."""
    if path.endswith("/embeddings") or path == "/embedding":
        return "embedding"
    if path.endswith("rerank") or path.endswith("/reranking"):
        return "rerank"
    if body.get("stream"):
        return "stream"
    if path.endswith("/chat/completions") and body.get("tools"):
        return "tools"
    if path.endswith("/chat/completions") and isinstance(body.get("response_format"), dict) \
            and body["response_format"].get("type") in ("json_schema", "json_object"):
        return "json"
    return "text"


def deterministic(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """BODY made repeatable and short: temperature 0, the fixed seed, at most MAX_TOKENS, one choice."""
    out = dict(body)
    if check_of(path, body) in ("embedding", "rerank"):
        return out
    out |= {"temperature": 0, "seed": SEED, "n": 1}
    out.pop("model", None)  # the shadow serves one model; a name a client used means nothing to it
    for key in ("max_tokens", "max_completion_tokens", "n_predict"):
        if key in out:
            out[key] = min(int(out[key]) if isinstance(out[key], int) and out[key] > 0 else MAX_TOKENS, MAX_TOKENS)
    if not any(k in out for k in ("max_tokens", "max_completion_tokens", "n_predict")):
        out["n_predict" if path in ("/completion", "/infill") else "max_tokens"] = MAX_TOKENS
    return out


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


def tiny_png() -> str:
    """A 16×16 picture, left half red and right half blue, as a data URL (no file ships with it)."""
    row = b"\x00" + (b"\xff\x00\x00" * 8 + b"\x00\x00\xff" * 8)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(row * 16)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def tiny_wav() -> str:
    """Half a second of a 440 Hz tone, 16 kHz mono, base64 (as input_audio wants it)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / 16000)))
                               for i in range(8000)))
    return base64.b64encode(buf.getvalue()).decode()


CHAT = "/v1/chat/completions"
TEXT_CASES = [
    Case("chat", CHAT, _chat("Name three colours of the rainbow.")),
    Case("chat.stream", CHAT, _chat("Count from one to five.", stream=True)),
    Case("chat.tools", CHAT, _chat("What is the weather in Paris?", tools=[WEATHER_TOOL], tool_choice="required")),
    Case("chat.json", CHAT, _chat("Is water wet? Answer in JSON.",
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}})),
    Case("completion", "/completion", {"prompt": "The capital of France is"}),
]
# the built-in cases of each role (a server with an mmproj also gets its media cases, below)
BUILTIN: dict[str, list[Case]] = {
    "chat": TEXT_CASES,
    "vision": TEXT_CASES[:1],
    "audio": TEXT_CASES[:1],
    "embedding": [Case("embeddings", "/v1/embeddings", {"input": [
        "A cat sat on the mat.", "Stock markets fell sharply today.", "A kitten sleeps on a rug."]})],
    "rerank": [Case("rerank", "/v1/rerank", {"query": "What do cats eat?", "documents": [
        "Cats are carnivores and eat meat.", "The stock market closed higher.", "Kittens drink milk.",
        "Paris is the capital of France."]})],
    "infill": [Case("infill", "/infill", {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n\nprint(add(1, 2))\n"})],
}


def media_cases(role: str) -> list[Case]:
    """What a server with an mmproj is asked besides its text: a picture (vision), a sound (audio)."""
    if role == "audio":
        return [Case("audio", CHAT, {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What do you hear?"},
            {"type": "input_audio", "input_audio": {"data": tiny_wav(), "format": "wav"}}]}]})]
    return [Case("vision", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What colours are in this picture?"},
        {"type": "image_url", "image_url": {"url": tiny_png()}}]}]})]


def for_server(server: ServerSection) -> list[Case]:
    """The built-in cases of SERVER's role, with the media cases where it has a projector (a vision or audio
    server always does; a chat server where it names an mmproj)."""
    cases = list(BUILTIN.get(server.role, []))
    if server.role in ("vision", "audio") or (server.role == "chat" and server.mmproj):
        cases += media_cases(server.role)
    return cases
