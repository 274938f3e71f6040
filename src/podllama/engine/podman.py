"""Podman (rootful or rootless; locally, or remotely through its API socket with `--remote`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .base import CliEngine, GpuRequest


class PodmanEngine(CliEngine):
    name = "podman"
    binary = "podman"

    def base_argv(self) -> list[str]:
        return [self.binary, "--remote", f"--url={self.remote}"] if self.remote else [self.binary]

    def build_args(self, containerfile: Path, context: Path, build_args: dict[str, str], labels: dict[str, str],
                   iidfile: Path, secrets: dict[str, Path] | None = None) -> list[str]:
        # docker format: OCI images drop HEALTHCHECK
        argv = super().build_args(containerfile, context, build_args, labels, iidfile, secrets)
        return argv[:1] + ["--format=docker", "--layers"] + argv[1:]

    def api_socket(self) -> Path:
        """Where this host's Podman API socket lives (rootful, or the user's for rootless Podman)."""
        if os.geteuid() == 0:
            return Path("/run/podman/podman.sock")
        return Path(os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.geteuid()}")) / "podman" / "podman.sock"

    def push(self, ref: str, tls_verify: bool = True, timeout: float = 1800) -> str:
        with tempfile.TemporaryDirectory() as d:
            digest_file = Path(d) / "digest"
            self.run_cli("push", f"--tls-verify={str(tls_verify).lower()}", "--digestfile", str(digest_file), "--",
                         ref, timeout=timeout)
            return digest_file.read_text().strip()

    def pull_options(self, tls_verify: bool) -> list[str]:
        return [f"--tls-verify={str(tls_verify).lower()}"]

    def untag(self, ref: str) -> None:
        self.run_cli("untag", ref, ref, check=False)  # the name to remove: alone, `untag IMAGE` removes all of them

    def gpu_flags(self, gpu: GpuRequest) -> list[str]:
        if gpu.backend == "cuda":  # Container Device Interface, from nvidia-container-toolkit
            return [f"--device=nvidia.com/gpu={d}" for d in gpu.devices]
        return super().gpu_flags(gpu)

    def version(self) -> str:
        return self.run_cli("version", "--format", "{{.Server.Version}}" if self.remote else "{{.Client.Version}}").stdout.strip()

    def network_exists(self, name: str) -> bool:
        return self.run_cli("network", "exists", name, check=False).returncode == 0
