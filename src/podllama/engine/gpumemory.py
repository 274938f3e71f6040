"""The GPU memory a server's process holds, from the driver's own per-process view: NVIDIA's (nvidia-smi's
compute apps, run inside the server's container, where NVIDIA's runtime puts it) and the kernel's DRM client
statistics (`/proc/PID/fdinfo`, which amdgpu, xe and i915 fill) for AMD and Intel GPUs. A server's whole use
counts on its first GPU, as its estimate does (Stack.device_of)."""

from __future__ import annotations

import re

NVIDIA_QUERY = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
# every fdinfo of the server's process (pid 1 of its container), each starting with its "pos:" line
FDINFO_QUERY = ["/bin/sh", "-c", "cat /proc/1/fdinfo/* 2>/dev/null"]

_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
# device memory regions by driver: amdgpu "vram", xe "vram0", i915 "local0"; resident before total, and
# amdgpu's older drm-memory-* (resident as well)
_REGION = re.compile(r"^drm-(resident|memory|total)-(vram\d*|local\d*):\s*(\d+)\s*(\w*)\s*$")
_PREFERENCE = {"resident": 0, "memory": 1, "total": 2}


def parse_nvidia(text: str, pids: set[int]) -> int | None:
    """Bytes held by PIDS in nvidia-smi's compute-apps CSV ("1234, 4312" in MiB, one row per process and GPU);
    None when no row is theirs (NVML names a process in the host's PID namespace or, on newer drivers, in the
    caller's: the container's own PID 1)."""
    total, found = 0, False
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit():
            continue
        if int(fields[0]) in pids:
            total, found = total + int(fields[1]) * _UNITS["MiB"], True
    return total if found else None


def parse_fdinfo(text: str) -> int | None:
    """Bytes of device memory in the DRM clients of these fdinfo blocks, each client counted once (a process
    can hold several file descriptors of one client); None when no block is a DRM client's."""
    clients: dict[tuple[str, str], int] = {}
    for block in re.split(r"^(?=pos:)", text, flags=re.M):
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}
        if "drm-driver" not in fields:
            continue
        best: dict[str, tuple[int, int]] = {}  # region → (preference, bytes)
        for line in block.splitlines():
            m = _REGION.match(line.strip())
            if m and m.group(4) in _UNITS:
                kind, region, value = m.group(1), m.group(2), int(m.group(3)) * _UNITS[m.group(4)]
                if region not in best or _PREFERENCE[kind] < best[region][0]:
                    best[region] = (_PREFERENCE[kind], value)
        key = (fields.get("drm-pdev", ""), fields.get("drm-client-id", ""))
        clients[key] = sum(v for _, v in best.values())
    return sum(clients.values()) if clients else None
