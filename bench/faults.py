#!/usr/bin/env python3
"""Faults under load, measured on a real stack on Podman and on Docker: a chat and an embedding server (the tiny
test model), the gateway container, four clients sending small chat completions through it in a loop (each
on a keep-alive connection, a new one after an error). Faults (tests/faults.py injects them):

  server killed    kill -9 of the chat server's process, from the host
  gateway killed   kill -9 of the gateway's process
  engine API gone  (Podman) its API service killed; then the chat server killed while nothing can restart
                   it; then the service started again (`podllama doctor --fix`)

For each: requests sent from the fault until 20 s after it (or after recovery), how many failed and how,
the time until the server (or gateway) answered again, the slowest request meanwhile. The supervisor runs
at its default interval. Writes bench/RESULTS-faults.md.

Usage: bench/faults.py [--engines podman,docker] [--base local]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from podllama.access.credentials import Credentials  # noqa: E402
from podllama.build import bases, images, source  # noqa: E402
from podllama.engine import CliEngine, get_engine  # noqa: E402
from podllama.models import tinymodel  # noqa: E402
from tests.faults import Load, answers_health, kill_podman_service, kill_process, until  # noqa: E402

AFTER = 10.0  # seconds of load after recovery


def podllama(*args: str, cfg: Path, check: bool = True) -> str:
    return subprocess.run([sys.executable, "-m", "podllama.cli", *args, "-c", str(cfg)], cwd=ROOT, check=check,
                          capture_output=True, text=True).stdout


def make_stack(workdir: Path, engine: str, base: str, port: int) -> Path:
    models = workdir / "models"
    models.mkdir(parents=True)
    models.chmod(0o755)
    tinymodel.ensure(models / "tiny.gguf", source.source_dir(ROOT))
    cfg = workdir / "services.toml"
    cfg.write_text(f"""
[stack]
name = "plfault{engine[0]}"
engine = "{engine}"
variant = "cpu"
models_dir = "{models}"
[build]
base = "{base}"
cpu_target = "native"
ui = "off"
[gateway]
port = {port}
[servers.chat]
model = "tiny.gguf"
ctx_size = 1024
args = {{ parallel = 2 }}
[servers.embed]
role = "embedding"
model = "tiny.gguf"
ctx_size = 512
args = {{ pooling = "mean" }}
""")
    return cfg


def healthy(engine: CliEngine, name: str, key: dict[str, str], not_pid: int | None = None) -> bool:
    import httpx

    info = engine.inspect(name)
    return bool(info and info.running and info.ip and info.pid != not_pid and
                httpx.get(f"http://{info.ip}:8080/health", timeout=1, headers=key).status_code == 200)


def images_in(engine: CliEngine, work: Path) -> None:
    """Docker gets the llama-server image (and the local base) that Podman built."""
    podman = get_engine("podman")
    for ref in (images.tag_for("cpu"), f"{bases.LOCAL_BASE}:bookworm"):
        if podman.image_exists(ref) and engine.image_id(ref) != podman.image_id(ref):
            tar = work / "image.tar"
            podman.save(ref, tar)
            engine.load(tar)
            engine.tag(podman.image_id(ref) or ref, ref)
            tar.unlink()


def measure(load: Load, at: float, back: float | None) -> dict[str, object]:
    load.wait_for(len(load.requests) + 1)
    time.sleep(AFTER)
    return {**load.around(at), "recovered_s": None if back is None else round(back, 2)}


def run_engine(name: str, base: str, work: Path, port: int) -> list[dict[str, object]]:
    engine = get_engine(name)
    if name == "docker":
        images_in(engine, work)
    cfg = make_stack(work / name, name, base, port)
    print(f"[{name}] starting the stack …", flush=True)
    podllama("start", cfg=cfg)
    stack = f"plfault{name[0]}"
    key = {"Authorization": f"Bearer {Credentials(cfg.parent / '.podllama').server_key()}"}
    url = f"http://127.0.0.1:{port}"
    rows: list[dict[str, object]] = []
    try:
        chat, gateway = f"{stack}-chat-1", f"{stack}-gateway"

        print(f"[{name}] server killed", flush=True)
        with Load("127.0.0.1", port) as load:
            load.wait_for(50)
            pid = engine.inspect(chat).pid
            at = kill_process(pid)
            back = until(lambda: healthy(engine, chat, key, pid), 60)
            rows.append({"engine": name, "fault": "server killed (kill -9)", **measure(load, at, back)})

        print(f"[{name}] gateway killed", flush=True)
        with Load("127.0.0.1", port) as load:
            load.wait_for(50)
            pid = engine.inspect(gateway).pid
            at = kill_process(pid)
            back = until(lambda: engine.inspect(gateway).pid not in (None, pid) and answers_health(url), 60)
            rows.append({"engine": name, "fault": "gateway killed (kill -9)", **measure(load, at, back)})

        if name == "podman":
            print(f"[{name}] engine API gone, then a server killed", flush=True)
            with Load("127.0.0.1", port) as load:
                load.wait_for(50)
                at = kill_podman_service()
                time.sleep(3)
                pid = engine.inspect(chat).pid
                kill_process(pid)
                time.sleep(5)
                fixed = time.monotonic()
                podllama("doctor", "--engine", "podman", "--fix", cfg=cfg, check=False)
                back = until(lambda: healthy(engine, chat, key, pid), 60)
                row = measure(load, at, None if back is None else back + fixed - at)
                rows.append({"engine": name, "fault": "engine API gone 8 s, server killed after 3 s", **row})
    finally:
        podllama("doctor", "--engine", name, "--fix", cfg=cfg, check=False)
        podllama("down", cfg=cfg, check=False)
    return rows


def write(rows: list[dict[str, object]]) -> str:
    lines = [f"| {r['engine']} | {r['fault']} | {r['sent']} | {r['failed']} | "
             f"{', '.join(str(f) for f in r['failures']) or '-'} | {r['recovered_s']} s | {r['last_failure_s']} s | "  # type: ignore[attr-defined]
             f"{r['slowest_s']} s |"
             for r in rows]
    text = f"""# Faults under load

`bench/faults.py`, {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} cores. A chat and an
embedding server on the tiny test model, the gateway container, four clients sending small chat completions
(`max_tokens` 4) through the gateway in a loop, on keep-alive connections. Supervisor at its default interval
(2 s). Requests counted from the fault (those in flight then, and all sent after it) until {AFTER:.0f} s after
recovery; "recovered" is the time from the fault until the server (or the gateway) answered `/health` again,
"last failure" when the last failed request ended, counted from the fault.

| engine | fault | requests | failed | how they failed | recovered | last failure | slowest request |
|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

Targets: a killed server fails no request that had not begun to receive its answer, and answers again within
5 s; a killed gateway answers again within 5 s with its servers untouched (requests the dead process held,
and those sent while nothing listened, fail: clients see a reset or a refused connection).
Raw numbers: bench/results-faults.json.
"""
    (ROOT / "bench" / "RESULTS-faults.md").write_text(text)
    (ROOT / "bench" / "results-faults.json").write_text(json.dumps(rows, indent=1))
    return text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engines", default="podman,docker")
    p.add_argument("--base", default=os.environ.get("PODLLAMA_BASE", "local"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="podllama-faults-"))
    rows: list[dict[str, object]] = []
    for i, name in enumerate(args.engines.split(",")):
        rows += run_engine(name, args.base, work, 18700 + i)
    print(write(rows))


if __name__ == "__main__":
    main()
