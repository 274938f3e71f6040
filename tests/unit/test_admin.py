"""The management API in-process: typed bodies refuse hostile values before any work starts, and the gateway
follows its config and keys as they change on disk."""

from __future__ import annotations

import time

import pytest

from podllama.access.credentials import Credentials
from tests.helpers import wait_until

CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}


@pytest.mark.parametrize("path, body, word", [
    ("/admin/jobs/update", {"remote": "--upload-pack=touch /tmp/podllama-pwned;false", "ref": "."}, "remote"),
    ("/admin/jobs/update", {"ref": "--output=/tmp/podllama-pwned"}, "ref"),
    ("/admin/jobs/update", {"ref": "HEAD", "branch": "x"}, "branch"),
    ("/admin/jobs/rebuild", {"variant": "cpu; rm -rf /"}, "variant"),
    ("/admin/models/pull", {"ref": "org/repo", "revision": "../../etc"}, "revision"),
    ("/admin/models/pull", {"ref": "--help"}, "ref"),
])
def test_hostile_job_bodies_are_refused_before_any_job_starts(gateway, path, body, word):
    gw = gateway()
    r = gw.post(path, json=body, headers=gw.admin)
    assert r.status_code == 422 and word in r.json()["error"]["message"], r.text
    assert gw.get("/admin/jobs", headers=gw.admin).json() == []


def test_a_removed_server_disappears_from_routing(gateway):
    gw = gateway()
    assert {m["server"] for m in gw.get("/v1/models").json()["data"]} == {"chat", "embed"}
    text = gw.cfg_path.read_text()
    gw.cfg_path.write_text(text[:text.index("[servers.embed]")])
    assert wait_until(lambda: {m["server"] for m in gw.get("/v1/models").json()["data"]} == {"chat"}, 5)
    r = gw.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 501 and "role 'embedding'" in r.json()["error"]["message"]


def test_reload_now_and_an_invalid_edit_keeps_the_running_config(gateway):
    gw = gateway()
    gw.cfg_path.write_text(gw.cfg_path.read_text().replace('alias = "tiny-chat"', 'alias = "renamed"'))
    now = gw.post("/admin/reload", headers=gw.admin).json()
    assert now["error"] is None and now["servers"] == ["chat", "embed"]
    assert "renamed" in {m["id"] for m in gw.get("/v1/models").json()["data"]}
    gw.cfg_path.write_text(gw.cfg_path.read_text() + "\n[servers.bad]\nrole = \"juggler\"\nmodel = \"x.gguf\"\n")
    broken = gw.post("/admin/reload", headers=gw.admin).json()
    assert "servers.bad.role" in broken["error"]
    assert gw.post("/v1/chat/completions", json=CHAT | {"model": "renamed"}).status_code == 200


def test_key_files_and_keys_given_to_start_are_followed(gateway, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("")
    gw = gateway('api_keys_file = "keys.txt"')
    assert gw.post("/v1/chat/completions", json=CHAT).status_code == 200  # the file is empty: no key needed
    keys.write_text("sk-from-file\n")
    assert wait_until(lambda: gw.post("/v1/chat/completions", json=CHAT).status_code == 401, 5)
    assert gw.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-from-file"}).status_code == 200
    time.sleep(0.01)  # a later mtime for the next file
    Credentials(gw.cfg_path.parent / ".podllama").capture_env({"PODLLAMA_API_KEYS": "sk-env-1, sk-env-2"})
    assert wait_until(lambda: gw.post("/v1/chat/completions", json=CHAT,
                                      headers={"Authorization": "Bearer sk-env-2"}).status_code == 200, 5)
    keys.write_text("# none\n")
    Credentials(gw.cfg_path.parent / ".podllama").capture_env({"PODLLAMA_API_KEYS": ""})
    assert wait_until(lambda: gw.post("/v1/chat/completions", json=CHAT).status_code == 200, 5)


def test_a_missing_key_file_is_reported_and_the_running_keys_kept(gateway):
    gw = gateway()
    gw.cfg_path.write_text(gw.cfg_path.read_text().replace("[gateway]", '[gateway]\napi_keys_file = "missing.txt"'))
    answer = gw.post("/admin/reload", headers=gw.admin).json()
    assert "missing.txt" in answer["error"]
    assert gw.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_unknown_servers_and_jobs_are_404(gateway):
    gw = gateway()
    assert "servers: chat, embed" in gw.get("/admin/servers/nope", headers=gw.admin).json()["error"]["message"]
    assert gw.get("/admin/jobs/123", headers=gw.admin).status_code == 404
    assert gw.post("/admin/jobs/dance", headers=gw.admin).status_code == 404
