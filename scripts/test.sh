#!/usr/bin/env bash
# Run podllama's tests: unit tests, and integration tests with real llama-server containers on Podman and
# Docker. Sets up what is missing first (scripts/setup.sh --with-docker). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-docker
exec .venv/bin/python -m pytest "$@"
