"""Docker Engine (through /var/run/docker.sock, or DOCKER_HOST / `-H` for a remote socket)."""

from __future__ import annotations

import os
from pathlib import Path

from .base import CliEngine, GpuRequest

SOCKET = "unix:///var/run/docker.sock"


class DockerEngine(CliEngine):
    name = "docker"
    binary = "docker"

    def base_argv(self) -> list[str]:
        return [self.binary, "-H", self.remote] if self.remote else [self.binary]

    def api_socket(self) -> Path:
        host = os.environ.get("DOCKER_HOST", "")
        return Path(host.removeprefix("unix://")) if host.startswith("unix://") else Path("/var/run/docker.sock")

    def build_env(self) -> dict[str, str]:
        return {"DOCKER_BUILDKIT": "1"}  # cache mounts (RUN --mount=type=cache) need BuildKit

    def untag(self, ref: str) -> None:
        self.run_cli("rmi", "--no-prune", ref, check=False)

    def gpu_flags(self, gpu: GpuRequest) -> list[str]:
        if gpu.backend == "cuda":  # nvidia-container-toolkit's runtime hook
            ids = "all" if gpu.devices == ["all"] else '"device=' + ",".join(gpu.devices) + '"'
            return [f"--gpus={ids}"]
        return super().gpu_flags(gpu)
