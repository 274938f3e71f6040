"""`podllama build --push`: a real registry (the distribution's docker-registry) gets the image under its variant and
commit tags, images.lock records its digest, and an engine with an empty store pulls it by that digest and runs
it."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile

import httpx
import pytest

from podllama.engine.health import wait_healthy
from tests.helpers import get_ok, stack_name, wait_until
from tests.integration.conftest import StackFiles, free_port


@pytest.fixture
def registry(tmp_path, podman):
    """A registry on a loopback port of its own, storing in TMP_PATH; the names `build --push` gave images for it
    are taken off this engine's images afterwards."""
    port = free_port()
    conf = tmp_path / "registry.yml"
    conf.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'blobs'}\n"
                    f"http:\n  addr: 127.0.0.1:{port}\n")
    log = (tmp_path / "registry.log").open("w")
    proc = subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    assert wait_until(lambda: get_ok(f"http://127.0.0.1:{port}/v2/"), 20), (tmp_path / "registry.log").read_text()
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
    names = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                           text=True).stdout.split()
    for name in names:
        if name.startswith(f"127.0.0.1:{port}/"):
            podman.untag(name)


def test_a_pushed_image_is_recorded_pulled_back_on_an_empty_store_and_runs(podman, cpu_image, models_dir, registry,
                                                                         tmp_path):
    sf = StackFiles(tmp_path, stack_name("ptpush"), podman, models_dir, free_port()).write("")
    repo = f"{registry}/team/llama-server"
    bad = sf.run("build", "--variant", "cpu", "--push", "-bad/name", check=False)
    assert bad.returncode != 0 and "--push '-bad/name'" in bad.stderr and not (tmp_path / "images.lock").exists()
    built = json.loads(sf.run("build", "--variant", "cpu", "--native", "--push", repo, "--no-tls-verify",
                              "--json").stdout)
    commit = built["commit"][:12]
    lock = json.loads((tmp_path / "images.lock").read_text())["images"]
    entry = lock[f"{repo}:cpu-{commit}"]
    assert entry == built["pushed"] and entry["digest"].startswith("sha256:") and entry["ref"] == f"{repo}@{entry['digest']}"
    assert (entry["kind"], entry["variant"], entry["cpu_target"]) == ("llama", "cpu", "native")
    tags = httpx.get(f"http://{registry}/v2/team/llama-server/tags/list", timeout=10).json()["tags"]
    assert sorted(tags) == ["cpu", f"cpu-{commit}"]
    manifest = httpx.head(f"http://{registry}/v2/team/llama-server/manifests/cpu-{commit}", timeout=10, headers={
        "Accept": "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"})
    assert manifest.headers["docker-content-digest"] == entry["digest"]  # the lock names what the registry holds

    store = tmp_path / "store"  # another engine store, empty: nothing but what it pulls
    run_root = tempfile.mkdtemp(prefix="ptpush-", dir="/tmp")  # Podman takes at most 50 characters here
    clean = ["podman", "--root", str(store), "--runroot", run_root, "--storage-driver", "vfs"]
    assert subprocess.run([*clean, "images", "-q"], capture_output=True, text=True, check=True).stdout == ""
    subprocess.run([*clean, "pull", "--tls-verify=false", entry["ref"]], capture_output=True, check=True)
    port = free_port()
    name = f"ptpush-{port}"
    subprocess.run([*clean, "run", "-d", "--name", name, "--network", "host", "-v", f"{models_dir}:/models:ro",
                    entry["ref"], "--model", "/models/tiny.gguf", "--port", str(port), "--ctx-size", "512"],
                   capture_output=True, check=True)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", timeout=60) == "ok"
        r = httpx.post(f"http://127.0.0.1:{port}/completion", json={"prompt": "Hi", "n_predict": 2}, timeout=30)
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 2
    finally:
        subprocess.run([*clean, "rm", "-f", name], capture_output=True)
        # not `system reset`: with another root it still empties the host's network configs and locks
        subprocess.run([*clean, "rmi", "-a", "-f"], capture_output=True)
        shutil.rmtree(run_root, ignore_errors=True)


def test_start_pulls_the_image_ci_pushed_instead_of_compiling(podman, cpu_image, models_dir, registry, stack_files,
                                                             tmp_path):
    """What a team's CI pushed (`build --push`, images.lock) is what a machine's `start` runs: pulled by its digest,
    its labels checked, tagged as if built here, no compiler run. The machine's repository starts empty."""
    ci_dir = tmp_path / "ci"
    ci_dir.mkdir()
    ci = StackFiles(ci_dir, stack_name("ptci"), podman, models_dir, free_port()).write("")
    built = json.loads(ci.run("build", "--variant", "cpu", "--native", "--push", f"{registry}/team/llama-server",
                              "--no-tls-verify", "--json").stdout)
    gateway = json.loads(ci.run("build", "--kind", "gateway", "--push", f"{registry}/team/gateway", "--no-tls-verify",
                                "--json").stdout)
    assert gateway["pushed"]["kind"] == "gateway" and gateway["pushed"]["variant"] == "podman"
    podman.untag(gateway["image"])  # this "machine" has no gateway image either (the registry's tags keep it)
    sf = stack_files(podman)
    repo = f"localhost/{sf.name}/llama-server"  # nothing there: the image is missing on this "machine"
    sf.path.write_text(sf.path.read_text().replace("[build]\n", f'[build]\nrepository = "{repo}"\nfrom = "pull"\n', 1))
    try:
        refused = sf.run("start", check=False)  # from = "pull" and no images.lock: nothing compiled, nothing run
        assert refused.returncode != 0 and "images.lock names no cpu llama-server image" in refused.stderr, \
            refused.stderr
        assert podman.list({"podllama.stack": sf.name}) == [] and podman.image_id(f"{repo}:cpu") is None

        lock = json.loads((ci_dir / "images.lock").read_text())
        (sf.dir / "images.lock").write_text(json.dumps(lock))
        started = sf.run("start")
        assert "instead of compiling" in started.stderr and "compiled" not in started.stderr.replace(
            "instead of compiling", ""), started.stderr
        assert podman.image_id(f"{repo}:cpu") == built["image_id"]  # the very image CI built
        assert f"pulled {gateway['pushed']['ref']}" in started.stderr and "instead of building" in started.stderr
        assert "building the gateway image" not in started.stderr, started.stderr
        assert podman.image_id(gateway["image"]) == gateway["image_id"]  # and the gateway CI built
        r = httpx.post(f"http://127.0.0.1:{sf.port}/v1/completions", headers=sf.admin, timeout=60,
                       json={"model": "tiny-chat", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text

        # a registry that serves something else under the lock's name is not trusted: the labels are checked
        sf.run("down")
        for tag in (f"{repo}:cpu", f"{repo}:cpu-{built['commit'][:12]}"):
            podman.untag(tag)
        entry = next(e for e in lock["images"].values() if e["kind"] == "llama")
        entry["variant"] = "vulkan"  # what the lock claims; the image's labels say cpu
        (sf.dir / "images.lock").write_text(json.dumps(lock))
        sf.path.write_text(sf.path.read_text().replace('variant = "cpu"', 'variant = "vulkan"', 1))
        # (vulkan needs its device here: the refusal must come from the pull, so ask for the image alone)
        from podllama import config
        from podllama.build import push
        from podllama.config.kinds import KINDS

        with pytest.raises(push.PushError, match="its labels give variant 'cpu' \\(wanted 'vulkan'\\)"):
            push.from_lock(podman, config.load(sf.path), KINDS["llama"], "vulkan")
        assert podman.image_id(f"{repo}:vulkan") is None
    finally:
        for tag in (f"{repo}:cpu", f"{repo}:cpu-{built['commit'][:12]}"):
            podman.untag(tag)
