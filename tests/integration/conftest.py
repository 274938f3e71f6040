"""Integration fixtures: real engines, the real llama-server image built by podllama, the tiny test model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from podllama.build import bases, images, source
from podllama.engine import CliEngine, ContainerSpec, Mount, get_engine
from podllama.engine.health import wait_healthy
from podllama.models import tinymodel
from tests.helpers import ROOT, podllama
from tests.postgres import Postgres


def base_choice(engine: CliEngine) -> str:
    """Upstream bases where a registry gave them to us, else the Debian base `podllama base-image` made."""
    if os.environ.get("PODLLAMA_BASE"):
        return os.environ["PODLLAMA_BASE"]
    if engine.image_exists(bases.UPSTREAM_BASES["cpu"][0]):
        return "upstream"
    if engine.image_exists(f"{bases.LOCAL_BASE}:bookworm"):
        return "local"
    pytest.fail("no base image: run scripts/setup.sh (it pulls one or bootstraps localhost/podllama-base:bookworm)")


@pytest.fixture(scope="session")
def trixie_base(podman) -> str:
    """A Debian 13 (trixie) base image: upstream's where a registry gave us one, else `podllama base-image`'s."""
    if base_choice(podman) == "upstream":
        return bases.UPSTREAM_BASES["vulkan"][0]
    if not podman.image_exists(f"{bases.LOCAL_BASE}:trixie"):
        podllama("base-image", "--suite", "trixie", "--engine", "podman")
    return f"{bases.LOCAL_BASE}:trixie"


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

    def start(engine: CliEngine, image: str, *args: str, model: str = "tiny.gguf",
              env: dict[str, str] | None = None) -> Server:
        name = f"podllama-test-{uuid.uuid4().hex[:8]}"
        engine.run(ContainerSpec(name=name, image=image, labels={"podllama.test": "true"}, env=env or {},
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


@pytest.fixture(scope="session")
def docker() -> CliEngine:
    """Docker Engine, its daemon started here when no service manager runs it (CI machines)."""
    from podllama.build import doctor

    try:
        doctor.start_dockerd()
    except RuntimeError as e:
        pytest.fail(f"{e}; run scripts/setup.sh --with-docker")
    return get_engine("docker")


@pytest.fixture(scope="session")
def docker_cpu_image(docker, podman, cpu_image, tmp_path_factory) -> str:
    """The llama-server image podllama built, handed from Podman to Docker (same image id)."""
    want = podman.image_id(cpu_image)
    if docker.image_id(cpu_image) != want:
        tar = tmp_path_factory.mktemp("image") / "llama-server.tar"
        podman.save(cpu_image, tar)
        docker.load(tar)
        docker.tag(want, cpu_image)
        tar.unlink()
    assert docker.image_id(cpu_image) == want
    return cpu_image


@pytest.fixture(scope="session")
def docker_ready(docker, podman, docker_cpu_image, tmp_path_factory) -> CliEngine:
    """Docker with the llama-server image and, where builds use the local base, that base image too."""
    base = f"{bases.LOCAL_BASE}:bookworm"
    if base_choice(podman) == "local" and not docker.image_exists(base):
        tar = tmp_path_factory.mktemp("base") / "base.tar"
        podman.save(base, tar)
        docker.load(tar)
        tar.unlink()
    return docker


@pytest.fixture(params=["podman", "docker"])
def engine(request) -> CliEngine:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["podman", "docker"])
def stack_engine(request) -> CliEngine:
    """Each engine, ready to run a whole stack (images and base images present)."""
    return request.getfixturevalue("cpu_image" if request.param == "podman" else "docker_ready") and \
        request.getfixturevalue(request.param)


@pytest.fixture
def llama_image(engine, request) -> str:
    return request.getfixturevalue("cpu_image" if engine.name == "podman" else "docker_cpu_image")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StackFiles:
    """A services.toml of its own in a temporary directory, and the `podllama` command pointed at it."""

    def __init__(self, directory: Path, name: str, engine: CliEngine, models: Path, port: int) -> None:
        self.dir, self.name, self.engine, self.models, self.port = directory, name, engine, models, port
        self.path = directory / "services.toml"

    def write(self, servers: str, extra: str = "", gateway: str = "") -> StackFiles:
        base = base_choice(self.engine)
        self.path.write_text(f"""
[stack]
name = "{self.name}"
engine = "{self.engine.name}"
variant = "cpu"
models_dir = "{self.models}"
ready_timeout = 120
[build]
base = "{base}"
cpu_target = "native"
ui = "off"
[gateway]
port = {self.port}
{gateway}
[supervisor]
interval = 0.5
{extra}
{servers}
""")
        return self

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
        return podllama(*args, "-c", str(self.path), check=check, **kw)

    def status(self) -> dict:
        return json.loads(self.run("status", "--json").stdout)

    @property
    def admin(self) -> dict[str, str]:
        """Headers with this stack's admin key (made by its first start)."""
        from podllama.access.credentials import Credentials

        return {"Authorization": f"Bearer {Credentials(self.dir / '.podllama').admin_key()}"}

    @property
    def server_key(self) -> dict[str, str]:
        """Headers with the key this stack's llama-servers require (only the gateway sends it)."""
        from podllama.access.credentials import Credentials

        return {"Authorization": f"Bearer {Credentials(self.dir / '.podllama').server_key()}"}

    def api(self, timeout: float = 60) -> httpx.Client:
        """A client for the stack's gateway that sends the admin key."""
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=self.admin, timeout=timeout)

    def config(self):
        from podllama import config

        return config.load(self.path)


CHAT_AND_EMBED = """
[servers.chat]
role = "chat"
model = "tiny.gguf"
alias = "tiny-chat"
ctx_size = 1024
args = { parallel = 2 }

[servers.embed]
role = "embedding"
model = "tiny.gguf"
alias = "tiny-embed"
ctx_size = 512
args = { pooling = "mean" }
"""


@pytest.fixture
def stack_files(tmp_path, models_dir, cpu_image):
    """A fresh stack per test (removed afterwards, containers and network), on Podman."""
    made: list[StackFiles] = []

    def make(engine: CliEngine, servers: str = CHAT_AND_EMBED, extra: str = "", models: Path | None = None,
             gateway: str = "") -> StackFiles:
        d = tmp_path / f"stack{len(made)}"
        d.mkdir()
        sf = StackFiles(d, f"pt{uuid.uuid4().hex[:6]}", engine, models or models_dir, free_port()).write(
            servers, extra, gateway)
        made.append(sf)
        return sf

    yield make
    for sf in made:
        sf.run("down", check=False)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A real Postgres of its own (tests/postgres.py) for the module's tests."""
    d = Path(tempfile.mkdtemp(prefix="podllama-pg-", dir="/var/tmp"))
    os.chmod(d, 0o755)  # the postgres user runs the server inside
    pg = Postgres(d / "cluster", free_port()).init()
    yield pg
    pg.stop()
    shutil.rmtree(d, ignore_errors=True)
