"""Model downloads against a local server speaking the hub's HTTP API, with the real huggingface_hub client."""

from __future__ import annotations

import os

import pytest

from podllama.models import hub
from podllama.models.hub import PullError
from podllama.models.store import Store, StoreError, safe_name
from tests.fakehub import FakeHub

GGUF = b"GGUF" + bytes(range(256)) * 40  # 10 KiB that start like a GGUF


def blob(n: int) -> bytes:
    return GGUF + str(n).encode() * 1000


@pytest.fixture
def fake(monkeypatch):
    h = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield h
    h.stop()


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "models")


# -- choosing files like llama.cpp's -hf ------------------------------------------------------------------------
FILES = ["README.md", "model-Q4_K_M.gguf", "model-Q8_0.gguf", "model-F16.gguf", "mmproj-model-f16.gguf",
         "mmproj-model-Q8_0.gguf", "big/big-Q4_K_M-00001-of-00003.gguf", "big/big-Q4_K_M-00002-of-00003.gguf",
         "big/big-Q4_K_M-00003-of-00003.gguf", "imatrix.gguf"]


def test_selection_follows_llama_cpp():
    assert hub.select(FILES, hub.parse_ref("o/r:Q8_0")) == (["model-Q8_0.gguf"], "mmproj-model-Q8_0.gguf")
    # the tag matches case-insensitively; the first matching file wins; the projector of the closest quant
    assert hub.select(FILES, hub.parse_ref("o/r:q4_k_m")) == (["model-Q4_K_M.gguf"], "mmproj-model-Q8_0.gguf")
    assert hub.select(FILES, hub.parse_ref("o/r:F16"), mmproj=False) == (["model-F16.gguf"], None)
    assert hub.select(FILES, hub.parse_ref("o/r:F16"))[1] == "mmproj-model-f16.gguf"
    assert hub.select(FILES, hub.parse_ref("o/r"))[0] == ["model-Q4_K_M.gguf"]  # no tag: Q4_K_M first
    assert hub.select(["x-Q8_0.gguf", "x-F16.gguf"], hub.parse_ref("o/r"))[0] == ["x-Q8_0.gguf"]  # then Q8_0
    assert hub.split_info("big/big-Q4_K_M-00002-of-00003.gguf") == ("big/big-Q4_K_M", "Q4_K_M", 2, 3)
    assert hub.quant_bits("x-F16.gguf") == 16 and hub.quant_bits("x-Q4_K_M.gguf") == 4
    with pytest.raises(PullError, match="no GGUF with the quant tag IQ2"):
        hub.select(FILES, hub.parse_ref("o/r:IQ2"))
    only = ["a.gguf", "mmproj-a.gguf"]
    assert hub.select(only, hub.parse_ref("o/r")) == (["a.gguf"], "mmproj-a.gguf")


def test_the_first_matching_file_wins_and_shards_come_together():
    files = ["big/big-Q4_K_M-00002-of-00003.gguf", "big/big-Q4_K_M-00001-of-00003.gguf",
             "big/big-Q4_K_M-00003-of-00003.gguf", "other-Q8_0.gguf"]
    assert hub.select(files, hub.parse_ref("o/r:Q4_K_M"), mmproj=False)[0] == [
        "big/big-Q4_K_M-00001-of-00003.gguf", "big/big-Q4_K_M-00002-of-00003.gguf", "big/big-Q4_K_M-00003-of-00003.gguf"]


@pytest.mark.parametrize("text", ["nope", "a/b:Q4 K", "../x/y", "/abs/repo", "o/r/../../etc.gguf", "o/r/x.gguf:Q4"])
def test_bad_references_are_refused(text):
    with pytest.raises((PullError, StoreError)):
        hub.parse_ref(text)


@pytest.mark.parametrize("name", ["../x.gguf", "/etc/passwd", "a/../../b", "x\x00.gguf", ".manifests/x.json", "a\\b",
                                  "", "a//b.gguf", "./a.gguf"])
def test_names_are_confined_to_the_store(name):
    with pytest.raises(StoreError):
        safe_name(name)


def test_a_symlink_out_of_the_store_is_refused(store, tmp_path):
    store.root.mkdir(parents=True)
    (tmp_path / "secret.gguf").write_bytes(GGUF)
    os.symlink(tmp_path / "secret.gguf", store.root / "leak.gguf")
    with pytest.raises(StoreError, match="leads out of the model store"):
        store.path("leak.gguf")


# -- pulls ----------------------------------------------------------------------------------------------------
def test_pull_a_single_file_records_a_manifest(fake, store):
    commit = fake.add("org/tiny-GGUF", {"tiny-Q8_0.gguf": blob(1), "README.md": b"hi"})
    m = hub.pull(store, "org/tiny-GGUF/tiny-Q8_0.gguf")
    assert m.id == "org/tiny-GGUF/tiny-Q8_0.gguf" and m.revision == commit and m.source == "hf"
    assert (store.root / "org/tiny-GGUF/tiny-Q8_0.gguf").read_bytes() == blob(1)
    assert store.verify(m.id) == {m.id: []} and store.manifest(m.id).files[0].size == len(blob(1))
    assert not list((store.root / ".partial").rglob("*.part"))


def test_pull_by_quant_tag_picks_among_several(fake, store):
    fake.add("org/m-GGUF", {"m-Q4_K_M.gguf": blob(4), "m-Q8_0.gguf": blob(8), "m-F16.gguf": blob(16)})
    m = hub.pull(store, "org/m-GGUF:Q8_0")
    assert m.id == "org/m-GGUF:Q8_0" and m.model == "org/m-GGUF/m-Q8_0.gguf"
    assert not (store.root / "org/m-GGUF/m-Q4_K_M.gguf").exists()
    default = hub.pull(store, "org/m-GGUF")
    assert default.id == "org/m-GGUF:Q4_K_M" and hub.resolve(store, "hf://org/m-GGUF:Q4_K_M").model.endswith("Q4_K_M.gguf")


def test_pull_a_three_shard_split(fake, store):
    shards = {f"s/s-Q4_K_M-0000{i}-of-00003.gguf": blob(100 + i) for i in (1, 2, 3)}
    fake.add("org/split-GGUF", shards)
    m = hub.pull(store, "org/split-GGUF:Q4_K_M")
    assert [f.kind for f in m.files] == ["model", "shard", "shard"]
    assert m.model == "org/split-GGUF/s/s-Q4_K_M-00001-of-00003.gguf"
    assert all((store.root / f.path).read_bytes() == shards[f.path.split("/", 2)[2]] for f in m.files)


def test_a_vision_repo_brings_its_projector_unless_told_not_to(fake, store):
    fake.add("org/vl-GGUF", {"vl-Q4_K_M.gguf": blob(5), "mmproj-vl-f16.gguf": blob(6)})
    m = hub.pull(store, "org/vl-GGUF:Q4_K_M")
    assert m.mmproj == "org/vl-GGUF/mmproj-vl-f16.gguf" and (store.root / m.mmproj).is_file()
    store.remove(m.id)
    m2 = hub.pull(store, "org/vl-GGUF:Q4_K_M", mmproj=False)
    assert m2.mmproj is None and not (store.root / "org/vl-GGUF/mmproj-vl-f16.gguf").exists()


def test_other_kinds_models_are_pulled_by_name_with_what_they_need_beside_them(fake, store):
    """A piper voice is its .onnx and the .onnx.json it is read with; a whisper.cpp model one .bin."""
    voice = {"en/joe/en_US-joe-medium.onnx": blob(7), "en/joe/en_US-joe-medium.onnx.json": b'{"audio": {}}',
             "en/amy/en_US-amy-low.onnx": blob(9)}
    fake.add("org/voices", {**voice, "README.md": b"voices"})
    m = hub.pull(store, "org/voices/en/joe/en_US-joe-medium.onnx")
    assert [(f.path, f.kind) for f in m.files] == [("org/voices/en/joe/en_US-joe-medium.onnx", "model"),
                                                   ("org/voices/en/joe/en_US-joe-medium.onnx.json", "companion")]
    assert m.model == "org/voices/en/joe/en_US-joe-medium.onnx" and store.verify(m.id) == {m.id: []}
    assert (store.root / "org/voices/en/joe/en_US-joe-medium.onnx.json").read_bytes() == b'{"audio": {}}'
    assert not (store.root / "org/voices/en/amy").exists()
    with pytest.raises(PullError, match="not en/amy/en_US-amy-low.onnx.json, which it needs"):
        hub.pull(store, "org/voices/en/amy/en_US-amy-low.onnx")
    fake.add("org/whisper", {"ggml-tiny.en.bin": blob(3)})
    assert hub.pull(store, "org/whisper/ggml-tiny.en.bin").model == "org/whisper/ggml-tiny.en.bin"
    with pytest.raises(PullError, match="not a model file podllama pulls"):
        hub.parse_ref("org/voices/README.md")


def test_a_download_that_breaks_off_is_retried_and_resumed(fake, store):
    data = blob(7) * 20
    fake.add("org/r-GGUF", {"r-Q4_K_M.gguf": data})
    fake.drop_after["r-Q4_K_M.gguf"] = len(data) // 3
    said: list[str] = []
    m = hub.pull(store, "org/r-GGUF:Q4_K_M", say=said.append, retry_delay=0.05)  # one pull: it tries again itself
    assert (store.root / m.model).read_bytes() == data
    ranges = [r for method, path, r in fake.log if path.endswith("r-Q4_K_M.gguf") and r]
    assert ranges and ranges[-1] == f"bytes={len(data) // 3}-"  # resumed where it broke, not from the start
    assert any("trying again" in line for line in said)


def test_a_download_that_keeps_breaking_gives_up_and_keeps_what_came(fake, store):
    data = blob(8) * 20
    fake.add("org/b-GGUF", {"b-Q4_K_M.gguf": data})
    fake.always_drop["b-Q4_K_M.gguf"] = 1000
    with pytest.raises(PullError, match="5 times; run the same pull again"):
        hub.pull(store, "org/b-GGUF:Q4_K_M", retry_delay=0.01)
    assert not (store.root / "org/b-GGUF/b-Q4_K_M.gguf").exists()  # never half a file under the real name
    part = store.root / ".partial/org/b-GGUF/b-Q4_K_M.gguf"
    assert part.stat().st_size == 5 * 1000  # each attempt resumed and added what came
    del fake.always_drop["b-Q4_K_M.gguf"]
    m = hub.pull(store, "org/b-GGUF:Q4_K_M")
    assert (store.root / m.model).read_bytes() == data


def test_a_corrupted_download_is_rejected(fake, store):
    fake.add("org/c-GGUF", {"c-Q4_K_M.gguf": blob(9)})
    fake.corrupt.add("c-Q4_K_M.gguf")
    with pytest.raises(PullError, match="sha256 does not match"):
        hub.pull(store, "org/c-GGUF:Q4_K_M")
    assert not (store.root / "org/c-GGUF/c-Q4_K_M.gguf").exists() and store.manifests() == []
    assert not (store.root / ".partial/org/c-GGUF/c-Q4_K_M.gguf").exists()


def test_a_gated_repo_without_a_token_says_what_to_do(fake, store, monkeypatch):
    fake.add("org/gated-GGUF", {"g-Q4_K_M.gguf": blob(3)}, gated_token="hf_secret")
    with pytest.raises(PullError, match="is gated.*HF_TOKEN") as e:
        hub.pull(store, "org/gated-GGUF:Q4_K_M")
    assert "hf_secret" not in str(e.value)
    m = hub.pull(store, "org/gated-GGUF:Q4_K_M", hf_token="hf_secret")
    assert (store.root / m.model).is_file()


def test_missing_repos_and_revisions(fake, store):
    with pytest.raises(PullError, match="not found"):
        hub.pull(store, "org/nope-GGUF")
    fake.add("org/x-GGUF", {"x-Q4_K_M.gguf": blob(2)})
    with pytest.raises(PullError, match="no revision 'v9'"):
        hub.pull(store, "org/x-GGUF", revision="v9")


def test_a_hostile_file_name_from_the_hub_is_refused(fake, store):
    fake.add("org/evil-GGUF", {"ok-Q4_K_M.gguf": blob(1)}, listed=["../../../../tmp/evil-Q4_K_M.gguf"])
    with pytest.raises(PullError, match="will not write"):
        hub.pull(store, "org/evil-GGUF:Q4_K_M")
    assert not store.root.exists() or not any(store.root.rglob("*.gguf"))


def test_unreachable_hub(monkeypatch, store):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(PullError, match="cannot reach http://127.0.0.1:9"):
        hub.pull(store, "org/x-GGUF")


def test_import_verify_and_remove(store, tmp_path):
    src = tmp_path / "mine.gguf"
    src.write_bytes(blob(11))
    m = store.import_file(src)
    assert m.id == "local/mine" and (store.root / "mine.gguf").read_bytes() == blob(11)
    with pytest.raises(StoreError, match="already exists"):
        store.import_file(src)
    (tmp_path / "not.gguf").write_bytes(b"nope")
    with pytest.raises(StoreError, match="not a GGUF"):
        store.import_file(tmp_path / "not.gguf", "x")
    (store.root / "mine.gguf").write_bytes(blob(12))
    assert "sha256 differs" in store.verify("local/mine")["local/mine"][0]
    store.remove("local/mine")
    assert store.manifests() == [] and not (store.root / "mine.gguf").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A model store on a 2 MiB filesystem of its own."""
    import subprocess

    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], check=True)
    yield Store(root / "models")
    subprocess.run(["umount", "-l", str(root)], check=True)


def test_a_pull_the_disk_cannot_hold_is_refused_before_a_byte(fake, small_disk):
    fake.add("org/big-GGUF", {"big-Q4_K_M.gguf": GGUF * 300})  # 3 MiB
    with pytest.raises(PullError, match=r"not enough space in the model store .*needs 2\.9 MiB more"):
        hub.pull(small_disk, "org/big-GGUF:Q4_K_M")
    assert not [line for line in fake.log if line[1].endswith(".gguf") and line[0] == "GET"]
    assert small_disk.verify() == {} and not small_disk.manifests()


def test_a_disk_that_fills_up_during_a_pull_leaves_the_store_valid(fake, small_disk):
    data = GGUF * 120  # 1.2 MiB: fits, until something else takes the space
    fake.add("org/f-GGUF", {"f-Q4_K_M.gguf": data})
    filler = small_disk.root.parent / "filler"
    fake.halfway["f-Q4_K_M.gguf"] = lambda: filler.write_bytes(b"\0" * (1400 << 10))
    with pytest.raises(PullError, match="filled up .* during the download; what was downloaded was removed"):
        hub.pull(small_disk, "org/f-GGUF:Q4_K_M", retry_delay=0.01)
    assert not (small_disk.root / "org/f-GGUF/f-Q4_K_M.gguf").exists()  # nothing under the real name
    assert not (small_disk.root / ".partial/org/f-GGUF/f-Q4_K_M.gguf").exists()  # the space went back
    assert small_disk.verify() == {} and not small_disk.manifests()
    filler.unlink()
    del fake.halfway["f-Q4_K_M.gguf"]
    m = hub.pull(small_disk, "org/f-GGUF:Q4_K_M")  # with room again, the same pull works
    assert (small_disk.root / m.model).read_bytes() == data and small_disk.verify() == {m.id: []}


def test_a_server_whose_hub_model_is_not_pulled_is_listed_as_using_its_fallback(store):
    """One answer to "which model does this server run": its fallback while its hub model is not pulled."""
    from podllama.config import ServerSection

    store.root.mkdir(parents=True, exist_ok=True)
    (store.root / "tiny.gguf").write_bytes(b"GGUF" + bytes(60))
    servers = {"chat": ServerSection(model="hf://org/repo-GGUF", fallback="tiny.gguf"),
               "other": ServerSection(model="hf://org/elsewhere-GGUF")}
    assert hub.server_files(store, servers["chat"]) == hub.ServerFiles("tiny.gguf")
    assert hub.server_files(store, servers["other"]) is None  # neither pulled nor a fallback
    rows = {r["id"]: r for r in hub.listing(store, servers)}
    assert rows["tiny.gguf"]["used_by"] == ["chat"]
