"""Whether a draft model can draft for its target (speculative decoding): llama-server refuses to start when
their vocabularies differ (common/speculative.cpp at the pinned commit). The same rules, read from both GGUF
headers, so that a mismatch is named before any container changes instead of ending in a crash loop:
- the same tokenizer kind (tokenizer.ggml.model: llama, gpt2 …);
- the same beginning- and end-of-sequence handling: whether each is added, and, where it is, the same id;
- sizes within 128 tokens of each other, and the same text for every token from id 5 up to the smaller size.
Where a file leaves add_bos/add_eos unset, llama.cpp derives it from the tokenizer; two files of the same
tokenizer and pre-tokenizer derive the same, and otherwise this check leaves the question to llama-server.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gguf_meta import read

MAX_SIZE_DIFFERENCE = 128
CHECK_FROM = 5
TOKENS = "tokenizer.ggml.tokens"


@dataclass(frozen=True)
class Vocabulary:
    file: str
    kind: str | None  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre
    tokens: tuple[str, ...]
    add_bos: bool | None
    add_eos: bool | None
    bos: int | None
    eos: int | None


def vocabulary(path: Path) -> Vocabulary:
    """The vocabulary of the GGUF file at PATH (read once per version of the file)."""
    st = path.stat()
    return _vocabulary(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _vocabulary(path: str, mtime_ns: int, size: int) -> Vocabulary:
    meta = read(Path(path), keep=frozenset({TOKENS}))

    def get(key: str, kind: type) -> Any:
        value = meta.values.get(f"tokenizer.ggml.{key}")
        return value if isinstance(value, kind) and not (kind is int and isinstance(value, bool)) else None

    return Vocabulary(Path(path).name, get("model", str), get("pre", str), tuple(meta.lists.get(TOKENS, ())),
                      get("add_bos_token", bool), get("add_eos_token", bool), get("bos_token_id", int),
                      get("eos_token_id", int))


def mismatch(target: Vocabulary, draft: Vocabulary) -> str | None:
    """Why DRAFT cannot draft for TARGET, in words naming both files; None when llama-server would accept it."""
    t, d = target.file, draft.file
    if target.kind != draft.kind:
        return f"their tokenizers differ ({target.kind} in {t}, {draft.kind} in {d})"
    derived = target.pre == draft.pre  # unset flags are derived alike from the same tokenizer
    for what, add_t, add_d, id_t, id_d in (("beginning-of-sequence", target.add_bos, draft.add_bos, target.bos,
                                            draft.bos),
                                           ("end-of-sequence", target.add_eos, draft.add_eos, target.eos, draft.eos)):
        if add_t is not None and add_d is not None and add_t != add_d:
            return f"{t} {'adds' if add_t else 'does not add'} a {what} token and {d} {'does' if add_d else 'does not'}"
        adds = add_t if add_t is not None else add_d if derived else None
        if adds and id_t != id_d:
            return f"their {what} tokens differ (id {id_t} in {t}, {id_d} in {d})"
    n_t, n_d = len(target.tokens), len(draft.tokens)
    if abs(n_t - n_d) > MAX_SIZE_DIFFERENCE:
        return (f"their vocabularies differ in size by {abs(n_t - n_d)} tokens ({n_t} in {t}, {n_d} in {d}; "
                f"llama-server allows {MAX_SIZE_DIFFERENCE})")
    for i in range(CHECK_FROM, min(n_t, n_d)):
        if target.tokens[i] != draft.tokens[i]:
            return f"token {i} differs ({target.tokens[i]!r} in {t}, {draft.tokens[i]!r} in {d})"
    return None


# what a draft model's architecture drafts as, where llama-server would not tell by itself (it infers only
# MTP heads and DFlash/DSpark sidecars from the file: a plain model named by --spec-draft-model with no
# --spec-type is loaded and never used)
TYPE_BY_ARCHITECTURE: dict[str, str | None] = {"eagle3": "draft-eagle3", "dflash": None}


def default_type(architecture: str | None) -> str | None:
    """The --spec-type for a draft model of ARCHITECTURE when the server names none; None: llama-server's own
    inference from the file."""
    return TYPE_BY_ARCHITECTURE.get(architecture or "", "draft-simple")
