#!/usr/bin/env bash
# A newcomer's first run, measured: a fresh clone on a machine wiped of container engines, their storage,
# podllama's caches and the compiler cache, then the README's first command (scripts/quickstart.sh), twice.
# Writes bench/RESULTS-firstrun.md with the time of each step and the time to the first token.
#
#   sudo bench/firstrun.sh --wipe     removes Podman, Docker, their images and containers, ~/.cache/podllama,
#                                     /var/tmp/buildah-cache: only on a machine you can wipe
set -euo pipefail
[ "${1:-}" = --wipe ] || { echo "this removes every container engine, image and cache here; run with --wipe" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /var/tmp/podllama-firstrun.XXXX)
log="$work/run1.log"

echo "==> wiping engines, storage and caches"
pkill -f "podman system service" || true
pkill dockerd || true
sleep 2
podman rm -af >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq podman docker.io containerd runc netavark aardvark-dns \
  catatonit debootstrap >/dev/null 2>&1 || true
rm -rf /var/lib/containers /etc/containers/containers.conf /run/podman /var/tmp/buildah-cache \
  /root/.cache/podllama /usr/local/bin/podllama
find /var/lib/docker -mindepth 1 -delete 2>/dev/null || true  # its contents: it may be a mount point
git clone -q "$here" "$work/podllama"
cd "$work/podllama"

stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done; }
echo "==> first run (cold): sudo scripts/quickstart.sh"
t0=$(date +%s.%N)
scripts/quickstart.sh 2>&1 | stamp | tee "$log"
t1=$(date +%s.%N)
echo "==> second run"
t2=$(date +%s.%N)
scripts/quickstart.sh > "$work/run2.log" 2>&1
t3=$(date +%s.%N)
first_token=$(awk '/==> asking it something/ {getline; print $1; exit}' "$log")
python3 - "$log" "$t0" "$t1" "$t2" "$t3" "$first_token" "$here/bench/RESULTS-firstrun.md" <<'EOF'
import re, sys, time, platform, os
log, t0, t1, t2, t3, first, out = sys.argv[1], *map(float, sys.argv[2:7]), sys.argv[7]
steps, current, start = [], None, t0
for line in open(log):
    ts, _, text = line.partition(" ")
    text = re.sub(r"\x1b\[[0-9;]*m", "", text.rstrip())
    if text.startswith("==> "):
        if current:
            steps.append((current, float(ts) - start))
        current, start = text[4:], float(ts)
if current:
    steps.append((current, t1 - start))
rows = "\n".join(f"| {s} | {d / 60:.1f} min |" if d >= 60 else f"| {s} | {d:.0f} s |" for s, d in steps)
text = f"""# First run

`sudo bench/firstrun.sh --wipe`, {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} cores: a fresh clone
on this machine after removing Podman, Docker, their storage, the compiler cache and podllama's caches (Debian
packages other than the engines, and Python itself, stay). Then the README's first command,
`sudo scripts/quickstart.sh`, twice. No container registry and no Hugging Face hub can be reached here: the
offline paths are what was measured (llama.cpp from the package index, a bootstrapped Debian base, the
fallback model).

| | time |
|---|---|
| first run, to the first token | **{(first - t0) / 60:.1f} min** |
| first run, in all | {(t1 - t0) / 60:.1f} min |
| second run, in all (stack up again, one answer) | **{t3 - t2:.0f} s** |

Goal on 2 cores: ≤ 15 minutes to the first token cold, ≤ 1 minute for a second run.

Steps of the first run (the lines scripts print as they begin each step):

| step | time |
|---|---|
{rows}
"""
open(out, "w").write(text)
print(text)
EOF
echo "logs in $work"
