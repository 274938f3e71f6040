"""Surviving a reboot: a systemd unit that brings a stack up when the machine starts.

Within a running engine, the gateway container has a restart policy (it comes back after a crash, or when
the engine restarts) and its supervisor brings back every server that should run. What no policy covers is a
machine that boots: Podman has no daemon to restart anything, and Docker's needs the gateway to exist. The
unit runs `podllama start` once the engine is up — which also rebuilds nothing and changes nothing when the
stack is already as its config says — and `podllama stop` at shutdown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_DIR = Path(os.environ.get("PODLLAMA_UNIT_DIR", "/etc/systemd/system"))
AFTER = {"podman": "network-online.target podman.socket", "docker": "network-online.target docker.service"}


class ServiceError(Exception):
    pass


@dataclass
class SystemdUnit:
    name: str
    path: Path
    text: str


def unit_for(stack: str, config: Path, engine: str, home: Path) -> SystemdUnit:
    """The unit of stack STACK, whose services.toml is CONFIG; podllama runs from HOME's environment."""
    podllama = shutil.which("podllama") or str(Path(sys.executable).with_name("podllama"))
    name = f"podllama-{stack}.service"
    text = f"""# Made by `podllama service install`; `podllama service remove` takes it away.
[Unit]
Description=podllama stack {stack} ({config})
Wants=network-online.target
After={AFTER.get(engine, "network-online.target")}

[Service]
Type=oneshot
RemainAfterExit=yes
WorkingDirectory={config.parent}
Environment=PODLLAMA_HOME={home}
ExecStart={podllama} start -c {config}
ExecStop={podllama} stop -c {config}
TimeoutStartSec=3600

[Install]
WantedBy=multi-user.target
"""
    return SystemdUnit(name, UNIT_DIR / name, text)


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def install(unit: SystemdUnit) -> list[str]:
    """Write the unit and, where systemd runs, enable it. Returns what was done, for the user."""
    if os.geteuid() != 0:
        raise ServiceError(f"writing {unit.path} needs root: run `sudo podllama service install`")
    unit.path.parent.mkdir(parents=True, exist_ok=True)
    from ..atomic import atomic_write

    atomic_write(unit.path, unit.text, mode=0o644)
    done = [f"wrote {unit.path}"]
    if systemd_running():
        for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", unit.name]):
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ServiceError(f"`{' '.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()}")
        done.append(f"enabled {unit.name}: the stack starts with the machine")
    else:
        done.append(f"systemd is not running here: enable it where it is with `systemctl enable {unit.name}`")
    return done


def remove(unit: SystemdUnit) -> list[str]:
    if os.geteuid() != 0:
        raise ServiceError(f"removing {unit.path} needs root: run `sudo podllama service remove`")
    done = []
    if systemd_running() and unit.path.exists():
        subprocess.run(["systemctl", "disable", unit.name], capture_output=True)
        done.append(f"disabled {unit.name}")
    if unit.path.exists():
        unit.path.unlink()
        done.append(f"removed {unit.path}")
        if systemd_running():
            subprocess.run(["systemctl", "daemon-reload"], capture_output=True)
    return done or [f"{unit.path} was not installed"]
