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
python3 - "$log" "$t0" "$t1" "$t2" "$t3" "$first_token" "$here/bench" <<'EOF'
import json, os, platform, re, sys, time
log, t0, t1, t2, t3, first, bench = sys.argv[1], *map(float, sys.argv[2:7]), sys.argv[7]
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
# every run is kept: the README states the range over runs, not one lucky figure
store = os.path.join(bench, "results-firstrun.json")
runs = json.load(open(store)) if os.path.exists(store) else []
runs.append({"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "cores": os.cpu_count(),
             "first_token_s": round(first - t0, 1), "total_s": round(t1 - t0, 1), "second_run_s": round(t3 - t2, 1),
             "steps": [[s, round(d, 1)] for s, d in steps]})
json.dump(runs, open(store, "w"), indent=1)
def fmt(d):
    return f"{d / 60:.1f} min" if d >= 60 else f"{d:.0f} s"
table = "\n".join(f"| {r['date']} | {r['host']}, {r['cores']} cores | **{fmt(r['first_token_s'])}** | {fmt(r['total_s'])} "
                  f"| {fmt(r['second_run_s'])} |" for r in runs)
firsts = [r["first_token_s"] for r in runs]
seconds = [r["second_run_s"] for r in runs]
rows = "\n".join(f"| {s} | {fmt(d)} |" for s, d in runs[-1]["steps"])
text = f"""# First run

`sudo bench/firstrun.sh --wipe`: a fresh clone after removing Podman, Docker, their storage, the compiler cache and
podllama's caches (Debian packages other than the engines, and Python itself, stay). Then the README's first
command, `sudo scripts/quickstart.sh`, twice. No container registry and no Hugging Face hub can be reached here:
the offline paths are what was measured (llama.cpp from the package index, a bootstrapped Debian base, the
fallback model). Every run is kept in `results-firstrun.json`.

**Over {len(runs)} runs: first token {fmt(min(firsts))} to {fmt(max(firsts))} cold; a second run
{fmt(min(seconds))} to {fmt(max(seconds))}.**

| run | machine | first run, to the first token | first run, in all | second run (stack up again, one answer) |
|---|---|---|---|---|
{table}

Goal on 2 cores: ≤ 15 minutes to the first token cold, ≤ 1 minute for a second run.

Steps of the latest first run (the lines scripts print as they begin each step):

| step | time |
|---|---|
{rows}
"""
open(os.path.join(bench, "RESULTS-firstrun.md"), "w").write(text)
print(text)
EOF
echo "logs in $work"
