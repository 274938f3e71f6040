"""Integration fixtures: real engines, the real llama-server image built by podllama, the tiny test model."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from podllama import images, source, tinymodel
from podllama.engine import CliEngine, ContainerSpec, Mount, get_engine
from podllama.health import wait_healthy

from tests.helpers import ROOT, podllama


def base_choice(engine: CliEngine) -> str:
    """Upstream bases where a registry gave them to us, else the Debian base `podllama base-image` made."""
    if os.environ.get("PODLLAMA_BASE"):
        return os.environ["PODLLAMA_BASE"]
    if engine.image_exists(images.UPSTREAM_BASES["cpu"][0]):
        return "upstream"
    if engine.image_exists(f"{images.LOCAL_BASE}:bookworm"):
        return "local"
    pytest.fail("no base image: run scripts/setup.sh (it pulls one or bootstraps localhost/podllama-base:bookworm)")


@pytest.fixture(scope="session")
def podman() -> CliEngine:
    engine = get_engine("podman")
    if not engine.available():
        pytest.fail("podman does not answer: run scripts/setup.sh")
    return engine


@pytest.fixture(scope="session")
def cpu_build(podman) -> dict:
    """The CPU image, built for real by `podllama build` (native CPU target: the portable one compiles every
    CPU variant and takes far longer on two cores; the code path is the same)."""
    proc = podllama("build", "--variant", "cpu", "--native", "--ui", "off", "--engine", "podman",
                    "--base", base_choice(podman), "--json")
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def cpu_image(cpu_build) -> str:
    return images.tag_for("cpu")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models directory holding the tiny test model (readable by the containers' non-root user)."""
    d = tmp_path_factory.mktemp("models")
    d.chmod(0o755)
    tinymodel.ensure(d / "tiny.gguf", source.source_dir(ROOT))
    return d


class Server:
    def __init__(self, engine: CliEngine, name: str, url: str) -> None:
        self.engine, self.name, self.url = engine, name, url

    def logs(self) -> str:
        return "".join(self.engine.logs(self.name, tail=50))


@pytest.fixture
def run_server(models_dir) -> Iterator:
    """Start llama-server containers from an image with the tiny model; removed at the end of the test."""
    started: list[tuple[CliEngine, str]] = []

    def start(engine: CliEngine, image: str, *args: str, model: str = "tiny.gguf") -> Server:
        name = f"podllama-test-{uuid.uuid4().hex[:8]}"
        engine.run(ContainerSpec(name=name, image=image, labels={"podllama.test": "true"},
                                 args=["--model", f"/models/{model}", "--ctx-size", "1024", *args],
                                 mounts=[Mount(str(models_dir), "/models")], ports=[("127.0.0.1", 0, 8080)]))
        started.append((engine, name))
        info = engine.inspect(name)
        assert info is not None and 8080 in info.ports, f"no published port: {info}"
        url = f"http://127.0.0.1:{info.ports[8080]}"
        state = wait_healthy(url, timeout=120, alive=lambda: bool((i := engine.inspect(name)) and i.running))
        assert state == "ok", f"server not healthy ({state}):\n{''.join(engine.logs(name, tail=50))}"
        return Server(engine, name, url)

    yield start
    for engine, name in started:
        engine.remove(name)
