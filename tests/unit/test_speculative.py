"""Speculative decoding without containers: the config keys, the flags they become (checked against the image's
own --help), the draft's vocabulary checked against its target's from real GGUF files (the tokenizers that
ship in llama.cpp's source tree), the draft counted in the memory estimate, and a stack that refuses a draft
that cannot draft before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from podllama import config
from podllama.build import flags, source
from podllama.models import draft, memory, tinymodel
from podllama.stack import L_DRAFT, Stack, StackError
from tests.fakeengine import HELP, FakeEngine
from tests.helpers import ROOT

VOCABS = source.source_dir(ROOT) / "models"


def server(**kw) -> config.ServerSection:
    return config.ServerSection(model="m.gguf", **kw)


def test_the_speculative_keys_are_checked_where_they_are_written():
    assert server(draft_model="d.gguf", speculative={"type": "draft-simple"}).spec_types == ["draft-simple"]
    assert server(speculative={"type": "ngram-mod,ngram-simple"}).spec_types == ["ngram-mod", "ngram-simple"]
    assert server(draft_model="hf://org/small-GGUF:Q8_0").draft_model == "hf://org/small-GGUF:Q8_0"
    for kw, problem in [
        ({"speculative": {"type": "draft-simple"}}, "drafts with a second model; name it in draft_model"),
        ({"speculative": {"type": "lookahead"}}, "'lookahead' is not a speculative type"),
        ({"draft_model": "d.gguf", "speculative": {"type": "ngram-mod"}}, "uses no draft model"),
        ({"draft_model": "d.gguf", "role": "embedding"}, "role 'embedding' generates none"),
        ({"speculative": {"draft_model": "d.gguf"}}, "the draft model is draft_model in the server section"),
        ({"draft_model": "../elsewhere.gguf"}, "leaves the models directory"),
        ({"draft_model": "hf://not a ref"}, "draft_model"),
        ({"speculative": {"--type": "x"}}, "is not a flag name"),
        ({"speculative": {"type": "-x"}}, "starts with '-'"),
    ]:
        with pytest.raises(ValueError, match=problem):
            server(**kw)
    with pytest.raises(ValueError, match="draft_model"):  # a server podllama does not run drafts nothing
        config.RemoteServer(url="http://h:1", draft_model="d.gguf")


def test_the_speculative_table_becomes_spec_flags_the_image_has_and_args_may_not_smuggle_them():
    known = flags.FlagSet.parse(HELP)
    assert flags.render({"type": "draft-simple", "draft_n_max": 8, "draft_ngl": "all"}, known, "speculative") == [
        "--spec-type", "draft-simple", "--spec-draft-n-max", "8", "--spec-draft-ngl", "all"]
    with pytest.raises(flags.FlagError, match=r"speculative.draft_n_maks: this llama-server has no flag "
                                              r"--spec-draft-n-maks \(did you mean --spec-draft-n-max"):
        flags.render({"draft_n_maks": 8}, known, "speculative")
    with pytest.raises(flags.FlagError, match="args.spec_type: --spec-type is a speculative decoding flag; set it in "
                                              "the server's speculative table as type"):
        flags.render({"spec_type": "ngram-mod"}, known)
    with pytest.raises(flags.FlagError, match="args.ngld: -ngld is a speculative decoding flag.*as draft_ngl"):
        flags.render({"ngld": 99}, known)  # an alias of a --spec- flag, known by the image's own --help
    for key in ("md", "model_draft", "spec_draft_model"):
        with pytest.raises(flags.FlagError, match="use draft_model"):
            flags.render({key: "/models/d.gguf"}, known)


@pytest.fixture(scope="module")
def vocabs() -> dict[str, draft.Vocabulary]:
    return {n: draft.vocabulary(VOCABS / f"ggml-vocab-{n}.gguf") for n in ("llama-spm", "phi-3", "baichuan", "gpt-2")}


def test_a_draft_must_share_its_targets_tokenizer_as_llama_server_requires(vocabs):
    spm = vocabs["llama-spm"]
    assert draft.mismatch(spm, spm) is None
    # Phi-3's vocabulary is Llama 2's and 64 more: llama-server drafts across them
    assert draft.mismatch(spm, vocabs["phi-3"]) is None and draft.mismatch(vocabs["phi-3"], spm) is None
    assert draft.mismatch(spm, vocabs["gpt-2"]) == ("their tokenizers differ (llama in ggml-vocab-llama-spm.gguf, "
                                                    "gpt2 in ggml-vocab-gpt-2.gguf)")
    assert "differ in size by 32000 tokens (32000 in ggml-vocab-llama-spm.gguf, 64000 in ggml-vocab-baichuan.gguf" \
        in (draft.mismatch(spm, vocabs["baichuan"]) or "")
    one_token = spm.tokens[:1000] + ("▁elsewhere",) + spm.tokens[1001:]
    assert draft.mismatch(spm, draft.Vocabulary(**{**spm.__dict__, "file": "d.gguf", "tokens": one_token})) == \
        "token 1000 differs ('ied' in ggml-vocab-llama-spm.gguf, '▁elsewhere' in d.gguf)"
    assert draft.mismatch(spm, draft.Vocabulary(**{**spm.__dict__, "file": "d.gguf", "bos": 7})) == \
        "their beginning-of-sequence tokens differ (id 1 in ggml-vocab-llama-spm.gguf, 7 in d.gguf)"
    assert "does not add a end-of-sequence token" not in (draft.mismatch(spm, spm) or "")
    assert draft.mismatch(spm, draft.Vocabulary(**{**spm.__dict__, "file": "d.gguf", "add_eos": True})) == \
        "ggml-vocab-llama-spm.gguf does not add a end-of-sequence token and d.gguf does"
    # the first five ids (control tokens) are not compared, as llama-server does not
    assert draft.mismatch(spm, draft.Vocabulary(**{**spm.__dict__, "tokens": ("x",) + spm.tokens[1:]})) is None


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A target (4 layers), a draft of its tokenizer (1 layer), and one of another tokenizer."""
    d = tmp_path_factory.mktemp("spec")
    tinymodel.write(d / "target.gguf", VOCABS / "ggml-vocab-llama-spm.gguf", n_embd=128, n_layer=4, n_ff=256)
    tinymodel.write(d / "draft.gguf", VOCABS / "ggml-vocab-llama-spm.gguf", n_layer=1, seed=1)
    tinymodel.write(d / "other.gguf", VOCABS / "ggml-vocab-gpt-2.gguf", n_layer=1, seed=2)
    return d


def stack_of(models: Path, tmp_path: Path, server_text: str) -> Stack:
    path = tmp_path / "services.toml"
    path.write_text(f'[stack]\nmodels_dir = "{models}"\n[servers.chat]\nmodel = "target.gguf"\n{server_text}')
    return Stack(config.load(path), FakeEngine(), default_variant="cpu")


def test_the_draft_is_counted_in_the_estimate_with_the_servers_context(models, tmp_path):
    target = stack_of(models, tmp_path, "ctx_size = 4096\n").estimate("chat")
    drafted = stack_of(models, tmp_path, 'ctx_size = 4096\ndraft_model = "draft.gguf"\n').estimate("chat")
    alone = memory.estimate(server(ctx_size=4096), [models / "draft.gguf"])
    assert drafted.parts["draft"] == alone.total - memory.PROCESS_CPU  # one process holds both
    assert drafted.devices["cpu"] == target.devices["cpu"] + drafted.parts["draft"]
    # the draft's KV cache is typed by its own setting (q8_0: about half of f16's)
    small = stack_of(models, tmp_path, 'ctx_size = 4096\ndraft_model = "draft.gguf"\n'
                                       'speculative = { draft_type_k = "q8_0", draft_type_v = "q8_0" }\n')
    assert small.estimate("chat").parts["draft"] < drafted.parts["draft"]
    # on a GPU its layers follow draft_ngl: none offloaded leaves the draft on the CPU
    on_cpu = memory.estimate(server(ctx_size=4096, draft_model="d.gguf", speculative={"draft_ngl": 0}),
                             [models / "target.gguf"], "cuda:0", draft=[models / "draft.gguf"])
    on_gpu = memory.estimate(server(ctx_size=4096, draft_model="d.gguf"),
                             [models / "target.gguf"], "cuda:0", draft=[models / "draft.gguf"])
    assert on_cpu.devices["cpu"] > on_gpu.devices["cpu"] and on_cpu.devices["cuda:0"] < on_gpu.devices["cuda:0"]


def test_a_server_with_a_draft_runs_it_from_the_models_volume(models, tmp_path):
    stack = stack_of(models, tmp_path, 'draft_model = "draft.gguf"\nspeculative = { type = "draft-simple", '
                                       'draft_n_max = 8 }\n')
    spec = stack.units()[0].spec
    args = spec.args
    assert args[args.index("--spec-draft-model") + 1] == "/models/draft.gguf"
    assert args[args.index("--spec-type") + 1] == "draft-simple" and args[args.index("--spec-draft-n-max") + 1] == "8"
    assert spec.labels[L_DRAFT] == "draft.gguf" and "drafts with draft.gguf (draft-simple)" in spec.labels[
        "podllama.chosen"]
    assert L_DRAFT not in stack_of(models, tmp_path, "").units()[0].spec.labels  # no label, no changed hash
    # no type named: llama-server would load a plain draft and never use it, so podllama names draft-simple
    args = stack_of(models, tmp_path, 'draft_model = "draft.gguf"\n').units()[0].spec.args
    assert args[args.index("--spec-type") + 1] == "draft-simple" and args.count("--spec-type") == 1
    assert draft.default_type("eagle3") == "draft-eagle3" and draft.default_type("dflash") is None


def test_a_draft_that_cannot_draft_is_refused_before_anything_starts(models, tmp_path):
    stack = stack_of(models, tmp_path, 'draft_model = "other.gguf"\n')
    problems = stack.missing_models(["chat"])
    assert problems == ["servers.chat: the draft model other.gguf cannot draft for target.gguf: their tokenizers "
                        "differ (llama in target.gguf, gpt2 in other.gguf). Pick a draft of the same model family "
                        "(the same tokenizer), usually a smaller size of the same model"]
    with pytest.raises(StackError, match="other.gguf cannot draft for target.gguf"):
        stack.units()
    assert not [c for c in stack.engine.calls if c[0] in ("create", "run", "start")]
    missing = stack_of(models, tmp_path, 'draft_model = "nowhere.gguf"\n').missing_models(["chat"])
    assert missing and "draft_model 'nowhere.gguf' not found in" in missing[0]
    unpulled = stack_of(models, tmp_path, 'draft_model = "hf://org/small-GGUF:Q8_0"\n')
    assert unpulled.missing_models(["chat"]) == [
        "servers.chat: hf://org/small-GGUF:Q8_0 is not in the model store yet; run `podllama pull org/small-GGUF:Q8_0`"]


def test_a_draft_in_use_is_not_removed_from_the_store(models, tmp_path):
    from podllama.models.store import Store, StoreError

    store_dir = tmp_path / "store"
    store = Store(store_dir)
    store.import_file(models / "target.gguf")
    drafted = store.import_file(models / "draft.gguf")
    stack = stack_of(store_dir, tmp_path, 'draft_model = "draft.gguf"\n')
    try:
        stack.start()
        with pytest.raises(StoreError, match="local/draft is used by running servers: chat"):
            stack.remove_model(drafted.id)
        assert (store_dir / "draft.gguf").is_file()
        removed, stopped = stack.remove_model(drafted.id, force=True)
        assert removed == ["draft.gguf"] and stopped == ["chat"]
    finally:
        stack.engine.close()
