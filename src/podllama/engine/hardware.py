"""What the machine has, and which llama-server image variants suit it.

Every fact is read through a `Host` (files, directory listings, command outputs), so detection runs the same
against the live machine, against a fixture tree captured from another machine, and while capturing one.
"""

from __future__ import annotations

import glob as _glob
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

NVIDIA_SMI = [
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,compute_cap,driver_version,uuid",
    "--format=csv,noheader,nounits",
]
VULKANINFO = ["vulkaninfo", "--summary"]
CDI_SPEC_GLOBS = ["/etc/cdi/*.yaml", "/etc/cdi/*.json", "/var/run/cdi/*.yaml", "/var/run/cdi/*.json"]
PCI_VENDORS = {"0x10de": "nvidia", "0x1002": "amd", "0x8086": "intel"}


class Host(Protocol):
    def read(self, path: str) -> str | None: ...
    def is_dir(self, path: str) -> bool: ...
    def glob(self, pattern: str) -> list[str]: ...
    def run(self, argv: list[str]) -> str | None: ...


class LiveHost:
    """This machine."""

    def read(self, path: str) -> str | None:
        try:
            return Path(path).read_text(errors="replace")
        except OSError:
            return None

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def glob(self, pattern: str) -> list[str]:
        return sorted(_glob.glob(pattern))

    def run(self, argv: list[str]) -> str | None:
        if shutil.which(argv[0]) is None:
            return None
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None


class FixtureHost:
    """A machine captured into a directory: `fs/` mirrors the files read, `commands.json` the outputs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        cmds = self.root / "commands.json"
        self.commands: dict[str, str | None] = json.loads(cmds.read_text()) if cmds.exists() else {}

    def _local(self, path: str) -> Path:
        return self.root / "fs" / path.lstrip("/")

    def read(self, path: str) -> str | None:
        p = self._local(path)
        return p.read_text() if p.is_file() else None

    def is_dir(self, path: str) -> bool:
        return self._local(path).is_dir()

    def glob(self, pattern: str) -> list[str]:
        base = str(self.root / "fs")
        return sorted("/" + os.path.relpath(p, base) for p in _glob.glob(str(self._local(pattern))))

    def run(self, argv: list[str]) -> str | None:
        return self.commands.get(" ".join(argv))


class RecordingHost:
    """Wraps a host and writes everything detection looked at into a fixture directory."""

    def __init__(self, inner: Host, root: Path) -> None:
        self.inner, self.root = inner, Path(root)
        self.commands: dict[str, str | None] = {}

    def _save(self, path: str, text: str) -> None:
        dest = self.root / "fs" / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)

    def read(self, path: str) -> str | None:
        text = self.inner.read(path)
        if text is not None:
            self._save(path, text)
        return text

    def glob(self, pattern: str) -> list[str]:
        paths = self.inner.glob(pattern)
        for p in paths:  # device nodes and directories are recorded as (empty) entries
            dest = self.root / "fs" / p.lstrip("/")
            if self.inner.is_dir(p):
                dest.mkdir(parents=True, exist_ok=True)
            elif not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.touch()
        return paths

    def is_dir(self, path: str) -> bool:
        return self.inner.is_dir(path)

    def run(self, argv: list[str]) -> str | None:
        out = self.inner.run(argv)
        self.commands[" ".join(argv)] = out
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "commands.json").write_text(json.dumps(self.commands, indent=2) + "\n")
        return out


@dataclass
class Cpu:
    arch: str
    model: str | None
    cores: int
    features: list[str]


@dataclass
class Gpu:
    vendor: str  # nvidia | amd | intel | other
    name: str
    backend: str  # the image variant that drives it: cuda | rocm | vulkan
    index: int | None = None
    memory_mib: int | None = None
    compute_capability: str | None = None  # NVIDIA
    gfx_target: str | None = None  # AMD
    render_node: str | None = None
    uuid: str | None = None


@dataclass
class Hardware:
    variants: list[str]
    cpu: Cpu
    gpus: list[Gpu] = field(default_factory=list)
    nvidia: dict[str, Any] = field(default_factory=dict)
    amd: dict[str, Any] = field(default_factory=dict)
    vulkan: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def cuda_architectures(self) -> list[str]:
        """CMake CUDA architectures of the NVIDIA GPUs present ("8.9" → "89")."""
        return sorted({g.compute_capability.replace(".", "") for g in self.gpus if g.compute_capability})

    @property
    def rocm_targets(self) -> list[str]:
        return sorted({g.gfx_target for g in self.gpus if g.gfx_target})


# -- CPU ------------------------------------------------------------------------------------------------------
_CPU_FEATURES = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512", "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16", "avx_vnni": "avx_vnni", "amx_tile": "amx", "amx_int8": "amx_int8",
    "asimd": "neon", "asimddp": "dotprod", "sve": "sve", "sve2": "sve2", "i8mm": "i8mm",
}


def detect_cpu(host: Host) -> Cpu:
    info = host.read("/proc/cpuinfo") or ""
    arch = (host.run(["uname", "-m"]) or "").strip() or "unknown"
    model, cores, flags = None, 0, set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "processor":
            cores += 1
        elif key in ("model name", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    features = sorted({name for flag, name in _CPU_FEATURES.items() if flag in flags})
    return Cpu(arch=arch, model=model, cores=cores, features=features)


# -- NVIDIA ---------------------------------------------------------------------------------------------------
def detect_nvidia(host: Host) -> tuple[list[Gpu], dict[str, Any]]:
    gpus: list[Gpu] = []
    out = host.run(NVIDIA_SMI)
    driver = None
    for line in (out or "").splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 6:
            continue
        index, name, mem, cap, driver, uuid = cols[:6]
        gpus.append(Gpu(vendor="nvidia", name=name, backend="cuda", index=_int(index), memory_mib=_int(mem),
                        compute_capability=cap or None, uuid=uuid or None))
    if driver is None:  # no nvidia-smi: the kernel module still tells the driver version
        version = host.read("/proc/driver/nvidia/version") or ""
        for word in version.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                driver = word
                break
    cdi_specs = [p for pattern in CDI_SPEC_GLOBS for p in host.glob(pattern) if "nvidia.com/gpu" in (host.read(p) or "")]
    info: dict[str, Any] = {}
    if gpus or driver:
        info = {"driver": driver, "cdi_specs": cdi_specs, "cdi": bool(cdi_specs),
                "container_toolkit": host.run(["nvidia-ctk", "--version"]) is not None}
    return gpus, info


# -- AMD (ROCm) -----------------------------------------------------------------------------------------------
def gfx_target(version: int) -> str:
    """KFD's gfx_target_version (e.g. 90010, 110000) → the LLVM target name (gfx90a, gfx1100)."""
    major, minor, step = version // 10000, (version // 100) % 100, version % 100
    return f"gfx{major}{minor:x}{step:x}"


def detect_amd(host: Host) -> tuple[list[Gpu], dict[str, Any]]:
    kfd = bool(host.glob("/dev/kfd"))
    gpus: list[Gpu] = []
    for node in host.glob("/sys/class/kfd/kfd/topology/nodes/*"):
        props = _kv(host.read(f"{node}/properties") or "")
        version = props.get("gfx_target_version", 0)
        if not version or not props.get("simd_count"):
            continue  # a CPU node
        minor = props.get("drm_render_minor")
        render = f"/dev/dri/renderD{minor}" if minor else None
        name = (host.read(f"{node}/name") or "").strip() or gfx_target(version)
        mem = _kv(host.read(f"{node}/mem_banks/0/properties") or "").get("size_in_bytes")
        gpus.append(Gpu(vendor="amd", name=name, backend="rocm" if kfd else "vulkan", index=len(gpus),
                        memory_mib=mem // 2**20 if mem else None, gfx_target=gfx_target(version), render_node=render))
    info = {"kfd": kfd, "targets": sorted({g.gfx_target for g in gpus if g.gfx_target})} if (kfd or gpus) else {}
    return gpus, info


# -- Vulkan and other render nodes ----------------------------------------------------------------------------
def detect_render_nodes(host: Host, known: set[str]) -> list[Gpu]:
    """GPUs that only show up as DRM render nodes (Intel, AMD without ROCm, others): candidates for Vulkan."""
    gpus = []
    for node in host.glob("/dev/dri/renderD*"):
        if node in known:
            continue
        base = f"/sys/class/drm/{os.path.basename(node)}/device"
        vendor = PCI_VENDORS.get((host.read(f"{base}/vendor") or "").strip(), "other")
        if vendor == "nvidia":
            continue  # driven by CUDA, listed by nvidia-smi
        device = (host.read(f"{base}/device") or "").strip()
        gpus.append(Gpu(vendor=vendor, name=f"{vendor} GPU {device}".strip(), backend="vulkan", render_node=node))
    return gpus


def detect_vulkan(host: Host) -> dict[str, Any]:
    out = host.run(VULKANINFO)
    if out is None:
        return {}
    devices: list[dict[str, str]] = []
    for line in out.splitlines():
        if re.match(r"^GPU\d+:\s*$", line.strip()):
            devices.append({})
            continue
        key, sep, value = line.strip().partition("=")
        if sep and devices and key.strip() in ("deviceName", "deviceType"):
            value = value.strip()
            devices[-1]["name" if key.strip() == "deviceName" else "type"] = (
                value if key.strip() == "deviceName" else value.removeprefix("PHYSICAL_DEVICE_TYPE_").lower())
    return {"devices": devices, "gpu_devices": [d for d in devices if d.get("type") != "cpu"]}


def detect(host: Host | None = None) -> Hardware:
    host = host or LiveHost()
    cpu = detect_cpu(host)
    nv_gpus, nvidia = detect_nvidia(host)
    amd_gpus, amd = detect_amd(host)
    other = detect_render_nodes(host, {g.render_node for g in amd_gpus if g.render_node})
    vulkan = detect_vulkan(host)
    gpus = nv_gpus + amd_gpus + other
    notes: list[str] = []
    variants: list[str] = []
    if nv_gpus:
        variants.append("cuda")
        if not nvidia.get("cdi"):
            notes.append("NVIDIA GPU found but no CDI spec: for Podman run "
                         "`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml` (nvidia-container-toolkit)")
    if any(g.backend == "rocm" for g in amd_gpus):
        variants.append("rocm")
    elif amd_gpus:
        notes.append("AMD GPU found but /dev/kfd is missing: the amdgpu KFD driver is needed for ROCm; Vulkan can drive it")
    if any(g.backend == "vulkan" for g in gpus) or vulkan.get("gpu_devices"):
        variants.append("vulkan")
    variants.append("cpu")
    return Hardware(variants=variants, cpu=cpu, gpus=gpus, nvidia=nvidia, amd=amd, vulkan=vulkan, notes=notes)


def resolve_variant(requested: str, hardware: Hardware | None = None) -> str:
    """'auto' → the best variant this machine supports; anything else is taken as asked."""
    if requested != "auto":
        return requested
    return (hardware or detect()).variants[0]


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def _kv(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out
