"""`podllama status`: one row per declared server replica (and any orphan), from what the engine says, what
the stack's state remembers and, when asked, each server's /health."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..access import tls
from ..access.credentials import bearer
from ..config import ConfigError
from ..engine import ContainerInfo
from ..engine.health import container_health
from ..engine.health import probe as probe_url
from ..models.gguf_meta import GGUFError
from .spec import (
    L_CHOSEN,
    L_COMMIT,
    L_FILE,
    L_KIND,
    L_MODEL,
    L_REPLICA,
    L_ROLE,
    L_SERVER,
    SERVER_PORT,
    StackError,
    container_name,
    int_label,
)
from .state import RUNNING, replica_key

if TYPE_CHECKING:
    from .core import Stack


def status_rows(stack: Stack, probe: bool = True) -> list[dict[str, Any]]:
    running = stack.containers()
    saved = stack.state.read().get("servers", {})
    rows = []
    declared = []
    for name, server in stack.cfg.servers.items():
        for replica in range(1, server.replicas + 1):
            declared.append(container_name(stack.name, name, replica))
            rows.append(_row(stack, name, replica, server.role, server.model, running.get(declared[-1]),
                             saved.get(replica_key(name, replica), {}), probe, declared=True))
    for cname, info in sorted(running.items()):
        if cname in declared or info.labels.get(L_KIND) != "server":
            continue
        rows.append(_row(stack, info.labels.get(L_SERVER, "?"), int_label(info.labels.get(L_REPLICA)) or 0,
                         info.labels.get(L_ROLE, "?"), info.labels.get(L_MODEL, "?"), info, {}, probe, declared=False))
    return rows + [_remote_row(stack, name, probe) for name in stack.cfg.remotes]


def _remote_row(stack: Stack, name: str, probe: bool) -> dict[str, Any]:
    """A server podllama routes to but does not run: its health as the gateway checks it."""
    remote = stack.cfg.remotes[name]
    health = None
    if probe:
        try:
            key = stack.cfg.remote_key(name)
        except ConfigError:
            key = None
        health = probe_url(remote.url, path=remote.health, headers=bearer(key),
                           context=tls.remote_verification(stack.cfg, name)[0])  # as the gateway checks it
    return {"server": name, "replica": 1, "container": None, "declared": True, "role": remote.role,
            "model": remote.alias or remote.model or name, "state": "remote", "health": health, "desired": RUNNING,
            "uptime_s": None, "restarts": 0, "last_restart": None, "failed": None, "image": None, "commit": None,
            "exit_code": None, "model_file": remote.url, "chosen": None, "start": None, "memory": None,
            "last_used": None, "idle_s": None, "url": remote.url}


def _row(stack: Stack, server: str, replica: int, role: str, model: str, info: ContainerInfo | None,
         saved: dict[str, Any], probe: bool, declared: bool) -> dict[str, Any]:
    state = "missing" if info is None else info.state
    health = None
    if info is not None and info.running and probe:
        health = container_health(stack.engine, info, SERVER_PORT)
    failed = saved.get("failed")
    return {
        "server": server, "replica": replica, "container": container_name(stack.name, server, replica),
        # the model it runs (its file in the store: the hub model once pulled, else its fallback), and the one
        # its config names; every view shows the first
        "declared": declared, "role": role, "model": _runs(stack, server, info) or model, "model_ref": model,
        "state": "failed" if failed and not (info and info.running) else state,
        "health": health, "desired": saved.get("desired", RUNNING),
        "uptime_s": uptime(info.started_at) if info is not None and info.running else None,
        "restarts": saved.get("restarts", 0), "last_restart": saved.get("last_restart"),
        "failed": failed, "image": info.image if info else None,
        "commit": (info.labels.get(L_COMMIT) or "")[:12] if info else None,
        "exit_code": info.exit_code if info is not None and not info.running else None,
        "model_file": info.labels.get(L_FILE) if info else None,
        "chosen": info.labels.get(L_CHOSEN) or None if info else None,
        "start": stack.cfg.servers[server].start if server in stack.cfg.servers else None,
        "memory": _memory(stack, server, saved) if declared else None,
        "last_used": saved.get("last_used"),
        "idle_s": round(time.time() - saved["last_used"], 1) if saved.get("last_used") else None,
    }


def _runs(stack: Stack, server: str, info: ContainerInfo | None) -> str | None:
    """The model file SERVER runs: its container's, else the one it would run if started now."""
    if info is not None and info.labels.get(L_FILE):
        return info.labels[L_FILE]
    try:
        return stack.model_files(server)[0] if server in stack.cfg.servers else None
    except StackError:
        return None


def _memory(stack: Stack, server: str, saved: dict[str, Any]) -> dict[str, Any] | None:
    """What the server holds, per device: the gateway's figures (estimate, and what it measured while the
    server ran), else an estimate made here from its model files."""
    if saved.get("memory"):
        m = saved["memory"]
        return {"estimate": m.get("estimate") or {}, "measured": m.get("measured") or {}, "context": m.get("context")}
    try:
        return {"estimate": stack.estimate(server).devices, "measured": {}}
    except (StackError, GGUFError, OSError):
        return None




def uptime(started_at: str | None) -> float | None:
    if not started_at:
        return None
    # both engines: RFC 3339 with nanoseconds, e.g. 2026-11-22T12:30:00.123456789Z (UTC)
    try:
        ts = datetime.fromisoformat(started_at.strip()[:19]).replace(tzinfo=UTC)
    except ValueError:
        return None
    return round(time.time() - ts.timestamp(), 1)
