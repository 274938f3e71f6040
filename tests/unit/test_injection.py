"""No injection into programs: every value a user or a request can set that reaches git, podman, docker or a
llama-server command line is checked by type and pattern. One test per entry point."""

from __future__ import annotations

import subprocess

import pytest

from podllama import config, validate
from podllama.build import bases, source
from podllama.build.errors import BuildError
from podllama.config import ConfigError
from podllama.engine import ContainerSpec, PodmanEngine
from podllama.models import hub
from podllama.models.store import Store
from tests.unit.test_source import git, make_upstream

HOSTILE = ["--upload-pack=touch /tmp/pwned;false", "-oProxyCommand=touch /tmp/pwned", "ext::sh -c touch% /tmp/pwned",
           "x\n--y", "a\x00b"]


@pytest.mark.parametrize("value", HOSTILE + ["..", "a..b", "HEAD@{1}", "-", "ref.lock"])
def test_git_refs(value):
    with pytest.raises(ValueError):
        validate.git_ref(value)


@pytest.mark.parametrize("value", ["HEAD", "master", "b8123", "v1.2.3", "release/2026-11", "0c1e57098bba"])
def test_good_git_refs(value):
    assert validate.git_ref(value) == value


@pytest.mark.parametrize("value", HOSTILE + ["fd::17", "mirror-without-slash", "http://x y"])
def test_git_remotes(value):
    with pytest.raises(ValueError):
        validate.git_remote(value)


@pytest.mark.parametrize("value", ["https://github.com/ggml-org/llama.cpp.git", "git@github.com:ggml-org/llama.cpp.git",
                                   "/srv/mirrors/llama.cpp", "./mirror", "file:///srv/llama.cpp"])
def test_good_git_remotes(value):
    assert validate.git_remote(value) == value


def test_update_refuses_a_hostile_remote_before_git_runs(tmp_path):
    """`podllama update --remote` and the update job: the first caller of git with user values."""
    shas = make_upstream(tmp_path / "sub", 1)
    project = tmp_path / "project"
    project.mkdir()
    git(project, "init", "-q")
    git(project, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(tmp_path / "sub"), "llama.cpp")
    marker = tmp_path / "pwned"
    for remote, ref in ((f"--upload-pack=touch {marker};false", "."), (str(tmp_path / "sub"), f"--output={marker}")):
        with pytest.raises(source.SourceError) as e:
            source.checkout(ref, remote, project)
        assert "nothing was changed" in str(e.value)
    assert not marker.exists()
    assert source.status(project).commit == shas[0]


@pytest.mark.parametrize("key, value", [
    ("build.base", "--privileged"), ("build.base", "debian:bookworm,--rm"), ("build.repository", "-x/llama"),
    ("build.repository", "podllama/llama-server:tag"), ("build.cuda_architectures", ["86;rm"]),
    ("build.rocm_targets", ["gfx1100 --x"]), ("servers.chat.gpus", ["--privileged"]),
    ("servers.chat.alias", "--api-key"), ("servers.chat.model", "-m.gguf"),
    ("servers.chat.args", {"chat_template": "--api-key-file=/etc/shadow"}), ("servers.chat.env", {"X": "a\x00b"}),
])
def test_config_values_that_reach_a_command_line(key, value):
    data = {"servers": {"chat": {"model": "tiny.gguf"}}}
    section, *rest = key.split(".")
    target = data.setdefault(section, {})
    for part in rest[:-1]:
        target = target[part]
    target[rest[-1]] = value
    with pytest.raises(ConfigError) as e:
        config.validate(data)
    assert key.split(".")[-1] in str(e.value)


def test_config_values_that_are_fine():
    cfg = config.validate({"build": {"base": "docker.io/library/debian:bookworm-slim,localhost/run:1",
                                     "cuda_architectures": ["86", "90a", "120-real"], "rocm_targets": ["gfx90a:xnack-"]},
                           "servers": {"chat": {"model": "org/tiny-Q4_K_M.gguf", "gpus": ["0", "GPU-8f3a", "/dev/dri/renderD128"],
                                                "args": {"seed": -1, "temp": "-0.5",
                                                         "chat_template": "{% for m in messages %}\n"}}}})
    assert cfg.servers["chat"].args["seed"] == -1


def test_a_hostile_base_image_on_the_command_line():
    """`podllama build --base`: refused before any engine command."""
    with pytest.raises(BuildError):
        bases.resolve_base("cpu", "--privileged")
    with pytest.raises(BuildError):
        bases.resolve_base("cpu", "debian:bookworm,-v/:/host")
    assert bases.resolve_base("cpu", "localhost/base:1").build == "localhost/base:1"


def test_a_hostile_revision_for_a_pull(tmp_path):
    with pytest.raises(hub.PullError) as e:
        hub.pull(Store(tmp_path), "org/repo:Q4_K_M", revision="../../etc", hub="http://127.0.0.1:9")
    assert "revision" in str(e.value)


def test_names_on_engine_command_lines_end_option_parsing():
    """Whatever slips through, values go in --flag=value form, and the image ends podman's options."""
    argv = PodmanEngine().run_argv(ContainerSpec(name="s-chat-1", image="podllama/llama-server:cpu",
                                                 args=["--model", "/models/x.gguf"], labels={"podllama.model": "-x"}))
    assert "--label=podllama.model=-x" in argv
    assert argv[argv.index("podllama/llama-server:cpu") + 1:] == ["--model", "/models/x.gguf"]


def test_git_fetch_gets_a_separator(tmp_path, monkeypatch):
    calls = []
    real = subprocess.run

    def spy(argv, *a, **kw):
        calls.append(list(argv))
        return real(argv, *a, **kw)

    shas = make_upstream(tmp_path / "sub", 2)
    project = tmp_path / "project"
    project.mkdir()
    git(project, "init", "-q")
    git(project, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(tmp_path / "sub"), "llama.cpp")
    git(project / "llama.cpp", "checkout", "-q", shas[0])
    monkeypatch.setattr(subprocess, "run", spy)
    source.checkout("master", str(tmp_path / "sub"), project)
    fetch = next(c for c in calls if "fetch" in c)
    assert fetch[fetch.index("fetch") + 2] == "--"
