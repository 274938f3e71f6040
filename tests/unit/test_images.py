import shutil

import pytest

from podllama import images
from podllama.images import BuildError


def test_base_choices():
    up = images.resolve_base("cuda", "upstream")
    assert up.build.startswith("docker.io/nvidia/cuda:") and "devel" in up.build and "runtime" in up.runtime
    local = images.resolve_base("vulkan", "local")
    assert local.build == local.runtime == "localhost/podllama-base:trixie" and local.kind == "local"
    custom = images.resolve_base("cpu", "my/build:1, my/run:1")
    assert (custom.build, custom.runtime, custom.kind) == ("my/build:1", "my/run:1", "custom")
    assert images.resolve_base("cpu", "one:1").runtime == "one:1"
    with pytest.raises(BuildError, match="no local base for 'rocm'.*--base IMAGE"):
        images.resolve_base("rocm", "local")


def test_build_args_carry_the_gpu_targets():
    base = images.resolve_base("cuda", "upstream")
    args = images.build_args_for("cuda", base, "a" * 40, 7, "portable", "off", ["89", "90"], [])
    assert args["CUDA_ARCHITECTURES"] == "89;90" and args["LLAMA_COMMIT"] == "a" * 12
    assert args["LLAMA_BUILD_NUMBER"] == "7" and "ROCM_TARGETS" not in args
    args = images.build_args_for("rocm", images.resolve_base("rocm", "upstream"), "b" * 40, 0, "native", "on", [], [])
    assert args["ROCM_TARGETS"] == ";".join(images.DEFAULT_ROCM_TARGETS) and args["UI"] == "on"


def test_every_variant_has_a_containerfile(project_root):
    for variant in ("cpu", "cuda", "rocm", "vulkan"):
        text = images.containerfile(variant, project_root).read_text()
        assert "ARG BUILD_BASE=" in text and "ARG RUNTIME_BASE=" in text and "HEALTHCHECK" in text
        assert "USER 10001" in text and "llama-server.help" in text and "LLAMA_BUILD_COMMIT" in text
    with pytest.raises(BuildError, match="no Containerfile"):
        images.containerfile("metal", project_root)


def fake_ui(tmp_path, script: str):
    ui = tmp_path / "tools" / "ui"
    ui.mkdir(parents=True)
    (ui / "package.json").write_text('{"name": "ui", "version": "1.0.0", "scripts": {"build": "' + script + '"}}')
    (ui / "package-lock.json").write_text('{"name": "ui", "version": "1.0.0", "lockfileVersion": 3, "requires": true,'
                                          ' "packages": {"": {"name": "ui", "version": "1.0.0"}}}')
    return ui


needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed on this machine")


@needs_npm
def test_ui_is_built_with_npm_once_per_commit(tmp_path):
    ui = fake_ui(tmp_path, "mkdir -p dist && echo built >> dist/index.html")
    log = open(tmp_path / "log", "w")
    assert images.prepare_ui("auto", tmp_path, "c1", log, print) == ("on", "built from tools/ui with npm")
    assert (ui / "dist" / "index.html").read_text() == "built\n"
    state, why = images.prepare_ui("auto", tmp_path, "c1", log, print)
    assert state == "on" and "earlier" in why and (ui / "dist" / "index.html").read_text() == "built\n"


@needs_npm
def test_a_failing_ui_build_is_reported_not_fatal_in_auto_mode(tmp_path):
    ui = fake_ui(tmp_path, "mkdir -p dist && exit 3")
    log = open(tmp_path / "log", "w")
    state, why = images.prepare_ui("auto", tmp_path, "c1", log, print)
    assert state == "off" and "npm run build" in why and not (ui / "dist").exists()
    with pytest.raises(BuildError, match="npm run build"):
        images.prepare_ui("on", tmp_path, "c1", log, print)


def test_ui_off_and_missing_npm(tmp_path, monkeypatch):
    assert images.prepare_ui("off", tmp_path, "c", None, print)[0] == "off"
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    assert images.prepare_ui("auto", tmp_path, "c", None, print) == (
        "off", "npm not found (install Node.js and npm to build the web UI)")
    with pytest.raises(BuildError, match="needs npm"):
        images.prepare_ui("on", tmp_path, "c", None, print)
