"""The llama-server image: built for real from the submodule, smoke-tested, tagged, and answering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx

from podllama.build import images, source
from podllama.engine import ContainerSpec
from tests.helpers import ROOT, podllama

PINNED = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def test_build_tags_the_commit_and_the_variant_after_the_smoke_test(podman, cpu_build):
    commit = source.status(ROOT).commit
    assert cpu_build["commit"] == commit
    assert cpu_build["tags"] == [f"podllama/llama-server:cpu-{commit[:12]}", "podllama/llama-server:cpu"]
    assert cpu_build["smoke"]["completion_tokens"] > 0
    assert podman.image_id("podllama/llama-server:cpu") == cpu_build["image_id"]
    assert podman.image_id(f"podllama/llama-server:cpu-{commit[:12]}") == cpu_build["image_id"]
    labels = podman.image_labels("podllama/llama-server:cpu")
    assert labels["podllama.llama-commit"] == commit and labels["podllama.variant"] == "cpu"
    assert json.loads(labels["podllama.build-args"])["CPU_TARGET"] == "native"
    assert labels["org.opencontainers.image.revision"] == commit


def test_version_names_the_real_commit(podman, cpu_image):
    out = podman.run_once(ContainerSpec(name="podllama-test-version", image=cpu_image, args=["--version"]))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert f"({PINNED[:7]})" in text or PINNED[:7] in text.split("version:")[1], text
    assert "unknown" not in text


def test_rebuild_without_changes_reuses_the_cache(podman, cpu_build):
    again = json.loads(podllama("build", "--variant", "cpu", "--native", "--ui", "off", "--engine", "podman",
                                "--base", _base(cpu_build), "--json", "--no-smoke").stdout)
    assert again["image_id"] == cpu_build["image_id"]  # every layer came from the cache
    assert again["previous"] is None


def _base(build: dict) -> str:
    return "local" if "[local]" in build["base"] else "upstream"


def test_flags_are_recorded_with_the_image(podman, cpu_image):
    flags = images.record_flags(podman, cpu_image)
    for name in ("--parallel", "-np", "--embedding", "--rerank", "--pooling", "--metrics", "--no-jinja", "--flash-attn"):
        assert name in flags, name
    assert len(flags) > 150


def test_server_answers_chat_completions(podman, cpu_image, run_server):
    server = run_server(podman, cpu_image)
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 5


def test_server_answers_embeddings(podman, cpu_image, run_server):
    server = run_server(podman, cpu_image, "--embedding", "--pooling", "mean")
    r = httpx.post(f"{server.url}/v1/embeddings", timeout=60, json={"input": ["hello world", "bye"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2 and len(data[0]["embedding"]) == 64
    assert data[0]["embedding"] != data[1]["embedding"]


def test_container_runs_as_non_root_with_a_healthcheck(podman, cpu_image):
    info = podman.image_inspect(cpu_image)
    config = info.get("Config") or {}
    assert config.get("User") == "10001"
    health = config.get("Healthcheck") or info.get("Healthcheck") or {}
    assert "/health" in " ".join(health.get("Test", []))


def test_unavailable_base_image_fails_fast_and_changes_nothing(podman, cpu_build, tmp_path):
    def snapshot():
        return sorted((r["tag"], r["id"]) for r in podman.list_images(images.REPO))

    before = snapshot()
    assert ("cpu", cpu_build["image_id"]) in before
    proc = podllama("build", "--variant", "cpu", "--engine", "podman", "--base", "registry.invalid/nothing:1",
                    check=False, timeout=120)
    assert proc.returncode == 1
    assert "base image registry.invalid/nothing:1 cannot be had" in proc.stderr and "podllama base-image" in proc.stderr
    # a GPU the local base's CUDA 13 cannot build for is refused before any toolkit or image is made
    (tmp_path / "services.toml").write_text('[build]\ncuda_architectures = ["61"]\n')
    proc = podllama("build", "--variant", "cuda", "--engine", "podman", "--base", "local", "--config",
                    str(tmp_path / "services.toml"), check=False, timeout=120)
    assert proc.returncode == 1 and "cannot build for compute capability 61" in proc.stderr, proc.stderr
    assert "CUDA 12 base" in proc.stderr
    assert snapshot() == before


def test_detect_says_cpu_here():
    hw = json.loads(podllama("detect", "--json").stdout)
    assert {"cpu", "gpus", "variants"} <= set(hw) and hw["variants"][-1] == "cpu"
    if not Path("/dev/dri").exists() and shutil.which("nvidia-smi") is None:  # a machine like CI's
        assert hw["variants"] == ["cpu"] and hw["gpus"] == []
