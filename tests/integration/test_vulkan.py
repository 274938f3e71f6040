"""The Vulkan image, built by `podllama build --variant vulkan` and run on Mesa's software Vulkan device
(lavapipe, "llvmpipe"): a GPU-backend image verified end to end on a machine without a GPU. Its answers are
compared with the CPU image's, so a backend that computed wrongly would fail."""

from __future__ import annotations

import json
import math
import uuid

import httpx
import pytest

from podllama.build import images
from podllama.engine import ContainerSpec
from tests.helpers import podllama
from tests.integration.conftest import base_choice

# ggml's Vulkan backend skips CPU devices (llvmpipe) unless they are named
SOFTWARE_DEVICE = {"GGML_VK_VISIBLE_DEVICES": "0", "XDG_CACHE_HOME": "/tmp"}
EMBED = ("--n-gpu-layers", "99", "--embedding", "--pooling", "mean")


@pytest.fixture(scope="session")
def vulkan_image(podman, trixie_base) -> str:  # trixie: the Vulkan image's Debian
    base = base_choice(podman)
    built = json.loads(podllama("build", "--variant", "vulkan", "--native", "--ui", "off", "--engine", "podman",
                                "--base", base, "--json").stdout)
    assert built["variant"] == "vulkan" and built["smoke"]
    return images.tag_for("vulkan")


def embedding(url: str, text: str) -> list[float]:
    r = httpx.post(f"{url}/v1/embeddings", json={"input": text}, timeout=300)
    assert r.status_code == 200, r.text
    return list(r.json()["data"][0]["embedding"])


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_the_vulkan_image_runs_on_mesas_software_device(podman, vulkan_image, cpu_image, run_server):
    listed = podman.run_once(ContainerSpec(name=f"podllama-vk-{uuid.uuid4().hex[:8]}", image=vulkan_image,
                                           args=["--list-devices"], env=SOFTWARE_DEVICE))
    assert "Vulkan0: llvmpipe" in listed.stdout + listed.stderr
    gpu = run_server(podman, vulkan_image, *EMBED, "--device", "Vulkan0", env=SOFTWARE_DEVICE)
    cpu = run_server(podman, cpu_image, *EMBED)
    for text in ("hello world", "the lighthouse keeper paints the tower blue"):
        on_gpu, on_cpu = embedding(gpu.url, text), embedding(cpu.url, text)
        assert len(on_gpu) == len(on_cpu) == 64
        assert cosine(on_gpu, on_cpu) > 0.999, "the Vulkan backend's embedding differs from the CPU's"
    r = httpx.post(f"{gpu.url}/completion", json={"prompt": "Hello", "n_predict": 4}, timeout=300)
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 4


def test_without_the_device_named_the_vulkan_image_has_no_gpu(podman, vulkan_image):
    """The check above can fail: unnamed, llvmpipe is skipped and --device Vulkan0 is refused."""
    out = podman.run_once(ContainerSpec(name=f"podllama-vk-{uuid.uuid4().hex[:8]}", image=vulkan_image,
                                        args=["--list-devices"]))
    assert "llvmpipe" not in out.stdout + out.stderr
