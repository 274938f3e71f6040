#!/usr/bin/env python3
"""How long each server kind's image takes to build: cold (`podllama build --fresh`: no cached layer, every
object compiled again) and cached (the same build again, nothing changed), side by side in one run.

The pinned source archives and the base images are already here (downloading them is not building). Smoke tests
are off, so the numbers are the builds alone. Writes bench/RESULTS-build-kinds.md and results-build-kinds.json.
Usage: bench/build_kinds.py [--kinds llama,whisper,sd,speech] [--base local|upstream] [--engine podman]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(kind: str, args: argparse.Namespace, fresh: bool) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "podllama.cli", "build", "--kind", kind, "--variant", "cpu", "--native",
           "--engine", args.engine, "--base", args.base, "--no-smoke", "--json"] + (["--fresh"] if fresh else [])
    if kind == "llama":
        cmd += ["--ui", "off"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"{kind} build failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout)["image_id"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", default="llama,whisper,sd,speech")
    p.add_argument("--base", default="local")
    p.add_argument("--engine", default="podman")
    args = p.parse_args()

    rows = []
    for kind in args.kinds.split(","):
        _, warm_id = build(kind, args, fresh=False)  # sources unpacked, base images present: what is left is building
        cold, cold_id = build(kind, args, fresh=True)
        cached, cached_id = build(kind, args, fresh=False)
        # the cached build reuses the layers of the same build before (a fresh build's are its own)
        rows.append({"kind": kind, "cold_s": round(cold, 1), "cached_s": round(cached, 1),
                     "ratio": round(cold / cached, 1), "cached_reused": cached_id == warm_id,
                     "cold_was_new": cold_id != warm_id})
        print(rows[-1], flush=True)
    lines = [
        "# Build times per server kind: cold and cached",
        "",
        f"`bench/build_kinds.py --kinds {args.kinds} --base {args.base} --engine {args.engine}`, "
        f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores. cpu variant, native CPU target, "
        "smoke tests off. Cold: `podllama build --fresh` (no cached layer, every object compiled again); cached: "
        "the same build right after (nothing changed). Sources and base images were already downloaded.",
        "",
        "| kind | cold (s) | cached (s) | cold / cached | cold built a new image | cached reused the image |",
        "|---|---|---|---|---|---|",
        *[f"| {r['kind']} | {r['cold_s']} | {r['cached_s']} | {r['ratio']}× | {r['cold_was_new']} | "
          f"{r['cached_reused']} |" for r in rows],
        "",
        f"All kinds cold: {sum(r['cold_s'] for r in rows):.0f} s; cached: {sum(r['cached_s'] for r in rows):.0f} s.",
    ]
    (ROOT / "bench" / "RESULTS-build-kinds.md").write_text("\n".join(lines) + "\n")
    (ROOT / "bench" / "results-build-kinds.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
