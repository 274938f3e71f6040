"""What a GGUF file says about itself: the key/value metadata of its header (architecture, chat template,
pooling type, sizes), read without numpy and without trusting the file — every length is bounded, and a
file that is not GGUF, or lies about its sizes, is an error naming the file.

Arrays (the tokenizer's vocabulary, mostly) are skipped, not kept: only their length is recorded, unless a
caller names the string arrays it needs (draft.py compares vocabularies). The tensor
directory that follows is read for where each tensor lies, which gives each one's size in bytes (memory.py
adds up the weights a device holds) without knowing any quantization format.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MAX_KEY = 1 << 16
MAX_STRING = 1 << 24  # a chat template is a few KiB; 16 MiB is plenty
MAX_KVS = 1 << 16
MAX_ARRAY = 1 << 28
MAX_TENSORS = 1 << 20
MAX_DIMS = 8
# value types: size in bytes, struct format
_SCALARS = {0: (1, "<B"), 1: (1, "<b"), 2: (2, "<H"), 3: (2, "<h"), 4: (4, "<I"), 5: (4, "<i"), 6: (4, "<f"),
            7: (1, "<?"), 10: (8, "<Q"), 11: (8, "<q"), 12: (8, "<d")}
STRING, ARRAY = 8, 9


class GGUFError(ValueError):
    pass


@dataclass
class Metadata:
    path: str
    version: int
    tensors: int
    values: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, int] = field(default_factory=dict)  # array key → its length
    lists: dict[str, list[str]] = field(default_factory=dict)  # the string arrays read() was asked to keep
    offsets: list[tuple[str, int]] = field(default_factory=list)  # tensor name → offset in the data section
    data_start: int = 0  # where the data section begins in the file
    size: int = 0  # the file's size

    def tensor_bytes(self) -> dict[str, int]:
        """Each tensor's size in bytes (padding included): the distance to the next tensor's data."""
        ordered = sorted(self.offsets, key=lambda t: t[1])
        end = self.size - self.data_start
        out = {}
        for i, (name, offset) in enumerate(ordered):
            out[name] = (ordered[i + 1][1] if i + 1 < len(ordered) else end) - offset
        return out

    @property
    def architecture(self) -> str | None:
        arch = self.values.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def chat_template(self) -> str | None:
        t = self.values.get("tokenizer.chat_template")
        return t if isinstance(t, str) and t.strip() else None

    def arch_value(self, key: str) -> Any:
        """`<architecture>.<key>`, e.g. arch_value("pooling_type")."""
        return self.values.get(f"{self.architecture}.{key}")

    @property
    def vocab_size(self) -> int:
        return self.arrays.get("tokenizer.ggml.tokens", 0)


class _Reader:
    def __init__(self, f: IO[bytes], path: Path) -> None:
        self.f, self.path = f, path

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError(f"{self.path}: the header ends early; the file is cut short or not a GGUF model")
        return data

    def scalar(self, kind: int) -> Any:
        size, fmt = _SCALARS[kind]
        return struct.unpack(fmt, self.take(size))[0]

    def string(self, limit: int = MAX_STRING) -> str:
        n = self.scalar(10)
        if n > limit:
            raise GGUFError(f"{self.path}: a header string claims {n} bytes; not a GGUF model podllama can read")
        return self.take(n).decode("utf-8", errors="replace")

    def skip_array(self, kind: int, count: int) -> None:
        if kind in _SCALARS:
            self.f.seek(_SCALARS[kind][0] * count, 1)
        elif kind == STRING:
            for _ in range(count):
                n = self.scalar(10)
                if n > MAX_STRING:
                    raise GGUFError(f"{self.path}: an array string claims {n} bytes")
                self.f.seek(n, 1)
        elif kind == ARRAY:
            for _ in range(count):
                inner, n = self.scalar(4), self.scalar(10)
                self.skip_array(inner, self.checked_count(n))
        else:
            raise GGUFError(f"{self.path}: unknown value type {kind} in the header")

    def strings(self, count: int) -> list[str]:
        return [self.string() for _ in range(count)]

    def checked_count(self, n: int) -> int:
        if n > MAX_ARRAY:
            raise GGUFError(f"{self.path}: an array claims {n} items; not a GGUF model podllama can read")
        return n


def read(path: Path, keep: frozenset[str] = frozenset()) -> Metadata:
    """The metadata of the GGUF file at PATH (its first shard, for a split model), with the string arrays named
    in KEEP."""
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as e:
        raise GGUFError(f"{path}: cannot be read ({e.strerror})") from None
    with f:
        r = _Reader(f, path)
        if r.take(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic at its start)")
        version = r.scalar(4)
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version}; podllama reads versions 2 and 3")
        tensors, kvs = r.scalar(10), r.scalar(10)
        if kvs > MAX_KVS:
            raise GGUFError(f"{path}: the header claims {kvs} metadata entries; not a GGUF model podllama can read")
        meta = Metadata(str(path), version, tensors)
        for _ in range(kvs):
            key = r.string(MAX_KEY)
            kind = r.scalar(4)
            if kind in _SCALARS:
                meta.values[key] = r.scalar(kind)
            elif kind == STRING:
                meta.values[key] = r.string()
            elif kind == ARRAY:
                inner, n = r.scalar(4), r.checked_count(r.scalar(10))
                meta.arrays[key] = n
                if key in keep and inner == STRING:
                    meta.lists[key] = r.strings(n)
                else:
                    r.skip_array(inner, n)
            else:
                raise GGUFError(f"{path}: unknown value type {kind} for {key!r}")
        if tensors > MAX_TENSORS:
            raise GGUFError(f"{path}: the header claims {tensors} tensors; not a GGUF model podllama can read")
        for _ in range(tensors):
            name = r.string(MAX_KEY)
            dims = r.scalar(4)
            if dims > MAX_DIMS:
                raise GGUFError(f"{path}: tensor {name!r} claims {dims} dimensions")
            f.seek(8 * dims + 4, 1)  # the dimensions and the type: the offsets say the sizes
            meta.offsets.append((name, r.scalar(10)))
        align = meta.values.get("general.alignment", 32)
        align = align if isinstance(align, int) and 0 < align <= 1 << 16 else 32
        meta.data_start = -(-f.tell() // align) * align
        meta.size = path.stat().st_size
        if any(offset > meta.size - meta.data_start for _, offset in meta.offsets):
            raise GGUFError(f"{path}: a tensor lies beyond the end of the file; the file is cut short")
        return meta
