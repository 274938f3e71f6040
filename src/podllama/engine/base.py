"""The one place that talks to a container engine.

Both engines are driven through their command-line clients: Podman needs no daemon on the host, the CLI is each
engine's documented and most stable interface, builds get BuildKit/buildah features (cache mounts) as users
know them, GPU flags (CDI devices, --gpus) are spelled as the engines document them, and inside the gateway
container the same code drives the host's engine through its API socket (`podman --remote`, `docker -H`).

Security flags are applied here and nowhere else (see `hardening`).
"""

from __future__ import annotations

import builtins
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import gpumemory


class EngineError(Exception):
    """A container engine call failed; the message carries the engine's own words."""


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool = True


ROCM_GROUPS_ENV = "PODLLAMA_ROCM_GROUPS"  # the host's answer, for the gateway container (which cannot see /dev)


def rocm_groups() -> list[str]:
    """The groups a ROCm container's user needs to open /dev/kfd and the render nodes: video, and the host's own
    group ids of those nodes (render's id differs between distributions and is not in the image's /etc/group).
    Inside the gateway container, what the host told it."""
    told = os.environ.get(ROCM_GROUPS_ENV)
    if told is not None:
        return [g for g in told.split(",") if g == "video" or (g.isdigit() and len(g) <= 10)]
    gids = set()
    for path in ["/dev/kfd", *glob.glob("/dev/dri/renderD*")]:
        try:
            gids.add(os.stat(path).st_gid)
        except OSError:
            continue
    return ["video", *(str(g) for g in sorted(gids) if g != 0)]


def device_nodes(gpu: GpuRequest) -> list[str]:
    """The device nodes an AMD (ROCm) or Vulkan GPU request passes into a container (NVIDIA's come by CDI or the
    runtime hook)."""
    if gpu.backend == "rocm":
        return ["/dev/kfd", "/dev/dri"]
    return ["/dev/dri"] if gpu.devices == ["all"] else gpu.devices


@dataclass
class GpuRequest:
    """GPUs a container needs: a backend (cuda | rocm | vulkan) and device ids ("all", or indices/render nodes)."""

    backend: str
    devices: list[str] = field(default_factory=lambda: ["all"])


@dataclass
class ContainerSpec:
    name: str
    image: str
    args: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    network: str | None = None
    network_aliases: list[str] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    # (host address, host port, container port); host port 0 lets the engine pick one
    ports: list[tuple[str, int, int]] = field(default_factory=list)
    gpu: GpuRequest | None = None
    entrypoint: list[str] | None = None
    user: str | None = None
    tmpfs: list[str] = field(default_factory=lambda: ["/tmp"])
    read_only_root: bool = True
    stop_timeout: int = 10
    cap_add: list[str] = field(default_factory=list)  # the only capabilities given back after dropping all
    groups: list[str] = field(default_factory=list)  # supplementary groups (e.g. to read a mounted secret)
    restart: str | None = None  # the engine's restart policy (the gateway's: it supervises everything else)


@dataclass
class ContainerInfo:
    id: str
    name: str
    image: str
    image_id: str
    state: str  # created | running | exited | paused | ...
    exit_code: int | None
    started_at: str | None
    finished_at: str | None
    labels: dict[str, str]
    ip: str | None  # on the container's (first) network
    ports: dict[int, int]  # container port → host port
    pid: int | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    restarts: int = 0  # restarts by the engine's restart policy

    @property
    def running(self) -> bool:
        return self.state == "running"


# what an engine answers when it failed to start a container for a passing reason (CliEngine._start)
TRANSIENT_START = ("write child: broken pipe",)
# seconds between tries of such a start: it has been seen to fail three times within 1.5 s right after heavy
# image builds (CI), so the tries spread over 7.5 s
START_RETRY_PAUSES = (0.5, 1.0, 2.0, 4.0)
_ABSENT = re.compile(r"image not known|no such (image|container|object)", re.IGNORECASE)


def hardening(spec: ContainerSpec) -> list[str]:
    """The security flags every podllama container gets."""
    flags = ["--cap-drop=ALL", *[f"--cap-add={c}" for c in spec.cap_add], "--security-opt=no-new-privileges"]
    if spec.read_only_root:
        flags.append("--read-only")
        flags += [f"--tmpfs={path}:rw,nosuid,nodev,size=256m" for path in spec.tmpfs]
    if spec.user:
        flags.append(f"--user={spec.user}")
    flags += [f"--group-add={g}" for g in spec.groups]
    return flags


class CliEngine:
    """What Podman and Docker share; the subclasses spell what differs."""

    name = "engine"
    binary = "false"

    def __init__(self, remote: str | None = None) -> None:
        self.remote = remote

    # -- plumbing -----------------------------------------------------------------------------------------
    def base_argv(self) -> list[str]:
        return [self.binary]

    def command(self, *args: str) -> list[str]:
        return self.base_argv() + list(args)

    def run_cli(self, *args: str, check: bool = True, input: str | bytes | None = None, timeout: float | None = 120,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(self.command(*args), capture_output=True, text=True, input=input, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except FileNotFoundError:
            raise EngineError(f"{self.binary} is not installed; install it (scripts/setup.sh does) or pick another "
                              "engine") from None
        except subprocess.TimeoutExpired:
            raise EngineError(f"`{self.binary} {' '.join(args[:3])}` did not answer within {timeout:.0f}s") from None
        if check and proc.returncode != 0:
            raise EngineError(f"`{self.binary} {' '.join(args[:3])}…` failed: {(proc.stderr or proc.stdout).strip()}")
        return proc

    def build_argv(self) -> list[str]:
        """The client that runs builds (the same as for everything else, unless an engine says otherwise)."""
        return self.base_argv()

    def stream(self, argv: list[str], log: IO[str], on_line: Callable[[str], None] | None = None,
               env: dict[str, str] | None = None) -> int:
        """Run a long command (a build), copying every output line to LOG and to ON_LINE; returns the exit code."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if on_line:
                on_line(line.rstrip("\n"))
        log.flush()
        return proc.wait()

    def available(self) -> bool:
        if shutil.which(self.binary) is None:
            return False
        try:
            return self.run_cli("version", check=False, timeout=15).returncode == 0
        except EngineError:
            return False

    def version(self) -> str:
        return self.run_cli("version", "--format", "{{.Server.Version}}").stdout.strip()

    def api_socket(self) -> Path:
        """The host's API socket of this engine (mounted into the gateway container)."""
        raise NotImplementedError

    # -- images -------------------------------------------------------------------------------------------
    def build_args(self, containerfile: Path, context: Path, build_args: dict[str, str], labels: dict[str, str],
                   iidfile: Path, secrets: dict[str, Path] | None = None) -> list[str]:
        argv = ["build", "-f", str(containerfile), f"--iidfile={iidfile}"]
        for k, path in (secrets or {}).items():
            argv.append(f"--secret=id={k},src={path}")
        for k, v in build_args.items():
            argv.append(f"--build-arg={k}={v}")
        for k, v in labels.items():
            argv.append(f"--label={k}={v}")
        return argv + [str(context)]

    def build_env(self) -> dict[str, str]:
        return {}

    def build(self, containerfile: Path, context: Path, build_args: dict[str, str], labels: dict[str, str],
              log: IO[str], on_line: Callable[[str], None] | None = None,
              secrets: dict[str, Path] | None = None, fresh: bool = False, target: str | None = None) -> str | None:
        """Build an image without tagging it. Returns its id, or None when the build failed (see the log).
        SECRETS are files mounted into RUN steps that ask for them, never stored in the image. FRESH: no layer
        of an earlier build is used. TARGET: the stage to build (else the last)."""
        iidfile = Path(log.name).with_suffix(".iid")
        iidfile.unlink(missing_ok=True)
        command = self.build_args(containerfile, context, build_args, labels, iidfile, secrets)
        options = (["--no-cache"] if fresh else []) + ([f"--target={target}"] if target else [])
        argv = self.build_argv() + command[:1] + options + command[1:]
        code = self.stream(argv, log, on_line, env=self.build_env())
        if code != 0 or not iidfile.exists():
            return None
        image_id = _strip_digest(iidfile.read_text().strip())
        iidfile.unlink()
        return image_id

    def _found(self, proc: subprocess.CompletedProcess[str]) -> bool:
        """Whether an inspect found its object: False when the engine says it does not exist; an engine that
        could not be asked at all (its API service gone) is an error, not an absence."""
        if proc.returncode == 0:
            return True
        if _ABSENT.search(proc.stderr or proc.stdout):
            return False
        raise EngineError(f"`{self.binary} inspect` failed: {(proc.stderr or proc.stdout).strip()}")

    def image_exists(self, ref: str) -> bool:
        return self._found(self.run_cli("image", "inspect", ref, check=False))

    def image_inspect(self, ref: str) -> dict[str, Any] | None:
        proc = self.run_cli("image", "inspect", ref, check=False)
        if not self._found(proc):
            return None
        data = json.loads(proc.stdout)
        return data[0] if data else None

    def image_id(self, ref: str) -> str | None:
        info = self.image_inspect(ref)
        return _strip_digest(info["Id"]) if info else None

    def image_labels(self, ref: str) -> dict[str, str]:
        info = self.image_inspect(ref) or {}
        return (info.get("Config") or {}).get("Labels") or info.get("Labels") or {}

    def tag(self, source: str, target: str) -> None:
        self.run_cli("tag", source, target)

    def push(self, ref: str, tls_verify: bool = True, timeout: float = 1800) -> str:
        """Push REF to its registry; returns the digest the registry stored it under (sha256:…)."""
        raise NotImplementedError

    def pull_options(self, tls_verify: bool) -> list[str]:
        """Flags of `pull` for a registry without TLS (Docker: the daemon's `insecure-registries` decides)."""
        return []

    def untag(self, ref: str) -> None:
        """Remove one tag; the image stays while other tags or containers use it."""
        raise NotImplementedError

    def remove_image(self, ref: str) -> None:
        self.run_cli("rmi", ref, check=False)

    def pull(self, ref: str, timeout: float = 120, tls_verify: bool = True) -> tuple[bool, str]:
        proc = self.run_cli("pull", *self.pull_options(tls_verify), ref, check=False, timeout=timeout)
        return proc.returncode == 0, (proc.stderr or proc.stdout).strip()

    def import_tar(self, tar: IO[bytes], ref: str) -> None:
        proc = subprocess.run(self.command("import", "-", ref), stdin=tar, capture_output=True)
        if proc.returncode != 0:
            raise EngineError(f"{self.binary} import {ref} failed: {proc.stderr.decode(errors='replace').strip()}")

    def save(self, ref: str, path: Path) -> None:
        self.run_cli("save", "-o", str(path), ref, timeout=600)

    def load(self, path: Path) -> None:
        self.run_cli("load", "-i", str(path), timeout=600)

    def list_images(self, repository: str) -> list[dict[str, str]]:
        """Every tag of REPOSITORY: repository, tag, id, created, size (the same keys on both engines)."""
        fmt = "{{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}"
        proc = self.run_cli("images", "--no-trunc", "--format", fmt, repository)
        rows = []
        for line in proc.stdout.splitlines():
            repo, tag, image_id, created, size = (line.split("\t") + [""] * 5)[:5]
            # engines match the reference loosely; keep the repository asked for (with or without its registry)
            if tag and tag != "<none>" and repo.split("/")[-2:] == repository.split("/")[-2:]:
                rows.append({"repository": repo, "tag": tag, "id": _strip_digest(image_id), "created": created,
                             "size": size})
        return rows

    # -- containers ---------------------------------------------------------------------------------------
    def gpu_flags(self, gpu: GpuRequest) -> list[str]:
        if gpu.backend in ("rocm", "vulkan"):
            groups = rocm_groups() if gpu.backend == "rocm" else []
            return [f"--device={n}" for n in device_nodes(gpu)] + [f"--group-add={g}" for g in groups]
        raise EngineError(f"GPU backend '{gpu.backend}' is not known to {self.name}")

    def run_argv(self, spec: ContainerSpec, detach: bool = True, remove: bool = False) -> list[str]:
        argv = ["run", f"--name={spec.name}"]
        if detach:
            argv.append("--detach")
        if remove:
            argv.append("--rm")
        argv += hardening(spec)
        argv.append(f"--stop-timeout={spec.stop_timeout}")
        if spec.restart:
            argv.append(f"--restart={spec.restart}")
        for k, v in spec.labels.items():
            argv.append(f"--label={k}={v}")
        for k, v in spec.env.items():
            argv.append(f"--env={k}={v}")
        if spec.network:
            argv.append(f"--network={spec.network}")
            if spec.network != "host":
                argv += [f"--network-alias={a}" for a in spec.network_aliases]
        for m in spec.mounts:
            argv.append(f"--volume={m.source}:{m.target}:{'ro' if m.read_only else 'rw'}")
        for host, host_port, container_port in spec.ports:
            argv.append(f"--publish={host}:{host_port or ''}:{container_port}")
        if spec.gpu:
            argv += self.gpu_flags(spec.gpu)
        if spec.entrypoint is not None:
            argv.append(f"--entrypoint={json.dumps(spec.entrypoint) if len(spec.entrypoint) > 1 else spec.entrypoint[0]}")
        return argv + [spec.image] + spec.args

    def run(self, spec: ContainerSpec) -> str:
        """Create and start a detached container; returns its id."""
        proc = self._start(self.run_argv(spec), spec.name)
        if proc.returncode != 0:
            raise EngineError(f"`{self.binary} run --name={spec.name}…` failed: {(proc.stderr or proc.stdout).strip()}")
        return proc.stdout.strip().splitlines()[-1]

    def _start(self, argv: builtins.list[str], name: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`run` ARGV, again (the half-made container removed first) when the engine failed to start the
        container for a passing reason: Podman 4.3's API service now and then loses its runtime's start
        handshake ("write child: broken pipe") for a container that starts fine a moment later (what the service and
        its conmon said is in doctor.service_log())."""
        proc = self.run_cli(*argv, check=False, timeout=timeout)
        for pause in START_RETRY_PAUSES:
            if proc.returncode == 0 or not any(t in proc.stderr for t in TRANSIENT_START):
                break
            self.remove(name)
            time.sleep(pause)
            proc = self.run_cli(*argv, check=False, timeout=timeout)
        return proc

    def run_once(self, spec: ContainerSpec, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a container to completion and return its exit status and output (removed afterwards). Started
        detached, waited for, then its logs read: attached through the engine's API socket (the gateway
        container's client), a short-lived container's output can be lost."""
        started = self._start(self.run_argv(spec, detach=True, remove=False), spec.name, timeout)
        try:
            if started.returncode != 0:
                return started
            waited = self.run_cli("wait", spec.name, check=False, timeout=timeout)
            status = waited.stdout.strip().splitlines()[-1:] if waited.returncode == 0 else []
            code = int(status[0]) if status and status[0].lstrip("-").isdigit() else (waited.returncode or 1)
            logs = self.run_cli("logs", spec.name, check=False, timeout=60)
            return subprocess.CompletedProcess(started.args, code, logs.stdout, logs.stderr or waited.stderr)
        finally:
            self.remove(spec.name)

    def start(self, name: str) -> None:
        self.run_cli("start", name)

    def stop(self, name: str, timeout: int = 10) -> None:
        self.run_cli("stop", f"--time={timeout}", name, check=False, timeout=timeout + 30)

    def kill(self, name: str, signal: str = "KILL") -> None:
        self.run_cli("kill", f"--signal={signal}", name, check=False)

    def remove(self, name: str, force: bool = True) -> None:
        self.run_cli("rm", *(["--force"] if force else []), name, check=False, timeout=60)

    def inspect(self, name: str) -> ContainerInfo | None:
        proc = self.run_cli("container", "inspect", name, check=False)
        if not self._found(proc):
            return None
        data = json.loads(proc.stdout)
        return _container_info(data[0]) if data else None

    def list(self, labels: dict[str, str]) -> list[ContainerInfo]:
        """Every container (running or not) carrying all of LABELS."""
        filters = [f"--filter=label={k}={v}" for k, v in labels.items()]
        ids = self.run_cli("ps", "--all", "--quiet", "--no-trunc", *filters).stdout.split()
        if not ids:
            return []
        proc = self.run_cli("container", "inspect", *ids, check=False)
        return [_container_info(d) for d in json.loads(proc.stdout or "[]")]

    def logs(self, name: str, tail: int | None = None, follow: bool = False) -> Iterator[str]:
        """The lines of container NAME's log; TAIL: only its last TAIL lines. The engines keep a line written
        in pieces (by a process that writes unbuffered) as several log records, and their --tail counts
        records: Docker's first line can be the end of one, and Podman 4.3 gives the pieces out of order. So
        the whole log is read and its last TAIL lines kept. Following, --tail is passed as it is (what a
        person watches; it cannot be read to the end first)."""
        if tail is None or follow:
            yield from self._logs(name, tail, follow)
            return
        yield from collections.deque(self._logs(name, None, False), maxlen=max(tail, 0))

    def _logs(self, name: str, tail: int | None, follow: bool) -> Iterator[str]:
        args = ["logs"] + ([f"--tail={tail}"] if tail is not None else []) + (["--follow"] if follow else []) + [name]
        proc = subprocess.Popen(self.command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        try:
            yield from proc.stdout
        finally:
            proc.kill()
            proc.wait()

    def memory(self, name: str) -> int | None:
        """The resident memory of container NAME's main process (bytes; None when it does not run). Resident,
        not the cgroup's count: a model's file pages mapped by the server count wherever they are cached,
        while the engines' stats charge them to whichever container read them first."""
        proc = self.run_cli("exec", name, "cat", "/proc/1/statm", check=False, timeout=30)
        fields = proc.stdout.split()
        if proc.returncode != 0 or len(fields) < 2 or not fields[1].isdigit():
            return None
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")

    def gpu_memory(self, name: str, backend: str) -> int | None:
        """The GPU memory container NAME's main process holds (bytes, on all its GPUs; None when the driver
        does not say): nvidia-smi's per-process view for CUDA, the DRM client statistics for other GPUs."""
        if backend == "cuda":
            info = self.inspect(name)
            proc = self.run_cli("exec", name, *gpumemory.NVIDIA_QUERY, check=False, timeout=30)
            pids = {1} | ({info.pid} if info and info.pid else set())
            return gpumemory.parse_nvidia(proc.stdout, pids) if proc.returncode == 0 else None
        proc = self.run_cli("exec", name, *gpumemory.FDINFO_QUERY, check=False, timeout=30)
        return gpumemory.parse_fdinfo(proc.stdout)

    def exec(self, name: str, argv: builtins.list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.run_cli("exec", name, *argv, check=False, timeout=timeout)

    # -- networks -----------------------------------------------------------------------------------------
    def network_exists(self, name: str) -> bool:
        return self.run_cli("network", "inspect", name, check=False).returncode == 0

    def create_network(self, name: str, labels: dict[str, str], internal: bool = False) -> None:
        """A bridge network with container-name DNS; INTERNAL: no route out of it (the host still reaches its
        containers' addresses)."""
        if not self.network_exists(name):
            self.run_cli("network", "create", *[f"--label={k}={v}" for k, v in labels.items()],
                         *(["--internal"] if internal else []), "--", name)

    def remove_network(self, name: str) -> None:
        self.run_cli("network", "rm", name, check=False)


def _strip_digest(image_id: str) -> str:
    return image_id.removeprefix("sha256:")


def _container_info(d: dict[str, Any]) -> ContainerInfo:
    state = d.get("State") or {}
    config = d.get("Config") or {}
    nets = (d.get("NetworkSettings") or {}).get("Networks") or {}
    ip = next((n.get("IPAddress") for n in nets.values() if n.get("IPAddress")), None)
    ports: dict[int, int] = {}
    for key, binds in ((d.get("NetworkSettings") or {}).get("Ports") or {}).items():
        for b in binds or []:
            if b.get("HostPort"):
                ports[int(key.split("/")[0])] = int(b["HostPort"])
    status = state.get("Status") or ("running" if state.get("Running") else "exited")
    return ContainerInfo(
        id=d.get("Id", ""),
        name=d.get("Name", "").lstrip("/"),
        image=config.get("Image") or d.get("ImageName") or "",
        image_id=_strip_digest(d.get("Image", "")),
        state=status,
        exit_code=state.get("ExitCode"),
        started_at=state.get("StartedAt"),
        finished_at=state.get("FinishedAt"),
        labels=config.get("Labels") or {},
        ip=ip,
        ports=ports,
        pid=state.get("Pid") or None,
        raw=d,
        restarts=int(d.get("RestartCount") or 0),
    )

