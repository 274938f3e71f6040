"""A tiny but valid GGUF model, written locally: for smoke tests of new images and for the test suite.

A 2-layer llama (n_embd 64) with llama.cpp's own SPM tokenizer (taken from the vocab file that ships in the
llama.cpp source tree) and f16 weights from a seeded generator: the same bytes every time, about 9 MB.
It loads in well under a second and answers completions, chat and (with --embedding) embeddings — gibberish
text, but real llama-server behaviour. With `quant` its matrices are quantized (Q4_0, Q8_0 …): the build's smoke
test uses that, so that the CPU's quantized kernels (repacked weights, AMX) run before an image is accepted.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

VOCAB_FILE = "models/ggml-vocab-llama-spm.gguf"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write(dest: Path, vocab: Path, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_ff: int = 128,
          n_ctx: int = 32768, seed: int = 0, name: str = "podllama-tiny", shards: int = 1,
          quant: str | None = None) -> Path:
    """Write the model to DEST (atomically) and return DEST. With SHARDS > 1 it is a split GGUF
    (DEST's stem + -0000k-of-0000N.gguf, as llama.cpp's gguf-split names them); the first shard is returned."""
    try:  # imported here: only smoke tests and tests need them (the gateway reuses the host's model)
        import gguf
        import numpy as np
    except ImportError:
        raise RuntimeError("writing the smoke-test model needs gguf and numpy: pip install 'podllama[build]' "
                           "(scripts/setup.sh installs them)") from None

    reader = gguf.GGUFReader(str(vocab))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp = tmpdir / dest.name
    n_tensors = 3 + 9 * n_layer
    w = gguf.GGUFWriter(str(tmp), "llama", split_max_tensors=-(-n_tensors // shards) if shards > 1 else 0)
    w.add_name(name)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    n_vocab = 0
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        value = field.contents()
        if field.name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(field.name, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, value, vtype)
    w.add_vocab_size(n_vocab)
    w.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    qtype = gguf.GGMLQuantizationType[quant.upper()] if quant else None

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16)

    def add_matrix(name: str, rows: int, cols: int) -> None:
        data = mat(rows, cols)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)

    ones = np.ones(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add_matrix(f"blk.{i}.{t}.weight", n_embd, n_embd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        add_matrix(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        add_matrix(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        add_matrix(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.add_tensor("output_norm.weight", ones)
    add_matrix("output.weight", n_vocab, n_embd)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    written = sorted(tmpdir.iterdir())
    for f in written:
        os.replace(f, dest.parent / f.name)
    tmpdir.rmdir()
    return dest.parent / written[0].name


def ensure(dest: Path, source_tree: Path, quant: str | None = None) -> Path:
    """The tiny model at DEST (its matrices QUANT, where given), written from SOURCE_TREE's vocab file if it is
    not there yet."""
    if dest.is_file():
        return dest
    vocab = source_tree / VOCAB_FILE
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab} is missing; check the llama.cpp submodule out (`podllama source init`)")
    return write(dest, vocab, quant=quant)
