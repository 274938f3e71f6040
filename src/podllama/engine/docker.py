"""Docker Engine (through /var/run/docker.sock, or DOCKER_HOST / `-H` for a remote socket)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .base import CliEngine, EngineError, GpuRequest


class DockerEngine(CliEngine):
    name = "docker"
    binary = "docker"

    def base_argv(self) -> list[str]:
        return [self.binary, "-H", self.remote] if self.remote else [self.binary]

    def api_socket(self) -> Path:
        host = os.environ.get("DOCKER_HOST", "")
        return Path(host.removeprefix("unix://")) if host.startswith("unix://") else Path("/var/run/docker.sock")

    def push(self, ref: str, tls_verify: bool = True, timeout: float = 1800) -> str:
        """TLS_VERIFY is the daemon's business with Docker (`insecure-registries`; loopback registries are
        allowed without TLS)."""
        out = self.run_cli("push", "--", ref, timeout=timeout).stdout
        found = re.search(r"digest: (sha256:[0-9a-f]{64})", out)
        if found is None:
            raise EngineError(f"`docker push {ref}` did not say which digest it stored: {out[-300:]}")
        return found.group(1)

    def build_env(self) -> dict[str, str]:
        return {"DOCKER_BUILDKIT": "1"}  # cache mounts and build secrets (RUN --mount) need BuildKit

    def build_args(self, containerfile: Path, context: Path, build_args: dict[str, str], labels: dict[str, str],
                   iidfile: Path, secrets: dict[str, Path] | None = None) -> list[str]:
        # one line per event, whatever the terminal: how far the build is can be read from it
        argv = super().build_args(containerfile, context, build_args, labels, iidfile, secrets)
        return argv[:1] + ["--progress=plain"] + argv[1:]

    def build_client(self) -> str:
        """A docker client that can build with BuildKit: one with the buildx plugin (Docker CLI 23 and newer
        need it), or an older client, which has BuildKit built in (Debian's docker.io 20.10)."""
        if subprocess.run([self.binary, "buildx", "version"], capture_output=True).returncode == 0:
            return self.binary
        for client in (shutil.which(self.binary), "/usr/bin/docker", "/usr/local/bin/docker"):
            if not client or not os.path.exists(client):
                continue
            out = subprocess.run([client, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
            major = out.stdout.strip().split(".")[0]
            if major.isdigit() and int(major) < 23:
                return client
        raise EngineError("Docker builds need BuildKit: install the buildx plugin (package docker-buildx-plugin or "
                          "docker-buildx), or use Podman (--engine podman)")

    def build_argv(self) -> list[str]:
        return [self.build_client()] + (["-H", self.remote] if self.remote else [])

    def untag(self, ref: str) -> None:
        self.run_cli("rmi", "--no-prune", ref, check=False)

    def gpu_flags(self, gpu: GpuRequest) -> list[str]:
        if gpu.backend == "cuda":  # nvidia-container-toolkit's runtime hook
            ids = "all" if gpu.devices == ["all"] else '"device=' + ",".join(gpu.devices) + '"'
            return [f"--gpus={ids}"]
        return super().gpu_flags(gpu)
