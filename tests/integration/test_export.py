"""`podllama export` run for real: the Kubernetes manifests played by `podman kube play`, the compose file by
podman-compose, the Quadlet units checked by Podman's generator and run by systemd (in a container with
systemd and Podman 5); the exported gateway (no engine socket, servers found by DNS) answers chat and
embeddings, and waits for a server the orchestrator brings back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.helpers import get_ok, stack_name, unit_file, wait_until
from tests.integration.conftest import StackFiles, free_port

SERVERS = """
[servers.chat]
model = "tiny.gguf"
alias = "tiny-chat"
ctx_size = 1024
replicas = 2

[servers.embed_x]
role = "embedding"
model = "tiny.gguf"
alias = "tiny-embed"
ctx_size = 512
args = { pooling = "mean" }
"""
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@pytest.fixture
def stack(podman, cpu_image, models_dir, tmp_path):
    return StackFiles(tmp_path, stack_name("ptexp"), podman, models_dir, free_port()).write(SERVERS)


def answers(url: str, chat_model: str = "tiny-chat") -> None:
    """Chat through the gateway (each chat replica in turn) and embeddings."""
    assert wait_until(lambda: get_ok(f"{url}/health", timeout=5), 90), "the exported gateway never answered"
    for _ in range(4):
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"model": chat_model}, timeout=60)
        assert r.status_code == 200 and r.headers["x-podllama-server"] == "chat", r.text
    emb = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-embed", "input": "hello"}, timeout=60)
    assert emb.status_code == 200 and len(emb.json()["data"][0]["embedding"]) == 64, emb.text


def test_kube_export_validates_and_runs_under_podman_kube_play(stack, podman, tmp_path):
    out = tmp_path / "kube"
    stack.run("export", "kube", "--for", "podman", "-o", str(out))
    manifest = out / "podllama.yaml"
    for doc in yaml.safe_load_all(manifest.read_text()):
        kubernetes_validate.validate(doc, "1.31", strict=True)
    k8s = tmp_path / "k8s"
    stack.run("export", "kube", "-o", str(k8s))  # the Kubernetes flavour (Secret) validates too
    for doc in yaml.safe_load_all((k8s / "podllama.yaml").read_text()):
        kubernetes_validate.validate(doc, "1.31", strict=True)
    net = f"ptexp-{uuid.uuid4().hex[:6]}"
    subprocess.run(["podman", "network", "create", net], check=True, capture_output=True)
    try:
        play = subprocess.run(["podman", "kube", "play", "--network", net, str(manifest)], capture_output=True, text=True)
        assert play.returncode == 0, play.stderr
        url = f"http://127.0.0.1:{stack.port}"
        answers(url)
        admin = {"Authorization": "Bearer " + (out / "gateway/state/secrets/admin.key").read_text().strip()}
        status = httpx.get(f"{url}/admin/status", headers=admin, timeout=10).json()
        assert sorted(s["server"] for s in status["servers"]) == ["chat", "chat", "embed_x"]  # both replicas found
        assert httpx.get(f"{url}/admin/status", timeout=10).status_code == 401
        # the orchestrator restarts a killed server; a request meanwhile waits for it instead of failing
        embed = podman.inspect("embed-x-pod-0-server")
        assert embed is not None and embed.pid
        os.kill(embed.pid, signal.SIGKILL)  # a crash: the restart policy brings it back
        emb = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-embed", "input": "again"}, timeout=120)
        assert emb.status_code == 200, emb.text
        gateway = podman.inspect(f"{stack.name.replace('_', '-')}-gateway-pod-0-gateway")
        assert gateway is not None and not any("sock" in m.get("Destination", "")
                                               for m in gateway.raw.get("Mounts", []))
    finally:
        subprocess.run(["podman", "kube", "down", str(manifest)], capture_output=True)
        subprocess.run(["podman", "network", "rm", "-f", net], capture_output=True)
        # Podman 4.3's kube down leaves the volume it made for the ConfigMap
        subprocess.run(["podman", "volume", "rm", "-f", f"{stack.name}-config"], capture_output=True)
    assert not [p for p in podman_pods() if p.startswith(("chat-pod", "embed-x-pod"))]


def podman_pods() -> list[str]:
    return subprocess.run(["podman", "pod", "ps", "--format", "{{.Name}}"], capture_output=True,
                          text=True).stdout.split()


def test_compose_export_runs_under_podman_compose(stack, tmp_path):
    out = tmp_path / "compose"
    stack.run("export", "compose", "-o", str(out))
    compose = [str(Path(sys.executable).parent / "podman-compose"), "-f", str(out / "compose.yaml")]
    env = os.environ | {"COMPOSE_PROJECT_NAME": stack.name}
    try:
        up = subprocess.run([*compose, "up", "-d"], capture_output=True, text=True, cwd=out, env=env)
        assert up.returncode == 0, up.stderr
        answers(f"http://127.0.0.1:{stack.port}")
        inspect = subprocess.run(["podman", "inspect", f"{stack.name}_chat_1", "--format",
                                  "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.Config.User}}"],
                                 capture_output=True, text=True).stdout
        assert inspect.startswith("true") and "CAP_SYS_ADMIN" not in inspect
    finally:
        subprocess.run([*compose, "down"], capture_output=True, cwd=out, env=env)


SYSTEMD_HOST = Path(__file__).with_name("systemd-podman.Containerfile")
# an alias holding what systemd would expand in ExecStart (% specifiers, $VARIABLES), and a quote
LITERAL_ALIAS = 'tiny-chat 100%n ${PATH} "x"'
RELAY_PORT = 9000  # in the systemd container: a relay to the gateway's port there, published to this host


@pytest.fixture(scope="module")
def systemd_host(podman, trixie_base) -> str:
    """The image of a machine with systemd and Podman 5 (Quadlet), tagged by what built it."""
    recipe = SYSTEMD_HOST.read_bytes()
    tag = f"localhost/podllama-test/systemd-podman:{hashlib.sha256(recipe + trixie_base.encode()).hexdigest()[:12]}"
    if not podman.image_exists(tag):
        subprocess.run(["podman", "build", "-q", "--build-arg", f"BASE={trixie_base}", "-t", tag, "-f",
                        str(SYSTEMD_HOST), str(SYSTEMD_HOST.parent)], check=True, capture_output=True)
    return tag


def test_quadlet_units_pass_podmans_generator_and_run_under_systemd(podman, cpu_image, models_dir, tmp_path,
                                                                   systemd_host):
    stack = StackFiles(tmp_path, stack_name("ptq"), podman, models_dir, free_port()).write(
        SERVERS.replace('alias = "tiny-chat"', f"alias = {json.dumps(LITERAL_ALIAS)}"))
    out = tmp_path / "quadlet-export"
    stack.run("export", "quadlet", "-o", str(out))
    units = out / "quadlet"
    part = stack.name.replace("_", "-")
    # Podman's generator, dry run: every key known (an unknown one fails it), a service per unit
    dry = subprocess.run(["podman", "run", "--rm", "-e", f"QUADLET_UNIT_DIRS={units}", "-v", f"{units}:{units}:ro",
                          systemd_host, "/usr/libexec/podman/quadlet", "-dryrun"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    services = {line.strip("-") for line in dry.stdout.splitlines() if line.startswith("---")}
    assert services == {f"{part}{s}.service" for s in ("-chat-1", "-chat-2", "-embed-x", "-gateway", "-network",
                                                        "-servers-network")}
    assert "Warning" not in dry.stderr, dry.stderr  # e.g. an image name that is not fully qualified
    # and for real: systemd (PID 1 of a container of its own) runs them with the same generator
    box, store, port = f"{part}-systemd", tmp_path / "store", free_port()
    store.mkdir()
    images = sorted({v for unit in ("gateway", "chat-1") for _, k, v in unit_file(units / f"{part}-{unit}.container")
                     if k == "Image"})
    try:
        subprocess.run(["podman", "run", "-d", "--name", box, "--privileged", "--systemd=always",
                        "-v", f"{store}:/var/lib/containers", "-v", f"{out}:{out}", "-v", f"{models_dir}:{models_dir}:ro",
                        "-p", f"127.0.0.1:{port}:{RELAY_PORT}", systemd_host,
                        "/sbin/init", "SYSTEMD_CGROUP_ENABLE_LEGACY_FORCE=1"],  # systemd 257 on a cgroup v1 host
                       check=True, capture_output=True)
        save = subprocess.Popen(["podman", "save", "--multi-image-archive", *images], stdout=subprocess.PIPE)
        load = subprocess.run(["podman", "exec", "-i", box, "podman", "load"], stdin=save.stdout, capture_output=True,
                              text=True)
        assert save.wait() == 0 and load.returncode == 0, load.stderr

        def inside(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["podman", "exec", box, *argv], capture_output=True, text=True, timeout=300)

        assert wait_until(lambda: inside("systemctl", "is-system-running").stdout.strip() in ("running", "degraded"), 60)
        start = inside("sh", "-c", f"cp {units}/* /etc/containers/systemd/ && systemctl daemon-reload && "
                                   f"systemctl start {part}-gateway.service")
        assert start.returncode == 0, start.stderr + inside("journalctl", "-n", "40", "--no-pager").stdout
        inside("systemd-run", "--unit=relay", "socat", f"TCP-LISTEN:{RELAY_PORT},fork,reuseaddr",
               f"TCP:127.0.0.1:{stack.port}")
        url = f"http://127.0.0.1:{port}"
        answers(url, chat_model=LITERAL_ALIAS)  # routed by the alias, which reached llama-server as written:
        cmd = json.loads(inside("podman", "inspect", f"{part}-chat-1", "--format", "{{json .Config.Cmd}}").stdout)
        assert cmd[cmd.index("--alias") + 1] == LITERAL_ALIAS
        hardening = inside("podman", "inspect", f"{part}-chat-1", "--format",
                           "{{.HostConfig.ReadonlyRootfs}} {{.Config.User}} {{.EffectiveCaps}}").stdout.split()
        assert hardening == ["true", "10001", "[]"]  # as `start` runs it: read-only, no capabilities
        # systemd restarts a server that dies; the gateway waits for it meanwhile
        assert inside("podman", "kill", "--signal", "KILL", f"{part}-embed-x").returncode == 0
        emb = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-embed", "input": "again"}, timeout=180)
        assert emb.status_code == 200, emb.text
        restarts = inside("systemctl", "show", "-p", "NRestarts", "--value", f"{part}-embed-x.service").stdout
        assert int(restarts) >= 1
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", box], capture_output=True)
        shutil.rmtree(store, ignore_errors=True)
