"""Fast-tier fixtures: the gateway app in-process (served by the same uvicorn setup as the container), in
front of a scripted upstream instead of llama-server containers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httptools
import httpx
import pytest
import uvicorn

from podllama import config
from podllama.access import tls
from podllama.gateway.app import Gateway
from podllama.gateway.front import server
from podllama.gateway.routing.servers import NO_LINEAGE, Lineage
from podllama.gateway.routing.upstreams import Target
from podllama.models import tinymodel
from tests.scripted import Upstream


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, vocab_file) -> Path:
    """A models directory with the tiny test model (tiny.gguf), for stacks on the fake engine."""
    d = tmp_path_factory.mktemp("models")
    tinymodel.write(d / "tiny.gguf", vocab_file)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.stop()


@dataclass
class Running:
    url: str
    port: int
    gw: Gateway
    cfg_path: Path
    admin: dict[str, str]

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=10, **kw)

    def raw(self, data: bytes, timeout: float = 5) -> bytes:
        """Send DATA on a new connection; everything that comes back until the gateway closes or goes quiet."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            return recv_all(sock, timeout)


class _Complete:
    done = False

    def on_message_complete(self) -> None:
        self.done = True


def recv_all(sock: socket.socket, timeout: float) -> bytes:
    """What comes back: until one whole response is in, the connection closes, or TIMEOUT passes quietly."""
    sock.settimeout(timeout)
    out = b""
    state = _Complete()
    parser = httptools.HttpResponseParser(state)
    try:
        while piece := sock.recv(65536):
            out += piece
            try:
                parser.feed_data(piece)
            except httptools.HttpParserError:
                pass
            if state.done:
                break
    except (TimeoutError, ConnectionResetError):
        pass
    return out


SERVERS = """
[servers.chat]
model = "tiny.gguf"
alias = "tiny-chat"
args = { parallel = 2 }

[servers.embed]
role = "embedding"
model = "tiny.gguf"
alias = "tiny-embed"
"""


@pytest.fixture
def gateway(tmp_path, upstream) -> Iterator:
    """Start the gateway in-process for a config whose servers all point at the scripted upstream.
    gateway(extra_toml) → Running; called once per test."""
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(gateway_toml: str = "", servers: str = SERVERS, targets: dict[str, int] | None = None,
              lineage: Lineage = NO_LINEAGE) -> Running:
        port = free_port()
        path = tmp_path / "services.toml"
        path.write_text(f'[stack]\nname = "unit"\nengine = "podman"\nmodels_dir = "models"\n'
                        f'[gateway]\nport = {port}\n{gateway_toml}\n{servers}')
        cfg = config.load(path)
        material, _ = tls.ensure(cfg)
        ports = targets or {name: upstream.port for name in cfg.servers}
        gw = Gateway(cfg, supervise=False, engine_name="podman", poll_every=0.25,
                     discover=lambda: [Target(n, f"unit-{n}-1", "127.0.0.1", p, lineage) for n, p in ports.items()])
        srv = uvicorn.Server(server.config(gw, "127.0.0.1", port, gw.limits, material))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        started.append((srv, thread))
        deadline = time.monotonic() + 10
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.started, "the gateway did not start"
        key = gw.credentials.admin_key()
        return Running(cfg.gateway.url, port, gw, path, {"Authorization": f"Bearer {key}"})

    yield start
    for srv, thread in started:
        srv.should_exit = True
        thread.join(10)
