"""Speculative decoding on real llama-servers: a server that names a draft model drafts with it (llama-server
reports the drafted and accepted tokens; a draft that agrees with its target is accepted) and answers as a
server without a draft does; a draft of another tokenizer is refused before any container is made.

(Not asserted: the same text as the undrafted server. At temperature 0 it is in theory, but llama-server
verifies drafts in batches whose float sums differ in the last bits, and the tiny model's near-tied logits turn
that into other tokens now and then: bench/RESULTS-speculative.md measures how often.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from podllama.build import source
from podllama.models import tinymodel
from podllama.stack import L_DRAFT
from tests.helpers import ROOT

SERVERS = """
[servers.plain]
model = "tiny.gguf"
ctx_size = 1024
args = {{ parallel = 1 }}

[servers.drafted]
model = "tiny.gguf"
ctx_size = 1024
args = {{ parallel = 1 }}
draft_model = "{draft}"
speculative = {{ draft_n_max = 8 }}
"""


@pytest.fixture(scope="module")
def spec_models(tmp_path_factory, models_dir) -> Path:
    """The tiny model; its copy as a draft that agrees with it; a one-layer draft of the same tokenizer; and a
    model of GPT-2's tokenizer."""
    d = tmp_path_factory.mktemp("spec-models")
    d.chmod(0o755)
    shutil.copy(models_dir / "tiny.gguf", d / "tiny.gguf")
    shutil.copy(models_dir / "tiny.gguf", d / "same.gguf")
    vocabs = source.source_dir(ROOT) / "models"
    tinymodel.write(d / "small.gguf", vocabs / "ggml-vocab-llama-spm.gguf", n_layer=1, seed=1)
    tinymodel.write(d / "gpt2.gguf", vocabs / "ggml-vocab-gpt-2.gguf", n_layer=1, seed=2)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def complete(api, model: str) -> dict:
    r = api.post("/v1/completions", json={"model": model, "prompt": "Once upon a time", "max_tokens": 48,
                                          "temperature": 0, "seed": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == 48 and out["choices"][0]["finish_reason"] == "length", out
    return out


def test_a_drafted_server_drafts_and_answers_what_the_plain_one_does(podman, stack_files, spec_models):
    sf = stack_files(podman, SERVERS.format(draft="same.gguf"), models=spec_models)
    out = sf.run("start").stdout
    assert "drafts with same.gguf (draft-simple)" in sf.run("status").stdout + out
    with sf.api() as api:
        plain, drafted = complete(api, "plain"), complete(api, "drafted")
    t = drafted["timings"]
    assert "draft_n" not in plain["timings"], plain["timings"]
    assert t["draft_n"] > 0 and t["draft_n"] // 2 < t["draft_n_accepted"] <= t["draft_n"], t  # it agrees: accepted
    info = podman.inspect(f"{sf.name}-drafted-1")
    assert info is not None and info.labels[L_DRAFT] == "same.gguf"


def test_a_smaller_draft_of_the_same_tokenizer_runs(podman, stack_files, spec_models):
    sf = stack_files(podman, SERVERS.format(draft="small.gguf"), models=spec_models)
    sf.run("start")
    with sf.api() as api:
        drafted = complete(api, "drafted")
    assert drafted["timings"]["draft_n"] > 0  # drafted; how many a random small model gets right is the bench's


def test_a_draft_of_another_tokenizer_is_refused_before_any_container_is_made(podman, stack_files, spec_models):
    sf = stack_files(podman, SERVERS.format(draft="gpt2.gguf"), models=spec_models)
    proc = sf.run("start", check=False)
    assert proc.returncode != 0
    assert ("servers.drafted: the draft model gpt2.gguf cannot draft for tiny.gguf: their tokenizers differ "
            "(llama in tiny.gguf, gpt2 in gpt2.gguf)") in proc.stderr, proc.stderr
    assert podman.list({"podllama.stack": sf.name}) == []
