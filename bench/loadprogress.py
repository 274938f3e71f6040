#!/usr/bin/env python3
"""A slow cold load against a client that gives up on silence, at full scale: a server that takes 30 s to load,
and clients that close a connection after 10 s without a byte (a common proxy or SDK read timeout). The gateway
runs in-process with its defaults (`progress_interval` 5 s) over the test suite's in-process engine
(tests/fakeengine.py), whose server answers /health 503 for the load time. A real model that takes 30 s to load
does not fit this machine; the gateway's side is the same code that real loads run through
(tests/integration/test_ondemand.py watches a real load's stages).

For each streaming API the gateway serves (OpenAI chat, Anthropic messages, Ollama's NDJSON chat): whether
the answer arrived, when its first real byte came, how many progress lines came before it and the longest
silence the client saw. The same request with `progress_interval = 0` (no progress lines) is the control:
the client gives up. Writes bench/RESULTS-loadprogress.md.

Usage: bench/loadprogress.py [--load 30] [--read-timeout 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from podllama import config  # noqa: E402
from podllama.build import source  # noqa: E402
from podllama.gateway.app import Gateway  # noqa: E402
from podllama.gateway.front import server  # noqa: E402
from podllama.models import tinymodel  # noqa: E402
from tests.fakeengine import FakeEngine, Script  # noqa: E402
from tests.helpers import wait_until  # noqa: E402
from tests.unit.conftest import free_port  # noqa: E402

MESSAGES = [{"role": "user", "content": "hi"}]
APIS = {  # name → (path, body)
    "OpenAI chat (SSE)": ("/v1/chat/completions", {"model": "slow", "stream": True, "max_tokens": 4,
                                                   "messages": MESSAGES}),
    "Anthropic messages (SSE)": ("/v1/messages", {"model": "slow", "stream": True, "max_tokens": 4,
                                                  "messages": MESSAGES}),
    "Ollama chat (NDJSON)": ("/api/chat", {"model": "slow", "stream": True, "messages": MESSAGES,
                                           "options": {"num_predict": 4}}),
}


def serve(work: Path, models: Path, interval: float, load: float) -> tuple[str, uvicorn.Server]:
    port = free_port()
    path = work / f"services-{interval}.toml"
    path.write_text(f'[stack]\nname = "lp{port}"\nmodels_dir = "{models}"\n[gateway]\nport = {port}\n'
                    f"progress_interval = {interval}\nload_timeout = {load * 3}\n"
                    '[servers.slow]\nmodel = "tiny.gguf"\nstart = "on-demand"\nctx_size = 1024\n')
    engine = FakeEngine()
    gw = Gateway(config.load(path), supervise=True, engine=engine, poll_every=0.25)
    engine.server_key = gw.credentials.server_key() or ""
    engine.on_demand = {"slow"}
    engine.scripts["slow"] = Script(load_seconds=load)
    srv = uvicorn.Server(server.config(gw, "127.0.0.1", port, gw.limits))
    threading.Thread(target=srv.run, daemon=True).start()
    wait_until(lambda: srv.started, timeout=20)
    return f"http://127.0.0.1:{port}", srv


def unload(url: str, work: Path) -> None:
    from podllama.access.credentials import Credentials

    key = Credentials(work / ".podllama").admin_key()
    httpx.post(f"{url}/admin/servers/slow/unload", headers={"Authorization": f"Bearer {key}"},
               timeout=60).raise_for_status()


def one(url: str, path: str, body: dict, read_timeout: float) -> dict:
    started = time.monotonic()
    last, longest, progress, first = started, 0.0, 0, None
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=read_timeout)) as client, \
                client.stream("POST", path, json=body) as r:
            for line in r.iter_lines():
                now = time.monotonic()
                longest, last = max(longest, now - last), now
                if not line:
                    continue
                waiting = line.startswith(":") or (path == "/api/chat" and json.loads(line).get("message", {})
                                                   .get("content") == "" and not json.loads(line).get("done"))
                if waiting and first is None:
                    progress += 1
                elif first is None:
                    first = now - started
        outcome = "answered" if first is not None else "no answer"
    except httpx.ReadTimeout:
        outcome = f"gave up (no byte for {read_timeout:g} s)"
    return {"outcome": outcome, "first_byte_s": None if first is None else round(first, 1),
            "progress_lines": progress, "longest_silence_s": round(max(longest, time.monotonic() - last), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", type=float, default=30)
    ap.add_argument("--read-timeout", type=float, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="podllama-bench-lp-"))
    models = work / "models"
    models.mkdir()
    tinymodel.ensure(models / "tiny.gguf", source.source_dir(ROOT))
    rows = []
    for interval in (5.0, 0.0):
        url, srv = serve(work, models, interval, args.load)
        for api, (path, body) in APIS.items():
            row = {"api": api, "progress_interval": interval} | one(url, path, body, args.read_timeout)
            print(row, flush=True)
            rows.append(row)
            if interval == 0:
                break  # the control: one API shows it
            unload(url, work)  # the next API waits for a cold load too
        srv.should_exit = True
    lines = [
        "# A 30 s load and a client that gives up after 10 s of silence", "",
        f"`bench/loadprogress.py`, {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}: a server that loads for "
        f"{args.load:g} s (the in-process engine), clients with a {args.read_timeout:g} s read timeout, the gateway "
        "at its defaults.", "",
        "| API | progress_interval | outcome | first real byte | progress lines before it | longest silence |",
        "|---|---|---|---|---|---|",
        *(f"| {r['api']} | {r['progress_interval']:g} s | {r['outcome']} | "
          f"{'-' if r['first_byte_s'] is None else str(r['first_byte_s']) + ' s'} | {r['progress_lines']} | "
          f"{r['longest_silence_s']} s |" for r in rows), ""]
    (ROOT / "bench" / "RESULTS-loadprogress.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
