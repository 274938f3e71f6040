"""Container engines: one interface (`CliEngine`), Podman and Docker behind it."""

from __future__ import annotations

import os

from .base import CliEngine, ContainerInfo, ContainerSpec, EngineError, GpuRequest, Mount, hardening
from .docker import DockerEngine
from .podman import PodmanEngine

ENGINES: dict[str, type[CliEngine]] = {"podman": PodmanEngine, "docker": DockerEngine}
REMOTE_ENV = "PODLLAMA_ENGINE_SOCKET"

__all__ = ["CliEngine", "ContainerInfo", "ContainerSpec", "DockerEngine", "EngineError", "GpuRequest", "Mount",
           "PodmanEngine", "get_engine", "hardening"]


def get_engine(name: str = "auto", remote: str | None = None) -> CliEngine:
    """The engine named (podman | docker), or for 'auto' the first one that answers (Podman first).

    REMOTE (or $PODLLAMA_ENGINE_SOCKET) is an API socket URL: the engine is then driven through it, as the
    gateway container does with the host's engine.
    """
    remote = remote or os.environ.get(REMOTE_ENV) or None
    if name != "auto":
        if name not in ENGINES:
            raise EngineError(f"unknown engine '{name}'; use podman, docker or auto")
        return ENGINES[name](remote)
    for cls in ENGINES.values():
        engine = cls(remote)
        if engine.available():
            return engine
    raise EngineError(
        "no container engine answers: install Podman (`apt-get install podman`, or run scripts/setup.sh) "
        "or start Docker (`dockerd`), then run `podllama doctor`"
    )
