"""The gateway container of a stack: its spec (the engine's API socket, the checkout, the config and the model
store mounted at their host paths), where it listens, bringing it up, and telling it from whatever else
answers on its port."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..access import tls
from ..build import push
from ..engine import ContainerSpec, EngineError, Mount, hardware
from ..engine.base import ROCM_GROUPS_ENV, rocm_groups
from ..models import memory
from .spec import GATEWAY_PORT, L_HASH, L_KIND, L_STACK, StackError, spec_hash

if TYPE_CHECKING:
    from .core import Stack

ENGINE_SOCKET_DIR = "/run/podllama/engine"  # where the gateway container sees the host's engine API
ENGINE_SOCKET = f"{ENGINE_SOCKET_DIR}/engine.sock"


def socket_mount(socket: Path) -> tuple[Mount, str]:
    """The mount that shows the engine's API socket to the gateway, and the socket's path inside. A socket in a
    directory of its own (Podman's /run/podman) is seen through that directory: a service that restarts makes
    a new socket file there, which a mount of the old file would never show. One directly in /run (Docker's)
    is mounted alone; Docker's containers restart with its daemon and see the new file then."""
    if socket.parent in (Path("/run"), Path("/var/run")):
        return Mount(str(socket), ENGINE_SOCKET, read_only=False), ENGINE_SOCKET
    return Mount(str(socket.parent), ENGINE_SOCKET_DIR, read_only=True), f"{ENGINE_SOCKET_DIR}/{socket.name}"


class GatewayContainer:
    """The gateway's own container — spec, engine socket, start — as the stack runs it (the app inside is
    gateway/app.Gateway)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    @property
    def name(self) -> str:
        return f"{self.stack.name}-gateway"

    @property
    def url(self) -> str:
        return self.stack.cfg.gateway.url

    def spec(self, image: str, socket: Path, root: Path) -> ContainerSpec:
        """The gateway runs as root inside (to use the engine socket) but with no capabilities, no new
        privileges and a read-only root; the checkout, the config's directory and the model store are
        mounted at their host paths, so paths it hands to the engine mean the same on the host."""
        st = self.stack
        if st.cfg.source is None:
            raise StackError("the gateway container needs a config file on disk (-c/--config PATH)")
        dirs: list[Path] = []
        for d in (root.resolve(), st.cfg.source.parent, st.cfg.models_path):
            if not any(d == p or d.is_relative_to(p) for p in dirs):
                dirs = [p for p in dirs if not p.is_relative_to(d)] + [d]
        material = tls.of(st.cfg)
        # the user's certificate and key, read-only at their host paths where no mount above shows them
        own_tls = [] if material is None or material.self_signed else [
            Mount(str(f), str(f), read_only=True) for f in (material.cert.resolve(), material.key.resolve())
            if not any(f.is_relative_to(d) for d in dirs)]
        variant = hardware.resolve_variant(st.cfg.stack.variant, st.hardware) if st.default_variant is None \
            else st.default_variant
        gw = st.cfg.gateway
        mount, inside = socket_mount(socket)
        spec = ContainerSpec(
            name=self.name, image=image, user="0:0", restart="unless-stopped",
            labels={L_STACK: st.name, L_KIND: "gateway"},
            env={"PODLLAMA_CONFIG": str(st.cfg.source), "PODLLAMA_HOME": str(root.resolve()),
                 "PODLLAMA_ENGINE": st.engine.name, "PODLLAMA_VARIANT": variant,
                 "PODLLAMA_PUBLISHED_HOST": gw.host, "PODLLAMA_ENGINE_SOCKET": f"unix://{inside}",
                 "PODLLAMA_GPU_MEMORY": memory.gpu_totals_text(st.hardware.gpus),
                 ROCM_GROUPS_ENV: ",".join(rocm_groups())},
            mounts=[mount] + [Mount(str(d), str(d), read_only=False) for d in dirs] + own_tls,
        )
        if self.network() == "host":
            # on the host's network: it binds the one port itself, and reaches the servers at their addresses
            spec.network, spec.args = "host", ["--host", gw.host, "--port", str(gw.port)]
            if gw.port < 1024:
                spec.cap_add = ["NET_BIND_SERVICE"]
        else:
            spec.network, spec.network_aliases = st.network, ["gateway"]
            spec.ports = [(gw.host, gw.port, GATEWAY_PORT)]
        return spec

    def network(self) -> str:
        """'host' or 'stack'. Auto picks the host's network where the servers' addresses are reachable from the
        host (rootful engines): it saves the published port's extra hop through NAT on every request."""
        choice = self.stack.cfg.gateway.network
        if choice != "auto":
            return choice
        return "host" if os.geteuid() == 0 and self.stack.engine.remote is None else "stack"

    def start(self, root: Path, on_line: Callable[[str], None] | None = None) -> str:
        """The gateway container up: the engine's API socket ready (started where podllama can), the gateway
        image built from ROOT's code when missing, the container (re)created when it changed. Returns its URL."""
        from ..build import doctor

        st = self.stack
        finding = doctor.check_socket(st.engine, fix=True)
        if not finding.ok:
            raise StackError(f"the gateway drives {st.engine.name} through its API socket, but {finding.detail}: "
                             f"{finding.fix}")
        image = push.gateway_image(st.engine, st.cfg, root, st.cfg.state_path / "logs", say=st.progress,
                                   on_line=on_line)
        return self.run(image, st.engine.api_socket(), root)

    def run(self, image: str, socket: Path, root: Path, wait: bool = True) -> str:
        st = self.stack
        spec = self.spec(image, socket, root)
        spec.labels[L_HASH] = spec_hash(spec, st.engine.image_id(image) or image)
        info = st.engine.inspect(self.name)
        if info is None or info.labels.get(L_HASH) != spec.labels[L_HASH]:
            if info is not None:
                st.progress(f"recreating {self.name} (podllama or its settings changed)")
                st.engine.remove(self.name)
            try:
                st.engine.run(spec)
            except EngineError as e:
                raise StackError(f"the gateway container did not start: {e}") from None
        elif not info.running:
            st.engine.start(self.name)
        if wait:
            deadline = time.monotonic() + 60
            holder = self.port_holder()
            while holder != "ours" and time.monotonic() < deadline:
                info = st.engine.inspect(self.name)
                if info is None or not info.running:
                    break
                time.sleep(0.2)
                holder = self.port_holder()
            if holder != "ours":
                why = f"{self.url} is answered by {holder}" if holder else "it does not answer"
                raise StackError(f"the gateway did not come up: {why}. Last log lines:\n{st.tail(self.name)}")
        return self.url

    def port_holder(self) -> str | None:
        """Who answers on the gateway's address: "ours" (this stack's gateway), a description of whatever else
        does, or None when nothing listens there."""
        gw = self.stack.cfg.gateway
        host = self.url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
        material = tls.of(self.stack.cfg)
        conn = http.client.HTTPConnection(host, gw.port, timeout=3) if material is None else \
            http.client.HTTPSConnection(host, gw.port, timeout=3, context=material.client_context())
        try:
            conn.request("GET", "/health")
            r = conn.getresponse()
            body = r.read(4096)
        except ConnectionRefusedError:
            return None
        except ssl.SSLError as e:
            return f"a program whose TLS podllama does not trust ({e.reason or e})"
        except (OSError, http.client.HTTPException):
            return "another program (it does not speak HTTP)" if material is None else \
                "another program (it does not speak HTTPS)"
        finally:
            conn.close()
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        if isinstance(data, dict) and data.get("service") == "podllama-gateway":
            return "ours" if data.get("stack") == self.stack.name else \
                f"the gateway of another stack ('{data.get('stack')}')"
        server = r.getheader("server")
        return f"another program (it answered /health with {r.status}{', ' + server if server else ''})"
