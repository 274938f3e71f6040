"""Helpers the tests share: running the real `podllama` command, waiting for a condition, reading a unit file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from podllama.gateway.routing.metrics import LAG_BUCKETS, Histogram, watch_loop

ROOT = Path(__file__).resolve().parents[1]
PODLLAMA = [sys.executable, "-m", "podllama.cli"]
# Stacks the tests name carry this run's mark, so two test runs on one machine never share containers.
RUN = uuid.uuid4().hex[:4]


def stack_name(prefix: str) -> str:
    return f"{prefix}{RUN}"


def podllama(*args: str, check: bool = True, timeout: float = 3600, env: dict | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `podllama` command."""
    proc = subprocess.run(PODLLAMA + list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"podllama {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def get_ok(url: str, timeout: float = 2) -> bool:
    """GET URL answers 200 (no answer at all is False, not an error)."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def flood_headers(port: int, total: int = 32 * 2**20) -> tuple[bytes, int]:
    """Send up to TOTAL bytes of request headers to 127.0.0.1:PORT; returns (the answer's start, bytes sent
    before the other side stopped taking them)."""
    import socket

    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sent = 0
        try:
            while sent < total:
                sock.sendall(b"X-Filler: " + b"a" * 65000 + b"\r\n")
                sent += 65012
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(3)
        try:
            return sock.recv(200), sent
        except (TimeoutError, ConnectionResetError):
            return b"", sent


def unit_file(path: Path) -> list[tuple[str, str, str]]:
    """A unit file as (section, key, value) lines, in order (Quadlet keys repeat)."""
    out, section = [], ""
    for line in path.read_text().splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.append((section, key, value))
    return out


@contextlib.contextmanager
def control_loop() -> Iterator[Histogram]:
    """An idle event loop in a thread of this process, its lag measured as the gateway's is: what the machine's
    load and the interpreter's lock cost any loop here. What the gateway's loop suffers beyond it, the gateway
    did to itself."""
    lag, stop, ready = Histogram(LAG_BUCKETS), None, threading.Event()

    async def run() -> None:
        nonlocal stop
        stop = asyncio.Event()
        ready.set()
        await watch_loop(lag, stop)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield lag
    finally:
        loop.call_soon_threadsafe(stop.set)  # type: ignore[union-attr]
        thread.join(10)
        loop.close()


STANDIN = """#!/usr/bin/env python3
import json, sys
from pathlib import Path
state = Path(__file__).with_suffix(".json")
st = json.loads(state.read_text())
args = sys.argv[1:]
st["calls"].append(args)
state.write_text(json.dumps(st))
if args[:2] == ["image", "inspect"]:
    if args[2] in st["present"]:
        print(json.dumps([{"Id": "sha256:" + "a" * 64, "Config": {"Labels": st["present"][args[2]]}}]))
        sys.exit(0)
    sys.stderr.write("Error: " + args[2] + ": image not known\\n")
    sys.exit(125)
if args[0] == "pull":
    ref = args[-1]
    if st["registry"] is None or ref in st["registry"]:
        st["present"][ref] = (st["registry"] or {}).get(ref, {})
        state.write_text(json.dumps(st))
        sys.exit(0)
    sys.stderr.write("Trying to pull " + ref + "...\\nError: initializing source docker://" + ref
                     + ": pinging container registry: dial tcp: lookup registry: no such host\\n")
    sys.exit(125)
if args[0] in ("tag", "untag", "images"):
    sys.exit(0)
sys.exit(2)
"""


def standin_podman(directory: Path, present: list[str] | dict[str, dict[str, str]],
                   registry: dict[str, dict[str, str]] | None) -> tuple[Any, Callable[[], list[list[str]]]]:
    """A `podman` program (the process boundary podllama talks to) with PRESENT images (names, or names and their
    labels) that reaches a REGISTRY holding those images with those labels (None: one that gives any image; {}:
    none reachable). Returns the engine and a reader of the commands it was given."""
    import json
    import stat

    from podllama.engine.podman import PodmanEngine

    directory.mkdir(parents=True, exist_ok=True)
    client = directory / "podman"
    client.write_text(STANDIN)
    client.chmod(client.stat().st_mode | stat.S_IEXEC)
    images = present if isinstance(present, dict) else {ref: {} for ref in present}
    client.with_suffix(".json").write_text(json.dumps({"present": images, "registry": registry, "calls": []}))

    class StandIn(PodmanEngine):
        binary = str(client)

    return StandIn(), lambda: json.loads(client.with_suffix(".json").read_text())["calls"]
