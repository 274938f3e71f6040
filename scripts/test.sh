#!/usr/bin/env bash
# Run podllama's checks and tests, cheapest first:
#   1. ruff and mypy (strict for the gateway)
#   2. the fast tier, tests/unit: parsers, planner, gateway and client against a scripted upstream; no
#      containers, under a minute
#   3. the integration tier, tests/integration: real llama-server containers on Podman and Docker
# Sets up what is missing first (scripts/setup.sh --for-tests).
#
#   scripts/test.sh              everything
#   scripts/test.sh --fast       1 and 2 only (no container engine needed once set up)
#   scripts/test.sh -k NAME …    extra arguments go to pytest in both tiers
set -euo pipefail
cd "$(dirname "$0")/.."

fast=0
args=()
for arg in "$@"; do
  if [ "$arg" = --fast ]; then fast=1; else args+=("$arg"); fi
done
# with a selection (-k …), a tier where nothing matches is fine; without one it never is
selected=0
[ ${#args[@]} -gt 0 ] && selected=1

tier() {
  local rc=0
  .venv/bin/python -m pytest "$@" || rc=$?
  if [ "$rc" = 5 ] && [ "$selected" = 1 ]; then rc=0; fi
  return "$rc"
}

if [ "$fast" = 1 ] && [ -x .venv/bin/python ] && [ -f llama.cpp/models/ggml-vocab-llama-spm.gguf ]; then
  :  # the fast tier needs only the Python environment and the llama.cpp tree
else
  scripts/setup.sh --for-tests
fi
echo "==> ruff, mypy"
.venv/bin/ruff check src tests bench
.venv/bin/mypy
echo "==> fast tier (tests/unit)"
# four workers: most of these tests wait on sockets and timers, not on the two cores
tier tests/unit -n 4 "${args[@]}"
[ "$fast" = 1 ] && exit 0
echo "==> integration tier (tests/integration)"
tier tests/integration "${args[@]}"
