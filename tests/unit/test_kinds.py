"""Server kinds beside llama-server: roles to programs, config checks, the pinned sources and their unpacking."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pydantic
import pytest

from podllama import config
from podllama.build import flags, pinned
from podllama.config import kinds
from podllama.models.hub import ServerFiles
from podllama.stack.spec import server_args, server_env

ROOT = Path(__file__).resolve().parents[2]


def test_every_role_has_one_kind_and_its_repository_sits_beside_llama_servers():
    assert {r for k in kinds.KINDS.values() for r in k.roles} == set(kinds.ROLE_KIND)
    assert kinds.of_role("transcription").program == "whisper-server" and kinds.of_role("chat").llama
    assert kinds.of_role("image").repository("podllama/llama-server") == "podllama/sd-server"
    assert kinds.of_role("speech").repository("registry.local:5000/team/llama-server") == \
        "registry.local:5000/team/speech-server"
    for kind in kinds.KINDS.values():
        for variant in kind.variants:
            if kind.name != "sd":  # sd-server's Containerfiles come with the image role
                assert kind.containerfile(variant, ROOT).is_file(), (kind.name, variant)
    with pytest.raises(ValueError, match="kinds: llama, whisper, sd, speech"):
        kinds.named("tts")


def test_llama_server_settings_on_another_kind_are_refused_with_the_reason():
    with pytest.raises(pydantic.ValidationError, match="ctx_size, gpu_layers: llama-server settings; role "
                                                     "'transcription' runs whisper-server"):
        config.ServerSection(role="transcription", model="w.bin", ctx_size=512, gpu_layers=3)
    on_demand = config.ServerSection(role="speech", model="v.onnx", start="on-demand")
    assert not on_demand.saves_slots, "only llama-server has slots to save"
    assert config.ServerSection(role="chat", model="m.gguf", start="on-demand").saves_slots


def test_command_lines_and_environment_per_kind():
    help_text = "usage: server.py [-h]\n  -m MODEL, --model MODEL\n  -t THREADS, --threads THREADS\n  --alias ALIAS\n"
    known = flags.FlagSet.parse(help_text, indent=4)
    assert "--threads" in known and "-m" in known
    speech = config.ServerSection(role="speech", model="voices/v.onnx", args={"threads": 2}, env={"A": "1"})
    assert server_args("voice", speech, known, ServerFiles("voices/v.onnx")) == [
        "--model", "/models/voices/v.onnx", "--alias", "voice", "--threads", "2"]
    assert server_env(speech) == {"A": "1", "PODLLAMA_API_KEY_FILE": "/run/podllama/server.key"}
    whisper = config.ServerSection(role="transcription", model="w.bin", args={"beam_size": 5})
    from podllama.stack import StackError

    with pytest.raises(StackError, match="servers.ears.args.beam_size"):
        server_args("ears", whisper, known, ServerFiles("w.bin"))
    chat = config.ServerSection(role="chat", model="m.gguf")
    assert "PODLLAMA_API_KEY_FILE" not in server_env(chat), "llama-server takes --api-key-file"


def test_the_lock_pins_every_kind_but_llama(tmp_path):
    pins = pinned.read(ROOT)
    assert set(pins) == set(kinds.KINDS) - {"llama"}
    for pin in pins.values():
        assert (len(pin.sha256) == 64 and pin.file and pin.tree) or (pin.context and (ROOT / pin.context).is_dir())
    # the id in an image's tag changes with the patches applied to the source
    sid = pinned.source_id(pins["whisper"], ROOT)
    root = tmp_path / "root"
    (root / "containers" / "patches" / "whisper").mkdir(parents=True)
    (root / "containers" / "patches" / "whisper" / "a.patch").write_text("--- a/x\n+++ b/x\n")
    assert pinned.source_id(pins["whisper"], root) != sid
    (root / "containers" / "sources.lock").write_text("[whisper]\npackage = 'x'\nbogus = 1\n")
    with pytest.raises(pinned.PinError, match="bogus"):
        pinned.read(root)


def hostile_archive(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes = b"x", **kw) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for k, v in kw.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(data))
        add("pkg-1/tree/src/main.c", b"int main(){}")
        add("pkg-1/tree/.git/config", b"[http]\n\textraheader = AUTHORIZATION: basic c2VjcmV0\n")
        add("pkg-1/tree/sub/.git", b"gitdir: ../.git/modules/sub")
        add("pkg-1/tree/link", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("pkg-1/tree/../../escape.txt", b"out")
        add("pkg-1/other/file.txt", b"not the tree")


def test_unpacking_takes_the_tree_and_nothing_else(tmp_path):
    archive = tmp_path / "a.tar.gz"
    hostile_archive(archive)
    dest = tmp_path / "out"
    pinned.unpack(archive, "pkg-1/tree", dest)
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert found == ["src", "src/main.c"], found
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(pinned.PinError, match="holds nothing under nowhere/"):
        pinned.unpack(archive, "nowhere", tmp_path / "none")
