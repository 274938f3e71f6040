#!/usr/bin/env python3
"""The GPU images, built here without a GPU: how long each takes for one architecture, cold and cached, and what
their checks said.

For each variant (cuda, rocm) and server kind (llama-server; whisper and sd have CUDA images too)
`podllama build --kind K --variant V --base local --native` with one GPU architecture (a services.toml in a
temporary directory sets it):
  cold    `--fresh`: no cached layer, every object compiled again; with the smoke test and the variant's checks
          (the server answers on the CPU with no GPU here; for CUDA the kernels the backend holds, and every
          library resolving but the driver's),
  cached  (llama-server) after a one-line code change in one of its source files (the compiler cache holds
          everything else), then the file restored and the unchanged image tagged again.
The toolkit images (containers/toolkits.lock) and the Debian bases must be there already (a first build makes the
toolkit images; `podllama base-image --suite bookworm|forky` the bases). Writes bench/RESULTS-gpu-builds.md and
bench/results-gpu-builds.json, keeping the rows of variants not run this time.
Usage: bench/gpu_builds.py [--variants cuda,rocm] [--kinds llama,whisper,sd] [--cuda 90] [--rocm gfx1100]
                           [--phases cold,cached]
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
TOUCHED = ROOT / "llama.cpp" / "tools" / "server" / "server-http.cpp"
RESULTS = ROOT / "bench" / "results-gpu-builds.json"


def build(kind: str, variant: str, config: Path, *extra: str) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "podllama.cli", "build", "--kind", kind, "--variant", variant, "--config",
           str(config), "--base", "local", "--native", "--json", *extra] + (["--ui", "off"] if kind == "llama" else [])
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"{kind} {variant} build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout)


def image_size(image: str) -> int:
    out = subprocess.run(["podman", "image", "inspect", image, "--format", "{{.Size}}"], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def run(kind: str, variant: str, arch: str, phases: list[str]) -> dict:
    row: dict = {"kind": kind, "variant": variant, "architecture": arch, "date": time.strftime("%Y-%m-%d"),
                 "machine": f"{platform.node()}, {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "services.toml"
        key = "cuda_architectures" if variant == "cuda" else "rocm_targets"
        config.write_text(f'[build]\nbase = "local"\n{key} = ["{arch}"]\n')
        if "cold" in phases:
            row["cold_s"], result = build(kind, variant, config, "--fresh")
            row["image_id"], row["smoke"] = result["image_id"], result.get("smoke", {})
            row["image_mb"] = round(image_size(result["image_id"]) / 2**20)
        if "cached" in phases and kind == "llama":
            original = TOUCHED.read_text()
            try:  # a new symbol, so the file compiles again (a comment alone would be a compiler-cache hit)
                TOUCHED.write_text(original + f"\n[[maybe_unused]] static const long podllama_bench = {int(time.time())};\n")
                row["cached_s"], _ = build(kind, variant, config, "--no-smoke")
            finally:
                TOUCHED.write_text(original)
                build(kind, variant, config, "--no-smoke")  # the unchanged source's image (a layer-cache hit) tagged again
    return row


def report(rows: list[dict]) -> str:
    lines = [
        "# GPU images built without a GPU",
        "",
        "`bench/gpu_builds.py`: `podllama build --kind K --variant V --base local --native` for one GPU architecture, "
        "on a bootstrapped Debian base with the toolkit of containers/toolkits.lock. Cold: `--fresh` (every object "
        "compiled, smoke test and checks on); cached: after a one-line change in "
        f"`{TOUCHED.relative_to(ROOT)}` (the compiler cache holds the rest; smoke test off).",
        "",
        "| kind | variant | architecture | date, machine | cold | cached | image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cold = f"{r['cold_s'] / 60:.1f} min" if "cold_s" in r else "—"
        cached = f"{r['cached_s'] / 60:.1f} min" if "cached_s" in r else "—"
        image = f"{r['image_mb']} MB" if "image_mb" in r else "—"
        lines.append(f"| {r['kind']} | {r['variant']} | {r['architecture']} | {r['date']}, {r['machine']} | {cold} | {cached} | "
                     f"{image} |")
    lines += ["", "## What the checks said", ""]
    for r in rows:
        lines += [f"### {r['kind']}, {r['variant']} ({r['architecture']})", ""]
        lines += [r["note"], ""] if r.get("note") else []
        lines += ["```json", json.dumps(r.get("smoke", {}), indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="cuda,rocm")
    p.add_argument("--kinds", default="llama", help="server kinds (whisper and sd: cuda only)")
    p.add_argument("--cuda", default="90", help="the CUDA architecture to build (90: H100)")
    p.add_argument("--rocm", default="gfx1100", help="the gfx target to build (gfx1100: RX 7900 XTX)")
    p.add_argument("--phases", default="cold,cached")
    args = p.parse_args()
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    kept = {(r.setdefault("kind", "llama"), r["variant"]): r for r in earlier}
    for kind in args.kinds.split(","):
        for variant in args.variants.split(","):
            if kind != "llama" and variant != "cuda":
                continue
            before = kept.get((kind, variant), {})
            kept[(kind, variant)] = run(kind, variant, getattr(args, variant), args.phases.split(",")) | (
                {} if "cold" in args.phases else
                {k: v for k, v in before.items() if k in ("cold_s", "image_id", "smoke", "image_mb")})
            print(json.dumps(kept[(kind, variant)]), flush=True)
    rows = sorted(kept.values(), key=lambda r: (r["kind"], r["variant"]))
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    (ROOT / "bench" / "RESULTS-gpu-builds.md").write_text(report(rows) + "\n")
    print(report(rows))


if __name__ == "__main__":
    main()
