#!/usr/bin/env python3
"""The request log's cost: two gateway processes side by side in one run, in front of the same fast fake
upstream (bench/fakeupstream.py, which answers at once), each with a database key that requests use, one with
`[gateway] log_requests = true` and one with it off. Measured interleaved, round by round (the order reversed
every round), with keep-alive clients:

  small   non-streamed chat completions (an answer with `usage`), 16 at once, for --seconds: requests/s
  stream  streamed chat completions of 200 events, 16 at once: events/s

and the gateway process's CPU time per request, in short slices side by side. At the end, the rows written
are checked against the requests made (none dropped). Writes bench/RESULTS-requestlog.md and bench/results-requestlog.json.

Usage: bench/requestlog.py [--seconds 2] [--rounds 20] [--database postgresql://…]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

from gateway import cpu_seconds, gateway_proc, spawn, wait_up  # noqa: E402

from podllama import config as cfgmod  # noqa: E402
from podllama.access.credentials import Credentials  # noqa: E402
from podllama.access.keys import KeyStore, NewKey  # noqa: E402

SMALL = {"messages": [{"role": "user", "content": "Hello, gateway! How fast are you today?"}], "max_tokens": 1}
STREAM = {"messages": [{"role": "user", "content": "Write a story."}], "max_tokens": 200, "stream": True}
PORTS = {"fake": 18930, "on": 18931, "off": 18932}


def make_stack(work: Path, name: str, log: bool, database: str | None) -> tuple[Path, str]:
    """A config whose one server is the fake upstream; returns it and a key made in its database."""
    d = work / name
    d.mkdir()
    cfg = d / "services.toml"
    db = f'database = "{database}"\n' if database else ""
    cfg.write_text(f'[stack]\nname = "plbench-{name}"\nmodels_dir = "models"\n[gateway]\nport = {PORTS[name]}\n'
                   f'log_requests = {str(log).lower()}\n{db}[servers.chat]\nmodel = "tiny.gguf"\n')
    c = cfgmod.load(cfg)
    _, secret = KeyStore(Credentials(c.state_path).database(c)).create(NewKey(f"bench-{name}"))
    return cfg, secret


async def small(url: str, headers: dict[str, str], seconds: float) -> int:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16), headers=headers) as s:
        done = 0
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                async with s.post(f"{url}/v1/chat/completions", json=SMALL) as r:
                    await r.read()
                    assert r.status == 200, r.status
                done += 1

        await asyncio.gather(*(worker() for _ in range(16)))
        return done


async def stream(url: str, headers: dict[str, str], seconds: float) -> tuple[int, int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16), headers=headers) as s:
        events = requests = 0
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal events, requests
            while time.monotonic() < deadline:
                async with s.post(f"{url}/v1/chat/completions", json=STREAM) as r:
                    async for line in r.content:
                        events += line.startswith(b"data: {")
                requests += 1

        await asyncio.gather(*(worker() for _ in range(16)))
        return events, requests


async def measure(targets: dict[str, tuple[str, dict[str, str], int]], seconds: float, rounds: int) -> dict:
    """Short slices, on and off side by side (the order swapped every round), so that the machine's own drift
    (a shared host's speed changes by tens of percent within a minute) falls on both alike; each round gives
    one on/off ratio per workload."""
    out: dict[str, dict[str, list[float]]] = {n: {"small_rps": [], "stream_eps": [], "us_per_request": []}
                                              for n in targets}
    sent = {n: 0 for n in targets}
    for r in range(rounds):
        order = list(targets) if r % 2 == 0 else list(reversed(targets))
        for name in order:
            url, headers, pid = targets[name]
            c0 = cpu_seconds(pid)
            n = await small(url, headers, seconds)
            out[name]["us_per_request"].append((cpu_seconds(pid) - c0) / n * 1e6)
            out[name]["small_rps"].append(n / seconds)
            sent[name] += n
        for name in order:
            url, headers, _ = targets[name]
            events, streams = await stream(url, headers, seconds)
            out[name]["stream_eps"].append(events / seconds)
            sent[name] += streams
        print(f"round {r + 1:2}: small on/off {out['on']['small_rps'][-1]:6.0f} / {out['off']['small_rps'][-1]:6.0f} "
              f"requests/s, stream on/off {out['on']['stream_eps'][-1]:6.0f} / {out['off']['stream_eps'][-1]:6.0f} "
              "events/s", flush=True)
    return {"runs": out, "sent": sent}


def pin(gateways: list[int], others: list[int]) -> bool:
    """The gateways on the first core, the client and the fake upstream on the others: the gateway is what
    runs out of CPU first, so what the log costs it shows in the throughput. False on a single core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return False
    for pid in gateways:
        for tid in os.listdir(f"/proc/{pid}/task"):  # every thread, the log's writer too
            os.sched_setaffinity(int(tid), {cores[0]})
    for pid in others:
        os.sched_setaffinity(pid, set(cores[1:]))
    return True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--database", help="a postgresql:// URL for both (default: each its own SQLite file)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="podllama-bench-log-"))
    stacks = {name: make_stack(work, name, name == "on", args.database) for name in ("on", "off")}
    procs = [spawn("bench/fakeupstream.py", str(PORTS["fake"]))]
    try:
        fake = f"127.0.0.1:{PORTS['fake']}"
        for name, (cfg, _) in stacks.items():
            procs.append(gateway_proc(cfg, PORTS[name], "own", fake))
        targets = {name: (f"http://127.0.0.1:{PORTS[name]}", {"Authorization": f"Bearer {stacks[name][1]}"},
                          procs[i + 1].pid) for i, name in enumerate(("on", "off"))}
        pinned = pin([p.pid for p in procs[1:]], [procs[0].pid, os.getpid()])
        for url, _, _ in targets.values():
            wait_up(url)
        time.sleep(3)  # the gateways read their keys
        warm = {name: asyncio.run(small(url, headers, 2))  # warm both up (connections, caches, the database)
                for name, (url, headers, _) in targets.items()}["on"]
        result = asyncio.run(measure(targets, args.seconds, args.rounds))
        cfg_on = cfgmod.load(stacks["on"][0])
        db = Credentials(cfg_on.state_path).database(cfg_on)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = db.query("SELECT COUNT(*) FROM podllama_requests")[0][0]
            if rows >= result["sent"]["on"] + warm:
                break
            time.sleep(0.5)
        result["rows_written"] = rows - warm
        result["pinned"] = pinned
    finally:
        for proc in procs:
            proc.terminate()
    report(result, args)


def report(result: dict, args: argparse.Namespace) -> None:
    runs = result["runs"]
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in runs.items()}
    ratios = {k: [a / b for a, b in zip(runs["on"][k], runs["off"][k], strict=True)]
              for k in ("small_rps", "stream_eps", "us_per_request")}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}
    where = "Postgres" if args.database else "SQLite (WAL), each gateway its own file"
    lines = [
        "# The request log's cost: logging on vs off", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, by "
        f"`bench/requestlog.py --seconds {args.seconds:g} --rounds {args.rounds}`: two gateway processes in front "
        "of one fake upstream that answers at once, each with a database key the requests use, one writing the "
        f"request log ({where}), one not. Each round runs both side by side in {args.seconds:g}-second slices "
        "(the order swapped every round) and gives one on/off ratio; the table shows the median of "
        f"{args.rounds} rounds' ratios. "
        + ("The gateways run on one core (every thread, the log's writer too), the client and the fake upstream "
           "on the others, so the gateway is what runs out of CPU: what logging costs it shows in the throughput."
           if result["pinned"] else "Client, gateways and upstream share one core."), "",
        "| | log on | log off | on / off (median of rounds) |", "|---|---|---|---|",
        f"| small requests/s (16 at once) | {med['on']['small_rps']:.0f} | {med['off']['small_rps']:.0f} | "
        f"{ratio['small_rps']:.3f} |",
        f"| streamed events/s (16 streams) | {med['on']['stream_eps']:.0f} | {med['off']['stream_eps']:.0f} | "
        f"{ratio['stream_eps']:.3f} |",
        f"| gateway CPU per small request | {med['on']['us_per_request']:.0f} µs | "
        f"{med['off']['us_per_request']:.0f} µs | {ratio['us_per_request']:.3f} |", "",
        f"Rows written by the logging gateway: {result['rows_written']} of {result['sent']['on']} requests made "
        f"({result['sent']['on'] - result['rows_written']} missing).", "",
        "Every round:", "",
        "| round | small on | small off | ratio | stream on | stream off | ratio |", "|---|---|---|---|---|---|---|",
    ]
    for i in range(len(runs["on"]["small_rps"])):
        lines.append(f"| {i + 1} | {runs['on']['small_rps'][i]:.0f} | {runs['off']['small_rps'][i]:.0f} | "
                     f"{ratios['small_rps'][i]:.3f} | {runs['on']['stream_eps'][i]:.0f} | "
                     f"{runs['off']['stream_eps'][i]:.0f} | {ratios['stream_eps'][i]:.3f} |")
    text = "\n".join(lines) + "\n"
    (ROOT / "bench" / "RESULTS-requestlog.md").write_text(text)
    (ROOT / "bench" / "results-requestlog.json").write_text(json.dumps(
        result | {"medians": med, "ratios": ratios, "median_ratio": ratio}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
