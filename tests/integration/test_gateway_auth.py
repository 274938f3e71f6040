"""Keys: inference keys for llama-server routes, a separate admin key for /admin; /health stays public."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import stack_name
from tests.integration.conftest import StackFiles, free_port

INFERENCE, ADMIN = "sk-inference-7f3a9c", "sk-admin-51be20"


@pytest.fixture(scope="module")
def secured(podman, models_dir, cpu_image, tmp_path_factory):
    d = tmp_path_factory.mktemp("auth-stack")
    (d / "keys.txt").write_text(f"# inference keys\n{INFERENCE}\nsk-second-key\n")
    (d / "admin.key").write_text(ADMIN + "\n")
    sf = StackFiles(d, stack_name("ptauth"), podman, models_dir, free_port())
    sf.write('[servers.chat]\nmodel = "tiny.gguf"\nctx_size = 512\n',
             extra='')
    text = sf.path.read_text().replace("[gateway]\n", '[gateway]\napi_keys_file = "keys.txt"\nadmin_key_file = "admin.key"\n')
    sf.path.write_text(text)
    sf.run("start")
    sf.url = f"http://127.0.0.1:{sf.port}"
    yield sf
    sf.run("down", check=False)


CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}


def test_inference_needs_a_key(secured):
    url = secured.url
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 401
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT,
                      headers={"Authorization": f"Bearer {INFERENCE}"}).status_code == 200
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"X-Api-Key": "sk-second-key"}).status_code == 200
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/servers/chat/props").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # public


def test_the_admin_api_needs_the_admin_key(secured):
    url = secured.url
    assert httpx.get(f"{url}/admin/config").status_code == 401
    assert httpx.get(f"{url}/admin/config", headers={"Authorization": f"Bearer {INFERENCE}"}).status_code == 401
    got = httpx.get(f"{url}/admin/config", headers={"Authorization": f"Bearer {ADMIN}"})
    assert got.status_code == 200
    assert INFERENCE not in got.text and ADMIN not in got.text  # file names only, never the keys
    assert got.json()["gateway"]["api_keys_file"] == "keys.txt"


def test_keys_are_never_logged(secured, podman):
    httpx.get(f"{secured.url}/admin/config", headers={"Authorization": f"Bearer {ADMIN}"})
    httpx.post(f"{secured.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {INFERENCE}"})
    logs = "".join(podman.logs(f"{secured.name}-gateway"))
    assert INFERENCE not in logs and ADMIN not in logs


def test_help_says_which_routes_need_which_key(secured):
    items = httpx.get(f"{secured.url}/help").json()["endpoints"]
    by_path = {e["path"]: e for e in items}
    assert by_path["/v1/chat/completions"]["auth"] == "inference key"
    assert by_path["/health"]["auth"] == "public"
    assert by_path["/admin/config"]["auth"] == "admin key"
