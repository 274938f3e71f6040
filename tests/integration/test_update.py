"""`podllama update` and `podllama rollback` for real: a local git remote holds new llama.cpp commits on top of
the pinned one; the image is rebuilt (compiler cache), smoke-tested, and servers restart on it — or, when the
new commit does not compile, everything stays on the old commit and keeps answering.

Runs in a clone of this checkout (its own llama.cpp work tree and image repository), so the project's own
submodule and `podllama/llama-server` tags are never touched."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from podllama.engine import ContainerSpec
from tests.helpers import ROOT, podllama, stack_name

STACK = stack_name("ptupdate")

REPO = "localhost/podllama-test/llama-server"
SERVER_CPP = "tools/server/server.cpp"
EMBEDDINGS_CPP = "tools/server/server-context.cpp"  # send_embedding(): a pooled vector is normalized, then sent
NORMALIZE = "common_embd_normalize(embd, embd_res.data(), n_embd_out, slot.task->params.embd_normalize);\n"
REGRESSION = "                for (int j = 0; j < n_embd_out / 2; ++j) { embd_res[j] = -embd_res[j]; }\n"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "protocol.file.allow=always", "-c", "user.email=t@t", "-c", "user.name=t",
                           *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A second podllama checkout with the llama.cpp submodule at the pin."""
    d = tmp_path_factory.mktemp("project") / "podllama"
    git(ROOT, "worktree", "prune")
    subprocess.run(["git", "clone", "-q", "--no-local", str(ROOT), str(d)], check=True)
    git(d, "-c", f"submodule.llama.cpp.url={ROOT / 'llama.cpp'}", "submodule", "update", "--init", "llama.cpp")
    return d


@pytest.fixture(scope="module")
def upstream(project, tmp_path_factory) -> dict[str, str]:
    """A llama.cpp remote: GOOD adds a line of real code to the server on top of the pin, BAD breaks the build."""
    d = tmp_path_factory.mktemp("upstream") / "llama.cpp"
    git(project / "llama.cpp", "clone", "-q", str(project / "llama.cpp"), str(d))
    with (d / SERVER_CPP).open("a") as f:
        f.write("\n[[maybe_unused]] static const char * podllama_update_test = \"new commit\";\n")
    git(d, "commit", "-qam", "podllama test: a new commit that builds")
    good = git(d, "rev-parse", "HEAD")
    with (d / SERVER_CPP).open("a") as f:
        f.write("\nthis is not C++;\n")
    git(d, "commit", "-qam", "podllama test: a commit that does not compile")
    bad = git(d, "rev-parse", "HEAD")
    git(d, "checkout", "-q", "-b", "regress", good)  # and beside it, a build that compiles and answers wrongly
    context = d / EMBEDDINGS_CPP
    code = context.read_text()
    assert code.count(NORMALIZE) == 1, "the pinned server's embedding code moved: find the line again"
    context.write_text(code.replace(NORMALIZE, NORMALIZE + REGRESSION))
    git(d, "commit", "-qam", "podllama test: a commit whose embeddings are wrong (half of every vector negated)")
    regress = git(d, "rev-parse", "HEAD")
    return {"path": str(d), "good": good, "bad": bad, "regress": regress}


@pytest.fixture(scope="module")
def stack(project, podman, models_dir, tmp_path_factory):
    from tests.integration.conftest import CHAT_AND_EMBED, StackFiles, base_choice, free_port

    d = tmp_path_factory.mktemp("update-stack")
    sf = StackFiles(d, STACK, podman, models_dir, free_port())
    sf.write(CHAT_AND_EMBED)
    # speed and load time are compared too (unit-tested); on a busy test machine they are noise, not a verdict
    sf.path.write_text(sf.path.read_text().replace('[build]\n', f'[build]\nrepository = "{REPO}"\n')
                       + "\n[update]\nmax_slowdown = 4\n")
    env = {"PODLLAMA_HOME": str(project)}
    sf.run_env = env
    podllama("build", "--engine", "podman", "--variant", "cpu", "--native", "--ui", "off", "--base",
             base_choice(podman), "-c", str(sf.path), env=env, cwd=project)
    podllama("start", "--no-gateway", "-c", str(sf.path), env=env, cwd=project)
    yield sf
    podllama("down", "-c", str(sf.path), env=env, cwd=project, check=False)
    for row in podman.list_images(REPO):
        podman.untag(f"{row['repository']}:{row['tag']}")


def run(sf, *args, check=True):
    return podllama(*args, "-c", str(sf.path), env=sf.run_env, cwd=Path(sf.run_env["PODLLAMA_HOME"]), check=check,
                    timeout=3000)


def version_of(podman, image: str) -> str:
    out = podman.run_once(ContainerSpec(name=f"{STACK}-version-{abs(hash(image)) % 10**6}", image=image,
                                        args=["--version"]))
    return out.stdout + out.stderr


def answers(podman, container: str, sf) -> bool:
    ip = podman.inspect(container).ip
    r = httpx.post(f"http://{ip}:8080/v1/chat/completions", timeout=30, headers=sf.server_key,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    return r.status_code == 200


def servers(sf) -> dict:
    return {r["server"]: r for r in json.loads(run(sf, "status", "--json").stdout)["servers"]}


def test_update_to_a_new_commit_rebuilds_and_restarts_on_it(podman, stack, upstream, project):
    pinned = git(project / "llama.cpp", "rev-parse", "HEAD")
    out = json.loads(run(stack, "update", "--ref", upstream["good"], "--remote", upstream["path"], "--json").stdout)
    assert out["ok"] and out["old_commit"] == pinned and out["new_commit"] == upstream["good"]
    assert sorted(out["restarted"]) == [f"{STACK}-chat-1", f"{STACK}-embed-1"]
    assert f"commit {upstream['good'][:12]}" in version_of(podman, f"{REPO}:cpu")
    rows = servers(stack)
    assert {r["commit"] for r in rows.values()} == {upstream["good"][:12]}
    assert all(r["health"] == "ok" for r in rows.values())
    assert answers(podman, f"{STACK}-chat-1", stack)
    assert podman.image_id(f"{REPO}:cpu-previous") == podman.image_id(f"{REPO}:cpu-{pinned[:12]}")
    # it was checked first: the new build answered the conformance set as the pinned one did
    check = out["check"]
    assert check["passed"], check["differences"]
    assert sorted(s["server"] for s in check["servers"]) == ["chat", "embed"]
    cases = {c["case"]: c for s in check["servers"] for c in s["cases"]}
    assert {"chat", "chat.tools", "chat.json", "chat.stream", "completion", "embeddings"} <= set(cases)
    assert cases["embeddings"]["cosine"] > 0.999 and cases["chat"]["text_equal"] is True
    assert not podman.list({"podllama.stack": STACK, "podllama.kind": "shadow"})
    print(f"\nconformance check of the default-like stack: {check['seconds']} s")


def test_a_build_that_answers_differently_is_named_and_never_serves(podman, stack, upstream, project):
    """A commit that compiles and passes the smoke test but moves every embedding: `update --check` names the
    difference and changes nothing; `update` under the strict gate refuses it and rolls back."""
    before = {c.name: c.id for c in podman.list({"podllama.stack": STACK})}
    image_before = podman.image_id(f"{REPO}:cpu")
    at = git(project / "llama.cpp", "rev-parse", "HEAD")
    proc = run(stack, "update", "--check", "--ref", upstream["regress"], "--remote", upstream["path"], check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "embed: embeddings: embeddings moved: cosine" in proc.stdout and "report:" in proc.stdout
    report = Path(proc.stdout.split("report: ")[1].split()[0])
    assert "| embeddings | embedding | embeddings moved" in report.read_text()
    assert git(project / "llama.cpp", "rev-parse", "HEAD") == at
    assert podman.image_id(f"{REPO}:cpu") == image_before
    assert {c.name: c.id for c in podman.list({"podllama.stack": STACK})} == before

    proc = run(stack, "update", "--ref", upstream["regress"], "--remote", upstream["path"], check=False)
    assert proc.returncode == 1
    assert "the new build answers differently" in proc.stderr and "embeddings moved" in proc.stderr
    assert "Rolled back" in proc.stderr
    assert git(project / "llama.cpp", "rev-parse", "HEAD") == at
    assert podman.image_id(f"{REPO}:cpu") == image_before
    assert {c.name: c.id for c in podman.list({"podllama.stack": STACK})} == before  # nothing restarted
    assert answers(podman, f"{STACK}-chat-1", stack)
    last = json.loads(run(stack, "status", "--json").stdout)["last_update"]
    assert last["ok"] is False and not last["check"]["passed"]


def test_update_to_a_commit_that_does_not_compile_changes_nothing(podman, stack, upstream, project):
    before = {c.name: c.id for c in podman.list({"podllama.stack": STACK})}
    image_before = podman.image_id(f"{REPO}:cpu")
    proc = run(stack, "update", "--ref", upstream["bad"], "--remote", upstream["path"], check=False)
    assert proc.returncode == 1
    assert "the cpu image failed" in proc.stderr and "Rolled back" in proc.stderr
    log = proc.stderr.split("Log: ")[1].split()[0]
    assert "this is not C++" in Path(log).read_text() or "error" in Path(log).read_text()
    # still the old commit everywhere, and answering
    assert git(project / "llama.cpp", "rev-parse", "HEAD") == upstream["good"]
    assert podman.image_id(f"{REPO}:cpu") == image_before
    assert {c.name: c.id for c in podman.list({"podllama.stack": STACK})} == before
    assert answers(podman, f"{STACK}-chat-1", stack)
    status = json.loads(run(stack, "status", "--json").stdout)
    assert status["last_update"]["ok"] is False and "rolled back" in status["last_update"]["summary"]
    assert "last update failed" in run(stack, "status").stdout


def test_rollback_returns_to_the_previous_image(podman, stack, upstream, project):
    pinned_image = podman.image_id(f"{REPO}:cpu-previous")
    run(stack, "rollback", "--variant", "cpu")
    assert podman.image_id(f"{REPO}:cpu") == pinned_image
    rows = servers(stack)
    assert {r["commit"] for r in rows.values()} != {upstream["good"][:12]}
    assert all(r["health"] == "ok" for r in rows.values())


def test_an_update_killed_midway_is_finished_by_the_next(podman, stack, upstream, project):
    """Killed after the new image was built and tagged, before every server was restarted on it: the next
    `podllama update` to the same commit finds servers on the old image and restarts them."""
    import os
    import signal
    import time

    from tests.faults import until
    from tests.helpers import PODLLAMA

    up = Path(upstream["path"])  # one more commit that builds
    git(up, "reset", "-q", "--hard", upstream["good"])
    with (up / SERVER_CPP).open("a") as f:
        f.write("\n[[maybe_unused]] static const char * podllama_update_test_2 = \"another commit\";\n")
    git(up, "commit", "-qam", "podllama test: another commit that builds")
    third = git(up, "rev-parse", "HEAD")
    image_before = podman.image_id(f"{REPO}:cpu")
    proc = subprocess.Popen([*PODLLAMA, "update", "--ref", third, "--remote", str(up), "-c", str(stack.path)],
                            cwd=project, env={**os.environ, **stack.run_env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    moved = until(lambda: podman.image_id(f"{REPO}:cpu") != image_before, 2400, every=0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # podllama and what it runs, as a power cut would
    proc.wait()
    assert moved is not None, "the new image was never tagged"
    time.sleep(1)
    assert git(project / "llama.cpp", "rev-parse", "HEAD") == third
    out = json.loads(run(stack, "update", "--ref", third, "--remote", str(up), "--json").stdout)
    assert out["ok"] and out["restarted"], out  # it finished what the killed one left
    rows = servers(stack)
    assert {r["commit"] for r in rows.values()} == {third[:12]} and all(r["health"] == "ok" for r in rows.values())
    assert answers(podman, f"{STACK}-chat-1", stack)
    assert "nothing to do" in json.loads(run(stack, "update", "--ref", third, "--remote", str(up), "--json").stdout)[
        "summary"]
    assert not podman.list({"podllama.stack": STACK, "podllama.kind": "shadow"})  # a killed check's shadow too
