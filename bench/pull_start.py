#!/usr/bin/env python3
"""A stack started on an empty machine from a registry that holds its images: how long to the first token.

What a team with CI gets on a new machine (issue 22's target: under 2 minutes). In one run, here:
  1. a registry on a loopback port (the distribution's `docker-registry`, storing in a temporary directory);
  2. "CI": `podllama build --variant cpu --native --push REGISTRY/team/llama-server` from this machine's Podman
     (the image is already built here, so this is the smoke test and the push), which writes images.lock; the
     Debian base pushed beside it (on a connected machine that is Docker Hub's); and, with --gateway,
     `podllama build --kind gateway --engine docker --push REGISTRY/team/gateway` on a Docker daemon of its own,
     which is then removed with everything it stored;
  3. "the new machine": a Docker daemon of its own with an empty data root (its own socket; nothing of this
     machine's engines is touched), the default stack's services.toml with `[build] from = "pull"` (so a compile
     would be an error, not a slow success) and the base from that registry, CI's images.lock beside it, and the
     model already in the models directory (fetching a model is the hub's time, not podllama's);
  4. `podllama start`, then `podllama run` until the first answer. The clock runs from `start` to that answer.
Writes bench/RESULTS-pull-start.md and bench/results-pull-start.json (every run kept).
Usage (as root): bench/pull_start.py [--gateway] [--models DIR]   (default: ./models, with the quick start's
                 fallback model; --gateway: CI pushes the gateway image too, so the new machine builds nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results-pull-start.json"
PODLLAMA = [sys.executable, "-m", "podllama.cli"]
BASE = "localhost/podllama-base:bookworm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    sys.exit(f"{what} did not happen within {deadline_s:.0f} s")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def dockerd(directory: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """A Docker daemon storing in DIRECTORY alone, on a socket of its own; and the environment that points the
    docker CLI (and podllama) at it."""
    directory.mkdir(parents=True)
    sock = directory / "docker.sock"
    proc = subprocess.Popen(["dockerd", "--data-root", str(directory / "data"), "--exec-root", str(directory / "exec"),
                             "--pidfile", str(directory / "docker.pid"), "-H", f"unix://{sock}"],
                            stdout=open(directory.parent / f"{directory.name}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    env = os.environ | {"DOCKER_HOST": f"unix://{sock}"}
    wait_for(f"dockerd in {directory}",
             lambda: subprocess.run(["docker", "version"], env=env, capture_output=True).returncode == 0, 60)
    return proc, env


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def stamped(cmd: list[str], env: dict[str, str], log: list[tuple[float, str]], t0: float) -> int:
    """Run CMD, keeping each line it prints with the seconds since T0 when it came."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append((time.monotonic() - t0, re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip())))
        print(f"{log[-1][0]:6.1f}  {log[-1][1]}", flush=True)
    return proc.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", type=Path, default=ROOT / "models")
    p.add_argument("--gateway", action="store_true", help="CI pushes the gateway image too")
    args = p.parse_args()
    if not (args.models / "SmolLM2-135M-Instruct.Q4_1.gguf").exists():
        sys.exit(f"{args.models} lacks SmolLM2-135M-Instruct.Q4_1.gguf (scripts/quickstart.sh puts it there)")
    work = Path(tempfile.mkdtemp(prefix="podllama-pullstart-", dir="/var/tmp"))
    procs: list[subprocess.Popen] = []
    try:
        # 1. the registry
        port = free_port()
        registry = f"127.0.0.1:{port}"
        (work / "registry.yml").write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {work / 'blobs'}\n"
                                           f"http:\n  addr: {registry}\n")
        procs.append(subprocess.Popen(["docker-registry", "serve", str(work / "registry.yml")],
                                      stdout=open(work / "registry.log", "w"), stderr=subprocess.STDOUT))
        wait_for("the registry", lambda: answers(f"http://{registry}/v2/"), 30)

        # 2. CI: the server image pushed and locked, the gateway's base beside it
        ci = work / "ci"
        ci.mkdir()
        (ci / "services.toml").write_text('[build]\nbase = "local"\n')
        pushed = subprocess.run([*PODLLAMA, "build", "--variant", "cpu", "--native", "--push",
                                 f"{registry}/team/llama-server", "--no-tls-verify", "--json", "-c",
                                 str(ci / "services.toml")], cwd=ROOT, capture_output=True, text=True)
        if pushed.returncode != 0:
            sys.exit(f"CI's push failed:\n{pushed.stderr[-3000:]}")
        base = f"{registry}/library/debian:bookworm-slim"
        subprocess.run(["podman", "push", "-q", "--tls-verify=false", BASE, base], check=True)

        if args.gateway:  # CI's gateway image for Docker, made on a daemon that is gone before the clock starts
            daemon, env = dockerd(work / "ci-docker")
            made = subprocess.run([*PODLLAMA, "build", "--kind", "gateway", "--engine", "docker", "--base", base,
                                   "--push", f"{registry}/team/gateway", "--json", "-c", str(ci / "services.toml")],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            stop(daemon)
            shutil.rmtree(work / "ci-docker")
            if made.returncode != 0:
                sys.exit(f"CI's gateway push failed:\n{made.stderr[-3000:]}")

        # 3. the new machine: a Docker daemon with nothing in it
        machine = work / "machine"
        daemon, env = dockerd(machine / "docker")
        procs.append(daemon)
        images = subprocess.run(["docker", "images", "-q"], env=env, capture_output=True, text=True).stdout.split()
        assert images == [], images
        gateway = free_port()
        config = (ROOT / "services.toml").read_text()
        config = config.replace('engine = "auto"', 'engine = "docker"').replace('variant = "auto"', 'variant = "cpu"')
        config = config.replace('models_dir = "./models"', f'models_dir = "{args.models.resolve()}"')
        config = config.replace('base = "auto"', f'base = "{base}"\nfrom = "pull"')
        config = config.replace('name = "podllama"', 'name = "pullstart"').replace("port = 8080", f"port = {gateway}")
        (machine / "services.toml").write_text(config)
        shutil.copy(ci / "images.lock", machine / "images.lock")

        # 4. start, then ask until the first answer
        log: list[tuple[float, str]] = []
        cfg = ["-c", str(machine / "services.toml")]
        t0 = time.monotonic()
        if stamped([*PODLLAMA, "start", *cfg], env, log, t0) != 0:
            sys.exit("podllama start failed (above)")
        started = time.monotonic() - t0
        answer = subprocess.run([*PODLLAMA, "run", *cfg, "--max-tokens", "16", "What is the capital of Germany?"],
                                cwd=ROOT, env=env, capture_output=True, text=True)
        first_token = time.monotonic() - t0
        if answer.returncode != 0:
            sys.exit(f"no answer:\n{answer.stderr[-2000:]}")
        text = "\n".join(line for _, line in log)
        compiled = "objects compiled" in text or "building, CPU target" in text
        row = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()}, {os.cpu_count()} cores",
               "gateway_pushed": args.gateway, "gateway_built": "building the gateway image" in text,
               "start_s": round(started, 1), "first_token_s": round(first_token, 1), "compiled": compiled,
               "pulled": "instead of compiling" in text, "answer": answer.stdout.strip()[:80],
               "steps": [[round(t, 1), line.strip()] for t, line in log if line.startswith("==>")]}
        subprocess.run([*PODLLAMA, "down", *cfg], cwd=ROOT, env=env, capture_output=True)
    finally:
        for proc in reversed(procs):
            stop(proc)
        subprocess.run(["podman", "rmi", "-f", base if "base" in locals() else "none"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    runs.append(row)
    RESULTS.write_text(json.dumps(runs, indent=1) + "\n")
    (ROOT / "bench" / "RESULTS-pull-start.md").write_text(report(runs))
    print(report(runs))
    if compiled or not row["pulled"] or (args.gateway and row["gateway_built"]):
        sys.exit("the new machine compiled or built instead of pulling")


def report(runs: list[dict]) -> str:
    latest = runs[-1]
    lines = [
        "# A stack started from a registry that holds its images",
        "",
        "`sudo bench/pull_start.py [--gateway]`: a registry on a loopback port holds the CPU llama-server image CI "
        "pushed (`podllama build --push`, recorded in images.lock), the Debian base, and with `--gateway` the gateway "
        "image for Docker (`podllama build --kind gateway --push`); a Docker daemon with an empty data "
        "root plays the new machine; the default stack's services.toml there with `[build] from = \"pull\"` and "
        "CI's images.lock. Clock: from `podllama start` to the first answer of `podllama run` (the model already "
        "in the models directory). Every run is kept in `results-pull-start.json`.",
        "",
        "Target: first token in under 2 minutes.",
        "",
        "| run | machine | gateway image | `start` done | first answer | compiled anything |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        gateway = "pulled (CI pushed it)" if r.get("gateway_pushed") else "built on the new machine"
        lines.append(f"| {r['date']} | {r['machine']} | {gateway} | {r['start_s']:.0f} s | "
                     f"**{r['first_token_s']:.0f} s** | {'yes' if r['compiled'] else 'no'} |")
    lines += ["", "Steps of the latest run (seconds from `start`):", "", "| at | step |", "|---|---|"]
    lines += [f"| {t:.0f} s | {step.removeprefix('==> ')} |" for t, step in latest["steps"]]
    lines += ["", f"Its answer: {latest['answer']!r}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
