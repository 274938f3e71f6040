#!/usr/bin/env python3
"""Gateway vs direct, and the gateway's upstream client vs aiohttp's, side by side in one run on this machine.

Part 1 — on a real llama-server (one chat server: the tiny test model, -c 4096 --parallel 4, CPU image), four
targets measured interleaved, round by round:
  direct   the llama-server container's address (with the stack's server key, as the gateway sends it)
  gateway  the gateway container, as `podllama start` runs it
  own      a gateway process with podllama's upstream client
  aiohttp  the same gateway process with aiohttp's client behind the same interface
Workloads, as in the peer measurements (docs in bench/RESULTS.md): small = a non-streamed chat completion
with max_tokens 1 (mostly overhead) at concurrency 1 and 16; stream = streaming chat completions, max_tokens
64, at 1, 16 and 64 streams; a new connection per request.

Part 2 — what the gateway itself costs: `own` and `aiohttp` in front of a fast fake upstream
(bench/fakeupstream.py), CPU seconds of the gateway process per request (keep-alive clients, concurrency 16)
and per streamed token (16 streams of 200 events).

With --before REV, the *aiohttp* column becomes *before*: the same gateway process from a checkout of REV
(podllama's own client), so a change is measured against what it changed, in the same run.

Writes bench/RESULTS.md and bench/results.json.

Usage: bench/gateway.py [--seconds 5] [--rounds 3] [--base local] [--before REV]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from podllama import config as cfgmod  # noqa: E402
from podllama.access.credentials import Credentials  # noqa: E402
from podllama.build import source  # noqa: E402
from podllama.engine import get_engine  # noqa: E402
from podllama.models import tinymodel  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "Write a long story about a gateway."}], "max_tokens": 64,
        "stream": True, "temperature": 1.0}
SMALL = {"messages": [{"role": "user", "content": "Hello, gateway! How fast are you today?"}], "max_tokens": 1}
CELLS = [("small", 1), ("small", 16), ("stream", 1), ("stream", 16), ("stream", 64)]
TARGETS = {("small", 1): 0.95, ("small", 16): 0.95, ("stream", 1): 0.95, ("stream", 16): 1.0, ("stream", 64): 1.0}
PORTS = {"gateway": 18900, "own": 18911, "aiohttp": 18912, "before": 18913, "fake": 18920, "own-fake": 18921,
         "aiohttp-fake": 18922, "before-fake": 18923}


def podllama(*args: str, cfg: Path) -> str:
    return subprocess.run([sys.executable, "-m", "podllama.cli", *args, "-c", str(cfg)], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


def make_stack(workdir: Path, base: str) -> Path:
    models = workdir / "models"
    models.mkdir(parents=True)
    models.chmod(0o755)
    tinymodel.ensure(models / "tiny.gguf", source.source_dir(ROOT))
    cfg = workdir / "services.toml"
    cfg.write_text(f"""
[stack]
name = "plbench"
variant = "cpu"
models_dir = "{models}"
[build]
base = "{base}"
cpu_target = "native"
ui = "off"
[gateway]
port = {PORTS["gateway"]}
[servers.chat]
role = "chat"
model = "tiny.gguf"
ctx_size = 4096
args = {{ parallel = 4 }}
""")
    return cfg


def spawn(*argv: str, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def gateway_proc(cfg: Path, port: int, client: str, upstream: str | None = None, root: Path = ROOT
                 ) -> subprocess.Popen[bytes]:
    """A gateway process from the checkout at ROOT (this one, or --before's)."""
    return spawn("bench/gatewayproc.py", "--config", str(cfg), "--port", str(port), "--client", client,
                 *(["--upstream", upstream] if upstream else []), cwd=root)


def checkout(rev: str, work: Path) -> Path:
    """A worktree of REV (for --before), removed with the benchmark's work directory."""
    where = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    return where


def wait_up(url: str, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


# -- load ---------------------------------------------------------------------------------------------------------
async def small(url: str, headers: dict[str, str], conc: int, seconds: float) -> dict[str, float]:
    lat: list[float] = []
    stop = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
                    s.post(f"{url}/v1/chat/completions", json=SMALL, headers=headers) as r:
                await r.read()
                assert r.status == 200, (r.status, await r.text())
            lat.append(time.perf_counter() - t0)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.monotonic() - t0
    lat.sort()
    return {"rate": len(lat) / wall, "p50": lat[len(lat) // 2] * 1000, "p99": lat[int(len(lat) * 0.99)] * 1000,
            "n": len(lat)}


async def stream(url: str, headers: dict[str, str], conc: int, seconds: float, body: dict | None = None
                 ) -> dict[str, float]:
    tokens = 0
    ttft: list[float] = []
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal tokens
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            first = True
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
                    s.post(f"{url}/v1/chat/completions", json=body or CHAT, headers=headers) as r:
                assert r.status == 200, (r.status, await r.text())
                async for line in r.content:
                    if line.startswith(b"data: {") and b'"content"' in line:
                        if first:
                            ttft.append(time.perf_counter() - t0)
                            first = False
                        tokens += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.monotonic() - t0
    ttft.sort()
    return {"rate": tokens / wall, "p50": ttft[len(ttft) // 2] * 1000 if ttft else 0,
            "p99": ttft[int(len(ttft) * 0.99)] * 1000 if ttft else 0, "n": tokens}


async def measure(targets: dict[str, tuple[str, dict[str, str]]], seconds: float, rounds: int
                  ) -> dict[tuple[str, int, str], list[dict[str, float]]]:
    results: dict[tuple[str, int, str], list[dict[str, float]]] = {
        (k, c, t): [] for k, c in CELLS for t in targets}
    for url, headers in targets.values():  # warm every path (connections, caches)
        await small(url, headers, 4, 1)
    names = list(targets)
    for r in range(rounds):
        for kind, conc in CELLS:
            order = names[r % len(names):] + names[:r % len(names)]  # who goes first rotates
            for target in order:
                fn = small if kind == "small" else stream
                res = await fn(*targets[target], conc, seconds)
                results[(kind, conc, target)].append(res)
                print(f"round {r + 1} {kind:6} c{conc:<3} {target:8} {res['rate']:9.1f}/s  p50 {res['p50']:7.2f} ms"
                      f"  p99 {res['p99']:7.2f} ms", flush=True)
    return results


# -- CPU time of the gateway itself -------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_cost(url: str, pid: int, requests: int, streams: int) -> dict[str, float]:
    """Gateway CPU per small request (keep-alive clients, 16 at once) and per streamed token (16 streams)."""
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as s:
        async def one() -> None:
            async with s.post(f"{url}/v1/chat/completions", json=SMALL) as r:
                await r.read()

        async def worker(n: int) -> None:
            for _ in range(n):
                await one()

        await worker(50)
        c0 = cpu_seconds(pid)
        await asyncio.gather(*(worker(requests // 16) for _ in range(16)))
        per_request = (cpu_seconds(pid) - c0) / (requests // 16 * 16)
    body = CHAT | {"max_tokens": 200}
    tokens = 0

    async def one_stream() -> None:
        nonlocal tokens
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
                s.post(f"{url}/v1/chat/completions", json=body) as r:
            async for line in r.content:
                tokens += line.startswith(b"data: {")

    c0 = cpu_seconds(pid)
    for _ in range(streams // 16):
        await asyncio.gather(*(one_stream() for _ in range(16)))
    per_token = (cpu_seconds(pid) - c0) / max(tokens, 1)
    return {"us_per_request": per_request * 1e6, "us_per_token": per_token * 1e6, "tokens": tokens}


async def measure_cpu(urls: dict[str, tuple[str, int]], rounds: int, requests: int, streams: int
                      ) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
    for r in range(rounds):
        for name in (list(urls) if r % 2 == 0 else list(reversed(urls))):
            res = await cpu_cost(*urls[name], requests, streams)
            out[name].append(res)
            print(f"cpu round {r + 1} {name:8} {res['us_per_request']:7.1f} µs/request "
                  f"{res['us_per_token']:6.1f} µs/token ({res['tokens']} tokens)", flush=True)
    return out


# -- report -------------------------------------------------------------------------------------------------------
def summarize(results: dict, cpu: dict, seconds: float, rounds: int, note: str, other: str = "aiohttp") -> str:
    def med(kind: str, conc: int, target: str, key: str) -> float:
        return statistics.median(x[key] for x in results[(kind, conc, target)])

    def spread(kind: str, conc: int, target: str) -> str:
        per_round = [g["rate"] / d["rate"] for d, g in zip(results[(kind, conc, "direct")],
                                                           results[(kind, conc, target)], strict=True) if d["rate"]]
        return f" ({min(per_round):.2f}–{max(per_round):.2f})" if len(per_round) > 1 else ""

    lines = [
        "# Gateway benchmark", "",
        f"`bench/gateway.py --seconds {seconds:g} --rounds {rounds}`, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{platform.node()}, {os.cpu_count()} cores. {note}", "",
        "## Against llama-server: gateway ÷ direct, same run", "",
        "Upstream: one llama-server (CPU image, the 9 MB tiny test model, `-c 4096 --parallel 4`) in a Podman "
        "container. *direct*: the container's address; *gateway*: the gateway container as `podllama start` "
        "runs it; *own* / *aiohttp*: the same gateway as a process, with podllama's upstream client or aiohttp's. "
        "small = a non-streamed chat completion, max_tokens 1; stream = a streamed one, 64 tokens (the workloads "
        "of the peer measurements). Load: aiohttp in one process, "
        "a new connection per request. Cells interleaved round by round, the order rotating; medians; each ratio "
        "is against *direct* in the same cell (the rounds' range in brackets).", "",
        f"| workload | conc | direct | gateway (ratio) | own (ratio) | {other} (ratio) | gateway added p50 | "
        "target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    met = 0
    for kind, conc in CELLS:
        d = med(kind, conc, "direct", "rate")
        cells = []
        for target in ("gateway", "own", other):
            g = med(kind, conc, target, "rate")
            cells.append(f"{g:,.1f} ({g / d:.3f}×{spread(kind, conc, target)})")
        ratio = med(kind, conc, "gateway", "rate") / d
        goal = TARGETS[(kind, conc)]
        ok = ratio >= goal
        met += ok
        added = med(kind, conc, "gateway", "p50") - med(kind, conc, "direct", "p50")
        unit = "req/s" if kind == "small" else "tokens/s"
        what = "TTFT " if kind == "stream" else ""
        lines.append(f"| {kind} ({unit}) | {conc} | {d:,.1f} | {' | '.join(cells)} | {what}{added:+.2f} ms | "
                     f"≥ {goal:.2f}× | {'✓' if ok else '✗'} |")
    lines += ["", f"Targets met (gateway container ÷ direct): {met}/{len(CELLS)}.", "",
              "## What the gateway itself costs: CPU time against a fast fake upstream", "",
              "The gateway process (uvloop, httptools) in front of bench/fakeupstream.py, which answers at once and "
              "streams one SSE event per write. CPU seconds of the gateway process (user + system) ÷ work done; "
              "small requests from keep-alive clients, 16 at once; 16 streams of 200 tokens at a time. Medians of "
              "the rounds.", "",
              "| upstream client | µs CPU per request | µs CPU per streamed token |", "|---|---|---|"]
    for name, runs in cpu.items():
        lines.append(f"| {name.removesuffix('-fake')} | {statistics.median(r['us_per_request'] for r in runs):.0f} | "
                     f"{statistics.median(r['us_per_token'] for r in runs):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpu-requests", type=int, default=4000)
    p.add_argument("--cpu-streams", type=int, default=64)
    p.add_argument("--base", default=os.environ.get("PODLLAMA_BASE", "local"))
    p.add_argument("--keep", action="store_true", help="leave the stack running")
    p.add_argument("--note", default="")
    p.add_argument("--before", metavar="REV", help="compare with the gateway at this commit instead of aiohttp's client")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="podllama-bench-"))
    other, before = ("before", checkout(args.before, work)) if args.before else ("aiohttp", ROOT)
    client = "own" if args.before else "aiohttp"
    cfg = make_stack(work, args.base)
    print("starting the stack …", flush=True)
    podllama("start", cfg=cfg)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        c = cfgmod.load(cfg)
        info = get_engine(c.stack.engine).inspect("plbench-chat-1")
        assert info is not None and info.ip
        key = {"Authorization": f"Bearer {Credentials(c.state_path).server_key()}"}
        procs += [gateway_proc(cfg, PORTS["own"], "own"), gateway_proc(cfg, PORTS[other], client, root=before)]
        targets = {"direct": (f"http://{info.ip}:8080", key)} | {
            name: (f"http://127.0.0.1:{PORTS[name]}", {}) for name in ("gateway", "own", other)}
        for name in ("own", other):
            wait_up(targets[name][0])
        results = asyncio.run(measure(targets, args.seconds, args.rounds))
        for proc in procs:
            proc.terminate()
        procs += [spawn("bench/fakeupstream.py", str(PORTS["fake"]))]
        fake = f"127.0.0.1:{PORTS['fake']}"
        procs += [gateway_proc(cfg, PORTS["own-fake"], "own", fake),
                  gateway_proc(cfg, PORTS[f"{other}-fake"], client, fake, root=before)]
        urls = {name: (f"http://127.0.0.1:{PORTS[name]}", procs[-2 + i].pid)
                for i, name in enumerate(("own-fake", f"{other}-fake"))}
        for url, _ in urls.values():
            wait_up(url)
        cpu = asyncio.run(measure_cpu(urls, args.rounds, args.cpu_requests, args.cpu_streams))
        text = summarize(results, cpu, args.seconds, args.rounds, args.note, other)
        (ROOT / "bench" / "RESULTS.md").write_text(text)
        (ROOT / "bench" / "results.json").write_text(json.dumps(
            {"requests": {f"{k}|{c}|{t}": v for (k, c, t), v in results.items()}, "cpu": cpu}, indent=1))
        print(text)
    finally:
        for proc in procs:
            proc.terminate()
        if not args.keep:
            podllama("down", cfg=cfg)
        if args.before:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)


if __name__ == "__main__":
    main()
