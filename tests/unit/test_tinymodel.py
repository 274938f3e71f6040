import hashlib

import gguf

from podllama.models import tinymodel


def test_tiny_model_is_a_valid_deterministic_llama(tmp_path, vocab_file):
    a = tinymodel.write(tmp_path / "a.gguf", vocab_file)
    b = tinymodel.write(tmp_path / "b.gguf", vocab_file)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    r = gguf.GGUFReader(str(a))
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.block_count"].contents() == 2
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == 32000
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"} <= names
    assert 5_000_000 < a.stat().st_size < 15_000_000
    assert list(tmp_path.iterdir()) and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
