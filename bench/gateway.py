#!/usr/bin/env python3
"""Gateway vs direct, side by side in one run, on this machine.

Starts a stack (one chat server: the tiny test model, -c 4096 --parallel 4, on the CPU image) with its gateway
container, then measures, interleaved round by round:
  small   POST /tokenize (non-streaming, mostly overhead) at concurrency 1, 16, 64: requests/s, latency
  stream  streaming chat completions, max_tokens 64, at 1, 16, 64 concurrent streams: tokens/s
"direct" talks to the llama-server container's address, "gateway" to the gateway's published port. The load
generator (aiohttp, a new connection per request, as in the peer measurements) runs in this process.
Writes bench/RESULTS.md.

Usage: bench/gateway.py [--seconds 6] [--rounds 2] [--keep] [--config services.toml-of-a-running-stack]
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
from podllama import source, tinymodel
from podllama.engine import get_engine  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "Write a long story about a gateway."}], "max_tokens": 64,
        "stream": True, "temperature": 1.0}
TOKENIZE = {"content": "Hello, gateway! How fast are you today?"}


def podllama(*args: str, cfg: Path) -> str:
    return subprocess.run([sys.executable, "-m", "podllama.cli", *args, "-c", str(cfg)], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


def make_stack(workdir: Path, base: str) -> Path:
    models = workdir / "models"
    models.mkdir(parents=True)
    models.chmod(0o755)
    tinymodel.ensure(models / "tiny.gguf", source.source_dir(ROOT))
    port = 18900
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
port = {port}
[servers.chat]
role = "chat"
model = "tiny.gguf"
ctx_size = 4096
args = {{ parallel = 4 }}
""")
    return cfg


async def small(url: str, conc: int, seconds: float) -> dict:
    lat: list[float] = []
    stop = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.post(f"{url}/tokenize", json=TOKENIZE) as r:
                    await r.read()
                    assert r.status == 200, (r.status, await r.text())
            lat.append(time.perf_counter() - t0)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.monotonic() - t0
    lat.sort()
    return {"rate": len(lat) / wall, "p50": lat[len(lat) // 2] * 1000, "p99": lat[int(len(lat) * 0.99)] * 1000,
            "n": len(lat)}


async def stream(url: str, conc: int, seconds: float) -> dict:
    tokens = 0
    ttft: list[float] = []
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal tokens
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            first = True
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.post(f"{url}/v1/chat/completions", json=CHAT) as r:
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


CELLS = [("small", 1), ("small", 16), ("small", 64), ("stream", 1), ("stream", 16), ("stream", 64)]


async def measure(direct: str, gateway: str, seconds: float, rounds: int) -> dict:
    results: dict = {(k, c, t): [] for k, c in CELLS for t in ("direct", "gateway")}
    for _ in range(2):  # warm both paths (connections, caches)
        await small(direct, 4, 1)
        await small(gateway, 4, 1)
    for r in range(rounds):
        for kind, conc in CELLS:
            order = ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")
            for target in order:
                fn = small if kind == "small" else stream
                res = await fn(direct if target == "direct" else gateway, conc, seconds)
                results[(kind, conc, target)].append(res)
                print(f"round {r + 1} {kind:6} c{conc:<3} {target:8} {res['rate']:9.1f}/s  p50 {res['p50']:7.2f} ms"
                      f"  p99 {res['p99']:7.2f} ms", flush=True)
    return results


def summarize(results: dict, seconds: float, rounds: int, note: str) -> str:
    def med(kind: str, conc: int, target: str, key: str) -> float:
        return statistics.median(x[key] for x in results[(kind, conc, target)])

    lines = [
        "# Gateway benchmark", "",
        f"`bench/gateway.py --seconds {seconds:g} --rounds {rounds}`, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{platform.node()}, {os.cpu_count()} cores. {note}", "",
        "Upstream: one llama-server (CPU image, the 9 MB tiny test model, `-c 4096 --parallel 4`) in a Podman "
        "container. *direct*: the container's address; *gateway*: the podllama gateway container's published "
        "port. Load: aiohttp in one process, a new connection per request. "
        "Cells interleaved round by round; medians. Ratio = gateway ÷ direct in the same cell.", "",
        "| workload | conc | direct | gateway | ratio (rounds' range) | added p50 | added p99 | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for kind, conc in CELLS:
        d, g = med(kind, conc, "direct", "rate"), med(kind, conc, "gateway", "rate")
        ratio = g / d if d else 0
        dp50, gp50 = med(kind, conc, "direct", "p50"), med(kind, conc, "gateway", "p50")
        dp99, gp99 = med(kind, conc, "direct", "p99"), med(kind, conc, "gateway", "p99")
        unit = "req/s" if kind == "small" else "tokens/s"
        if kind == "stream":
            target, ok = "≥ 0.98×", ratio >= 0.98
        elif conc == 16:
            target, ok = "+p50 ≤ 1 ms, +p99 ≤ 5 ms", gp50 - dp50 <= 1 and gp99 - dp99 <= 5
        else:
            target, ok = "—", True
        verdicts.append(ok)
        what = "TTFT " if kind == "stream" else ""
        per_round = [gr["rate"] / dr["rate"] for dr, gr in zip(results[(kind, conc, "direct")],
                                                              results[(kind, conc, "gateway")]) if dr["rate"]]
        spread = f" ({min(per_round):.2f}–{max(per_round):.2f})" if len(per_round) > 1 else ""
        lines.append(f"| {kind} ({unit}) | {conc} | {d:,.1f} | {g:,.1f} | {ratio:.3f}×{spread} | {what}{gp50 - dp50:+.2f} ms | "
                     f"{what}{gp99 - dp99:+.2f} ms | {target} {'✓' if ok else '✗'} |")
    lines += ["", f"Targets met: {sum(verdicts)}/{len(verdicts)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--base", default=os.environ.get("PODLLAMA_BASE", "local"))
    p.add_argument("--keep", action="store_true", help="leave the stack running")
    p.add_argument("--note", default="")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="podllama-bench-"))
    cfg = make_stack(work, args.base)
    print("starting the stack …", flush=True)
    podllama("start", cfg=cfg)
    try:
        c = cfgmod.load(cfg)
        info = get_engine(c.stack.engine).inspect("plbench-chat-1")
        direct, gateway = f"http://{info.ip}:8080", f"http://127.0.0.1:{c.gateway.port}"
        results = asyncio.run(measure(direct, gateway, args.seconds, args.rounds))
        text = summarize(results, args.seconds, args.rounds, args.note)
        (ROOT / "bench" / "RESULTS.md").write_text(text)
        (ROOT / "bench" / "results.json").write_text(json.dumps(
            {f"{k}|{c}|{t}": v for (k, c, t), v in results.items()}, indent=1))
        print(text)
    finally:
        if not args.keep:
            podllama("down", cfg=cfg)


if __name__ == "__main__":
    main()
