#!/usr/bin/env python3
"""How long rebuilds take: with no source change (layer cache) and after a small change (compiler cache).

Runs `podllama build` three times in one session on this machine and writes bench/RESULTS-build.md:
  1. a warm-up build (whatever the caches hold),
  2. a rebuild with nothing changed,
  3. a rebuild after adding one line of code to a llama-server source file (restored afterwards, and the
     image of the unchanged source tagged again).
Usage: bench/build_cache.py [--variant cpu] [--native] [--base local|upstream] [--engine podman]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOUCHED = ROOT / "llama.cpp" / "tools" / "server" / "server-http.cpp"


def build(args: argparse.Namespace) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "podllama.cli", "build", "--variant", args.variant, "--engine", args.engine,
           "--base", args.base, "--ui", "off", "--json", "--no-smoke"] + (["--native"] if args.native else [])
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"build failed:\n{proc.stderr}")
    return seconds, json.loads(proc.stdout)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="cpu")
    p.add_argument("--native", action="store_true")
    p.add_argument("--base", default="local")
    p.add_argument("--engine", default="podman")
    args = p.parse_args()

    warm, first = build(args)
    same, second = build(args)
    original = TOUCHED.read_text()
    try:
        # a real code change (a new symbol), so the file compiles again: a comment alone is a ccache hit
        TOUCHED.write_text(original + f"\n[[maybe_unused]] static const long podllama_bench_marker = {int(time.time())};\n")
        small, third = build(args)
    finally:
        TOUCHED.write_text(original)
        build(args)  # back to the image of the unchanged source (a cache hit), so the tags are as they were
    rows = [("warm-up build (caches as found)", warm, first["image_id"]),
            ("rebuild, no change", same, second["image_id"]),
            (f"rebuild after a one-line code change in {TOUCHED.relative_to(ROOT)}", small, third["image_id"])]
    lines = [
        "# Rebuild times",
        "",
        f"`bench/build_cache.py --variant {args.variant}{' --native' if args.native else ''} --base {args.base} "
        f"--engine {args.engine}`, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
        f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores. "
        "Smoke tests off, so the numbers are the builds alone.",
        "",
        "| build | seconds | image |",
        "|---|---|---|",
        *[f"| {name} | {secs:.1f} | {image[:12]} |" for name, secs, image in rows],
        "",
        f"Same image id for the no-change rebuild: {first['image_id'] == second['image_id']}.",
    ]
    out = ROOT / "bench" / "RESULTS-build.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
