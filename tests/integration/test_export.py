"""`podllama export` run for real: the Kubernetes manifests played by `podman kube play`, the compose file by
podman-compose; the exported gateway (no engine socket, servers found by DNS) answers chat and embeddings, and
waits for a server the orchestrator brings back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.helpers import get_ok, stack_name, wait_until
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


def answers(url: str) -> None:
    """Chat through the gateway (each chat replica in turn) and embeddings."""
    assert wait_until(lambda: get_ok(f"{url}/health", timeout=5), 90), "the exported gateway never answered"
    for _ in range(4):
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
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
