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
    [run] = [s["run"] for s in job["steps"] if "--push" in s.get("run", "")]
    used = set(re.findall(r"(--[a-z-]+)", run)) - {"--json"}
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
    llama, whisper = KINDS["llama"], KINDS["whisper"]
    assert push.locked(lock, llama, "cpu", "a" * 40)["ref"] == "r/x@sha256:2"
    assert push.locked(lock, llama, "cuda", "a" * 40)["ref"] == "r/x@sha256:3"
    assert push.locked(lock, llama, "cpu", "b" * 40) is None  # another commit: compiled, not pulled
    assert push.locked(lock, whisper, "cpu", "s" * 12)["ref"] == "r/w@sha256:4"
    assert push.locked(tmp_path / "none.lock", llama, "cpu", "a" * 40) is None


def test_build_from_takes_auto_pull_or_compile(tmp_path):
    from podllama import config

    path = tmp_path / "services.toml"
    path.write_text('[build]\nfrom = "pull"\n')
    cfg = config.load(path)
    assert cfg.build.from_ == "pull" and 'from = "pull"' in cfg.to_toml()
    path.write_text('[build]\nfrom = "download"\n')
    with pytest.raises(config.ConfigError, match="build.from"):
        config.load(path)
