"""images.lock and the names `build --push` accepts (the push itself runs against a real registry in
tests/integration/test_push.py)."""

from __future__ import annotations

import json

import pytest

from podllama.build import push


def test_the_lock_keeps_every_pushed_build_sorted_and_is_replaced_whole(tmp_path):
    lock = tmp_path / "images.lock"
    push.record(lock, "r/x:cpu-bbb", {"digest": "sha256:2"})
    push.record(lock, "r/x:cpu-aaa", {"digest": "sha256:1"})
    push.record(lock, "r/x:cpu-bbb", {"digest": "sha256:3"})  # the same build pushed again
    data = json.loads(lock.read_text())
    assert list(data["images"]) == ["r/x:cpu-aaa", "r/x:cpu-bbb"] and data["images"]["r/x:cpu-bbb"]["digest"] == "sha256:3"
    assert [p.name for p in tmp_path.iterdir()] == ["images.lock"]  # no temporary file left beside it


@pytest.mark.parametrize("text, says", [("{not json", "is not valid JSON"), ('{"images": []}', 'no "images" table')])
def test_a_broken_lock_is_refused_naming_the_fix_and_left_as_it_was(tmp_path, text, says):
    lock = tmp_path / "images.lock"
    lock.write_text(text)
    with pytest.raises(push.PushError, match=says):
        push.record(lock, "r/x:cpu-a", {})
    assert lock.read_text() == text


@pytest.mark.parametrize("name", ["-registry/x", "reg/x:tag", "reg/x@sha256:" + "0" * 64, "reg/x\n", "reg x/y", ""])
def test_push_targets_are_repositories_without_tags(name):
    with pytest.raises(push.PushError, match="--push"):
        push.repository(name)
    assert push.repository("127.0.0.1:5000/team/llama-server") == "127.0.0.1:5000/team/llama-server"


def test_the_ci_workflow_builds_every_variant_with_options_the_command_has(project_root):
    import pathlib
    import re
    import subprocess
    import sys

    import yaml

    flow = yaml.safe_load((project_root / ".github/workflows/images.yml").read_text())
    job = flow["jobs"]["build"]
    variants = job["strategy"]["matrix"]["variant"]
    assert sorted(variants) == sorted(p.name.removeprefix("Containerfile.") for p in
                                      (project_root / "containers").glob("Containerfile.*")
                                      if "-" not in p.name and not p.name.endswith("gateway"))
    runs = [s["run"] for s in job["steps"] if "--push" in s.get("run", "")]
    assert len(runs) == 2 and any("--kind gateway" in run for run in runs)  # the servers' image, and the gateway's
    used = set(re.findall(r"(--[a-z-]+)", " ".join(runs))) - {"--json"}
    command = str(pathlib.Path(sys.executable).parent / "podllama")
    help_text = subprocess.run([command, "build", "--help"], capture_output=True, text=True,
                               env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "TERM": "dumb"}).stdout
    assert used and all(flag in help_text for flag in used), (used, help_text)


def test_the_lock_names_the_newest_push_of_a_kinds_variant_and_commit(tmp_path):
    from podllama.config.kinds import KINDS

    lock = tmp_path / "images.lock"
    base = {"kind": "llama", "variant": "cpu", "llama_commit": "a" * 40}
    push.record(lock, "r/x:cpu-old", base | {"ref": "r/x@sha256:1", "pushed": "2026-01-01T00:00:00Z"})
    push.record(lock, "r/x:cpu-new", base | {"ref": "r/x@sha256:2", "pushed": "2026-02-01T00:00:00Z"})
    push.record(lock, "r/x:cuda", base | {"variant": "cuda", "ref": "r/x@sha256:3", "pushed": "2026-03-01T00:00:00Z"})
    push.record(lock, "r/w:cpu", {"kind": "whisper", "variant": "cpu", "source": "s" * 12, "ref": "r/w@sha256:4"})
    push.record(lock, "r/g:podman", {"kind": "gateway", "variant": "podman", "source": "g" * 12, "ref": "r/g@sha256:5"})
    llama, whisper = KINDS["llama"].name, KINDS["whisper"].name
    assert push.locked(lock, llama, "cpu", "a" * 40)["ref"] == "r/x@sha256:2"
    assert push.locked(lock, llama, "cuda", "a" * 40)["ref"] == "r/x@sha256:3"
    assert push.locked(lock, llama, "cpu", "b" * 40) is None  # another commit: compiled, not pulled
    assert push.locked(lock, whisper, "cpu", "s" * 12)["ref"] == "r/w@sha256:4"
    assert push.locked(lock, "gateway", "podman", "g" * 12)["ref"] == "r/g@sha256:5"
    assert push.locked(lock, "gateway", "docker", "g" * 12) is None  # made for the other engine: built here
    assert push.locked(tmp_path / "none.lock", llama, "cpu", "a" * 40) is None


def test_what_an_image_says_it_is_comes_from_its_labels():
    assert push.identity({"podllama.variant": "cpu", "podllama.llama-commit": "c" * 40}) == \
        {"kind": "llama", "variant": "cpu", "commit": "c" * 40}
    assert push.identity({"podllama.variant": "cuda", "podllama.server-kind": "sd", "podllama.source-id": "s" * 12}) \
        == {"kind": "sd", "variant": "cuda", "commit": "s" * 12}
    assert push.identity({"podllama.kind": "gateway", "podllama.engine": "docker", "podllama.source-id": "g" * 12,
                          "podllama.variant": "cpu"}) == {"kind": "gateway", "variant": "docker", "commit": "g" * 12}
    assert push.identity({}) == {"kind": None, "variant": None, "commit": None}  # nothing: matches no lock entry


def test_build_from_takes_auto_pull_or_compile(tmp_path):
    from podllama import config

    path = tmp_path / "services.toml"
    path.write_text('[build]\nfrom = "pull"\n')
    cfg = config.load(path)
    assert cfg.build.from_ == "pull" and 'from = "pull"' in cfg.to_toml()
    path.write_text('[build]\nfrom = "download"\n')
    with pytest.raises(config.ConfigError, match="build.from"):
        config.load(path)


@pytest.mark.parametrize("how", ["auto", "pull", "compile"])
def test_the_gateway_image_ci_pushed_is_pulled_by_digest_and_its_labels_checked(tmp_path, project_root, how):
    from podllama import config
    from podllama.build.images import gateway_source_hash, gateway_tag
    from tests.helpers import standin_podman

    source = gateway_source_hash(project_root)
    ref = "registry.example/team/gateway@sha256:" + "d" * 64
    right = {"podllama.kind": "gateway", "podllama.engine": "podman", "podllama.source-id": source}
    (tmp_path / "services.toml").write_text(f'[build]\nfrom = "{how}"\n')
    cfg = config.load(tmp_path / "services.toml")
    said: list[str] = []

    engine, calls = standin_podman(tmp_path / "none", [], registry={ref: right})
    assert push.gateway_from_lock(engine, cfg, project_root, said.append) is None  # no entry: built, even for "pull"
    assert calls() == []

    push.record(tmp_path / "images.lock", "registry.example/team/gateway:podman-x",
                {"kind": "gateway", "variant": "podman", "source": source, "ref": ref, "pushed": "2026-12-06T00:00:00Z"})
    engine, calls = standin_podman(tmp_path / "right", [], registry={ref: right})
    got = push.gateway_from_lock(engine, cfg, project_root, said.append)
    if how == "compile":
        assert got is None and calls() == []
        return
    assert got == gateway_tag(engine, project_root) and ["pull", "--tls-verify=true", ref] in calls()
    assert ["tag", "a" * 64, got] in calls() and said[-1].endswith("instead of building")

    engine, calls = standin_podman(tmp_path / "wrong", [], registry={ref: right | {"podllama.engine": "docker"}})
    if how == "pull":  # an entry that cannot be had is an error, as for a server's image
        with pytest.raises(push.PushError, match="its labels give variant 'docker' \\(wanted 'podman'\\)"):
            push.gateway_from_lock(engine, cfg, project_root, said.append)
    else:
        assert push.gateway_from_lock(engine, cfg, project_root, said.append) is None
        assert said[-1].endswith("; building instead")
    assert not any(c[0] == "tag" for c in calls()) and ["untag", ref, ref] in calls()
