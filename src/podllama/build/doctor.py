"""`podllama doctor`: is this machine ready to build and run the stack? Each finding says OK, or the problem and
its fix; the fixes podllama can apply itself (`--fix`) are applied only when asked."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import atomic_write
from ..engine import CliEngine, hardware
from .bases import local_images, local_missing, resolve_base
from .errors import BuildError

CONTAINERS_CONF = Path("/etc/containers/containers.conf")
PODMAN_SOCKET = Path("/run/podman/podman.sock")
DOCKER_SOCKET = Path("/var/run/docker.sock")
DOCKER_PIDFILE = Path("/var/run/docker.pid")
CONTAINERD_PIDFILE = Path("/var/run/docker/containerd/containerd.pid")  # the one dockerd starts
DOCKERD_LOG = Path("/var/log/podllama-dockerd.log")

# The errors crun/podman print on hosts like cgroup-v1 VMs without CAP_SYS_RESOURCE, and the settings that fix them.
QUIRKS = {
    "ulimits": (re.compile(r"setrlimit `?RLIMIT_(NOFILE|NPROC)|error setting rlimit"),
                "[containers]", 'default_ulimits = ["nofile=20000:20000", "nproc=8192:8192"]'),
    "runtime": (re.compile(r"cgroups in hybrid mode not supported"), "[engine]", 'runtime = "runc"'),
}


@dataclass
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str | None = None
    fixed: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def tiny_rootfs() -> Path:
    """A root filesystem of just /bin/true and the libraries it needs: a container without any image."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="podllama-doctor-"))
    true = shutil.which("true") or "/bin/true"
    libs = re.findall(r"(/\S+\.so[.\d]*)", subprocess.run(["ldd", true], capture_output=True, text=True).stdout)
    for f in [true, *libs]:
        dest = root / f.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(f), dest)
    (root / "bin").mkdir(exist_ok=True)
    if not (root / "bin" / "true").exists():
        shutil.copy2(true, root / "bin" / "true")
    return root


def trial_run(engine: CliEngine) -> subprocess.CompletedProcess[str]:
    """Start a throwaway container; needs no image and no registry (Podman runs it from a tiny rootfs)."""
    if engine.name == "podman":
        root = tiny_rootfs()
        try:
            return engine.run_cli("run", "--rm", "--rootfs", str(root), "/bin/true", check=False, timeout=60)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    local = engine.run_cli("images", "--quiet", check=False).stdout.split()
    if not local:
        return subprocess.CompletedProcess([], 0, "", "")  # nothing to run yet: builds will tell
    return engine.run_cli("run", "--rm", "--entrypoint", "/bin/true", local[0], check=False, timeout=60)


def apply_conf(section: str, line: str, path: Path = CONTAINERS_CONF) -> None:
    """Add LINE under SECTION of containers.conf, keeping what is there."""
    text = path.read_text() if path.exists() else ""
    key = line.split("=")[0].strip()
    if re.search(rf"^\s*{re.escape(key)}\s*=", text, re.M):
        text = re.sub(rf"^\s*{re.escape(key)}\s*=.*$", line, text, flags=re.M)
    elif section in text:
        text = text.replace(section, f"{section}\n{line}", 1)
    else:
        text = text.rstrip("\n") + ("\n" if text else "") + f"{section}\n{line}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def check_runtime(engine: CliEngine, fix: bool) -> list[Finding]:
    findings: list[Finding] = []
    for _ in range(len(QUIRKS) + 1):  # each fix can reveal the next quirk
        proc = trial_run(engine)
        if proc.returncode == 0:
            findings.append(Finding("container runtime", True, f"{engine.name} starts containers"))
            return findings
        output = proc.stderr + proc.stdout
        hit = next(((name, q) for name, q in QUIRKS.items() if q[0].search(output)), None)
        if hit is None:
            findings.append(Finding("container runtime", False, f"{engine.name} cannot start a container: "
                                    f"{output.strip()[-400:]}", "see the engine's own error above"))
            return findings
        name, (_, section, line) = hit
        fix_text = f"add to {CONTAINERS_CONF} under {section}: {line}"
        if not fix or engine.name != "podman":
            findings.append(Finding(f"runtime quirk: {name}", False, output.strip().splitlines()[-1], fix_text))
            return findings
        apply_conf(section, line)
        findings.append(Finding(f"runtime quirk: {name}", True, output.strip().splitlines()[-1], fix_text, fixed=True))
    return findings


def check_socket(engine: CliEngine, fix: bool) -> Finding:
    """The API socket the gateway container drives the engine through: it must answer, not merely exist (a
    socket file outlives the service that made it, e.g. across a reboot where /run is not cleared)."""
    sock = engine.api_socket()
    if socket_answers(sock):
        return Finding("API socket", True, f"{sock} (the gateway container uses it)")
    stale = sock.exists()
    problem = f"{sock} exists but nothing answers on it" if stale else f"{sock} missing"
    if engine.name != "podman":
        return Finding("API socket", False, problem, "start the Docker daemon (`dockerd &` or systemctl start docker)")
    fix_text = (f"systemctl enable --now podman.socket, or without systemd: "
                f"podman system service --time=0 unix://{sock} &")
    if fix:
        start_podman_service(sock)
        if socket_answers(sock):
            started = "started in place of a stale socket file" if stale else "started"
            return Finding("API socket", True, f"{sock} {started}", fix_text, fixed=True)
    return Finding("API socket", False, problem, fix_text)


def socket_answers(sock: Path) -> bool:
    """Whether a server accepts connections on the Unix socket SOCK."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def service_log(sock: Path = PODMAN_SOCKET) -> Path:
    """Where the API service podllama starts writes what it and the conmon processes it starts say (a failed
    container start is explained there)."""
    return sock.parent / "podman-service.log"


def start_podman_service(sock: Path = PODMAN_SOCKET, wait: float = 10) -> None:
    """Podman's API service in the background, on SOCK (a stale socket file left there is replaced), detached
    from the caller's terminal and pipes: its input is /dev/null, its output goes to service_log(SOCK). It runs
    in /: a service left in a directory that is later removed (a CI checkout, deleted and cloned again) hands
    that missing directory to every container's conmon, which then fails to start them ("Failed to get working
    directory", then "write child: broken pipe" from `podman run` through the socket)."""
    sock.parent.mkdir(parents=True, exist_ok=True)
    if sock.is_socket():
        sock.unlink()
    with open(service_log(sock), "ab") as out:
        subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], stdin=subprocess.DEVNULL,
                         stdout=out, stderr=out, start_new_session=True, cwd="/")
    deadline = time.monotonic() + wait
    while not socket_answers(sock) and time.monotonic() < deadline:
        time.sleep(0.1)


def check_gpus(hw: hardware.Hardware) -> list[Finding]:
    findings = []
    if any(g.backend == "cuda" for g in hw.gpus):
        if hw.nvidia.get("cdi"):
            findings.append(Finding("NVIDIA passthrough", True, f"CDI spec {', '.join(hw.nvidia['cdi_specs'])}"))
        else:
            findings.append(Finding("NVIDIA passthrough", False, "no CDI spec for nvidia.com/gpu",
                                    "install nvidia-container-toolkit, then "
                                    "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"))
    if any(g.backend == "rocm" for g in hw.gpus):
        ok = os.path.exists("/dev/kfd") and os.path.isdir("/dev/dri")
        findings.append(Finding("ROCm passthrough", ok, "/dev/kfd and /dev/dri present" if ok else "/dev/kfd or /dev/dri missing",
                                None if ok else "load the amdgpu driver with KFD (ROCm); add your user to the video and "
                                                "render groups"))
    if any(g.backend == "vulkan" for g in hw.gpus):
        nodes = [g.render_node for g in hw.gpus if g.render_node]
        findings.append(Finding("Vulkan passthrough", bool(nodes), ", ".join(nodes) or "no /dev/dri render node",
                                None if nodes else "install the GPU's kernel driver (i915/xe, amdgpu)"))
    return findings


def check_bases(engine: CliEngine, variant: str, base_choice: str) -> Finding:
    name = f"base images ({variant})"
    try:
        base = resolve_base(variant, "upstream" if base_choice == "auto" else base_choice)
        local = resolve_base(variant, "local") if base_choice in ("auto", "local") else None
    except BuildError as e:
        return Finding(name, False, str(e))
    upstream_missing = [i for i in dict.fromkeys([base.build, base.runtime]) if not engine.image_exists(i)]
    if base.kind != "local" and not upstream_missing:
        return Finding(name, True, base.describe())
    if local is None:
        return Finding(name, True, f"not present yet: {', '.join(upstream_missing)}",
                       "pulled at build time if a registry is reachable; else `podllama base-image` and "
                       "[build] base = \"auto\" or \"local\"")
    missing = local_missing(engine, local)
    suite = local.toolkit.suite if local.toolkit is not None else local.build.rsplit(":", 1)[-1]
    if not missing:
        toolkit = (f"; the {local.toolkit.describe()} toolkit goes on it at the first build"
                   if local.toolkit is not None else "")
        fallback = " (used where no registry gives the upstream images)" if base_choice == "auto" else ""
        return Finding(name, True, f"{', '.join(local_images(local))}{toolkit}{fallback}")
    if base_choice == "auto":
        return Finding(name, True, f"not present yet: {', '.join(upstream_missing)} (pulled at build time) or the "
                       f"local {', '.join(missing)}", f"where no registry is reachable: `podllama base-image "
                       f"--suite {suite}`")
    return Finding(name, False, f"not present yet: {', '.join(missing)}", f"`podllama base-image --suite {suite}`")


def run(engine: CliEngine, variant: str, base_choice: str, fix: bool = False) -> list[Finding]:
    findings = [Finding("engine", True, f"{engine.name} {engine.version()}")]
    findings += check_runtime(engine, fix)
    findings.append(check_socket(engine, fix))
    hw = hardware.detect()
    findings += check_gpus(hw)
    findings.append(check_bases(engine, variant, base_choice))
    if shutil.which("debootstrap") is None:
        findings.append(Finding("debootstrap", True, "not installed (only needed where no registry is reachable)",
                                "apt-get install debootstrap"))
    return findings


def pidfile_names(pidfile: Path, command: str) -> bool:
    """Whether PIDFILE holds the pid of a live process running COMMAND."""
    try:
        return Path(f"/proc/{int(pidfile.read_text().strip())}/comm").read_text().strip() == command
    except (OSError, ValueError):
        return False


def start_dockerd(wait: float = 60) -> None:
    """Start the Docker daemon in the background where no service manager does (containers, CI machines)."""
    def answers() -> bool:
        return subprocess.run(["docker", "version"], capture_output=True).returncode == 0

    if DOCKER_SOCKET.is_socket() and answers():
        return
    if shutil.which("dockerd") is None:
        raise RuntimeError("dockerd is not installed: apt-get install docker.io (scripts/setup.sh --with-docker)")
    if not pidfile_names(DOCKER_PIDFILE, "dockerd"):
        # pid files left by daemons that died stop the new ones where their pids are taken again (after a restart)
        DOCKER_PIDFILE.unlink(missing_ok=True)
        if not pidfile_names(CONTAINERD_PIDFILE, "containerd"):
            CONTAINERD_PIDFILE.unlink(missing_ok=True)
        log = open(DOCKERD_LOG, "ab")
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True, cwd="/")  # as the service above
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if DOCKER_SOCKET.is_socket() and answers():
            return
        time.sleep(0.5)
    last = DOCKERD_LOG.read_text(errors="replace").strip().splitlines()[-1:] if DOCKERD_LOG.exists() else []
    raise RuntimeError(f"dockerd did not come up within {wait:.0f} s ({''.join(last) or 'no log'}); see {DOCKERD_LOG}")
