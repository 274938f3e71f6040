"""A remote server: a llama-server container podllama did not start (as one on another machine would be),
routed to and health-checked by a real stack's gateway, with its own key."""

from __future__ import annotations

import httpx

from tests.helpers import stack_name, wait_until
from tests.integration.conftest import StackFiles, free_port

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


def test_a_server_podllama_did_not_start_is_routed_and_health_checked(podman, cpu_image, models_dir, run_server,
                                                                        tmp_path):
    far = run_server(podman, cpu_image, "--api-key", "sk-far-away", "--alias", "far-model")
    assert httpx.get(f"{far.url}/v1/models", timeout=10).status_code == 401  # it wants its key
    (tmp_path / "far.key").write_text("sk-far-away\n")
    sf = StackFiles(tmp_path, stack_name("ptremote"), podman, models_dir, free_port()).write(f"""
[servers.chat]
model = "tiny.gguf"
alias = "tiny-chat"
ctx_size = 1024

[servers.far]
url = "{far.url}"
alias = "far-model"
api_key_file = "far.key"
""")
    sf.run("start")
    url = f"http://127.0.0.1:{sf.port}"
    try:
        rows = {r["server"]: r for r in sf.status()["servers"]}
        assert rows["far"]["state"] == "remote" and rows["far"]["health"] == "ok"
        assert podman.inspect(f"{sf.name}-far-1") is None  # nothing started for it
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"model": "far-model"}, timeout=60)
        assert r.status_code == 200 and r.headers["x-podllama-server"] == "far"
        assert r.json()["model"] == "far-model"  # llama-server's own alias: the remote answered
        local = httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"model": "tiny-chat"}, timeout=60)
        assert local.headers["x-podllama-server"] == "chat"
        models = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
        assert models["far-model"]["status"]["value"] == "loaded"
        podman.stop(far.name)  # the other machine goes away
        assert wait_until(lambda: httpx.get(f"{url}/v1/models", timeout=10).json()["data"][1]["status"]["value"]
                          == "unloaded", 15)
        gone = httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"model": "far-model"}, timeout=60)
        assert gone.status_code == 503 and far.url in gone.json()["error"]["message"]
        assert {r["server"]: r for r in sf.status()["servers"]}["far"]["health"] == "down"
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"model": "tiny-chat"}, timeout=60).status_code == 200
        assert podman.inspect(far.name) is not None and not podman.inspect(far.name).running  # not restarted
    finally:
        sf.run("down", check=False)
    assert podman.inspect(far.name) is not None  # `down` leaves what it did not start
