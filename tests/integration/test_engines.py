"""Engine conformance: the same checks against real Podman and real Docker, through podllama's engine layer."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from podllama.engine import ContainerSpec, Mount
from podllama.engine.health import container_health
from tests.helpers import wait_until


@pytest.fixture
def net(engine):
    name = f"podllama-conf-{uuid.uuid4().hex[:6]}"
    engine.create_network(name, {"podllama.test": "true"})
    yield name
    engine.remove_network(name)


@pytest.fixture
def names(engine):
    made: list[str] = []

    def new() -> str:
        made.append(f"podllama-conf-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    for n in made:
        engine.remove(n)


def server_spec(name: str, image: str, models_dir, net: str, **labels: str) -> ContainerSpec:
    return ContainerSpec(name=name, image=image, network=net, network_aliases=["llm"],
                         labels={"podllama.test": "conformance", **labels},
                         args=["--model", "/models/tiny.gguf", "--ctx-size", "512", "--parallel", "1"],
                         mounts=[Mount(str(models_dir), "/models", read_only=True)])


def test_lifecycle_labels_network_and_logs(engine, llama_image, models_dir, net, names):
    name = names()
    cid = engine.run(server_spec(name, llama_image, models_dir, net, **{"podllama.server": "chat"}))
    info = engine.inspect(name)
    assert info is not None and info.running and info.id.startswith(cid[:12])
    assert info.labels["podllama.server"] == "chat" and info.ip
    assert wait_until(lambda: container_health(engine, engine.inspect(name), 8080) == "ok", 60)
    # found by its labels, and only ours
    assert [c.name for c in engine.list({"podllama.server": "chat", "podllama.test": "conformance"})] == [name]
    assert engine.list({"podllama.server": "no-such-server"}) == []
    # another container on the network reaches it by name
    probe = engine.run_once(ContainerSpec(name=names(), image=llama_image, network=net, entrypoint=["curl"],
                                          args=["-fsS", "--max-time", "5", "http://llm:8080/health"]))
    assert probe.returncode == 0 and '"ok"' in probe.stdout, probe.stdout + probe.stderr
    assert "listening" in "".join(engine.logs(name, tail=200))
    # graceful stop, start again, kill, remove
    engine.stop(name, timeout=10)
    stopped = engine.inspect(name)
    assert stopped.state == "exited" and not stopped.running
    engine.start(name)
    assert wait_until(lambda: engine.inspect(name).running, 20)
    engine.kill(name)
    killed = wait_until(lambda: (i := engine.inspect(name)) and not i.running and i, 20)
    assert killed.exit_code == 137
    engine.remove(name)
    assert engine.inspect(name) is None


def test_security_flags(engine, llama_image, models_dir, net, names):
    name = names()
    engine.run(server_spec(name, llama_image, models_dir, net))
    host = engine.inspect(name).raw["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert any("no-new-privileges" in o for o in host.get("SecurityOpt") or [])
    assert "ALL" in (host.get("CapDrop") or []) or len(host.get("CapDrop") or []) >= 14
    assert not any((host.get("PortBindings") or {}).values())  # nothing published on the host
    assert engine.inspect(name).ports == {}
    binds = " ".join(host.get("Binds") or []) + str(engine.inspect(name).raw.get("Mounts"))
    assert str(models_dir) in binds
    # from inside: no capabilities, not root, the model store and the root fs are read-only, /tmp is writable
    check = engine.run_once(ContainerSpec(
        name=names(), image=llama_image, entrypoint=["bash"], mounts=[Mount(str(models_dir), "/models")],
        args=["-c", "grep CapEff /proc/self/status; id -u; touch /models/x 2>&1; touch /app/x 2>&1; "
                    "touch /tmp/x && echo tmp-ok"]))
    out = check.stdout
    assert "CapEff:\t0000000000000000" in out, out
    assert out.splitlines()[1] == "10001"
    assert out.count("Read-only file system") == 2 and "tmp-ok" in out, out


def test_answers_through_its_network_address(engine, llama_image, models_dir, net, names):
    name = names()
    engine.run(server_spec(name, llama_image, models_dir, net))
    assert wait_until(lambda: container_health(engine, engine.inspect(name), 8080) == "ok", 60)
    ip = engine.inspect(name).ip
    r = httpx.post(f"http://{ip}:8080/completion", json={"prompt": "Hello", "n_predict": 4}, timeout=30)
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 4


def test_health_reports_loading_then_ok_and_down(engine, llama_image, models_dir, net, names):
    name = names()
    engine.run(server_spec(name, llama_image, models_dir, net))
    seen = set()
    for _ in range(200):
        state = container_health(engine, engine.inspect(name), 8080)
        seen.add(state)
        if state == "ok":
            break
    assert "ok" in seen and seen <= {"down", "loading", "ok"}
    engine.kill(name)
    assert wait_until(lambda: not engine.inspect(name).running, 20)
    assert container_health(engine, engine.inspect(name), 8080) == "down"


def test_the_last_log_lines_are_whole_lines_even_when_written_in_pieces(engine, llama_image, net, names):
    """A process that writes unbuffered leaves a line as several log records; the engines' --tail counts
    records, so asking it for one line gives the end of one. The supervisor quotes that line."""
    name = names()
    script = 'echo first; printf starting; sleep 0.5; printf " stall"; sleep 0.5; echo; sleep 300'
    engine.run(ContainerSpec(name=name, image=llama_image, network=net, entrypoint=["sh"], args=["-c", script],
                             labels={"podllama.test": "conformance"}))
    assert wait_until(lambda: "stall" in "".join(engine.logs(name)), 20)
    time.sleep(1)
    assert list(engine.logs(name, tail=1)) == ["starting stall\n"]
    assert list(engine.logs(name, tail=2)) == ["first\n", "starting stall\n"]
    assert list(engine.logs(name, tail=5)) == ["first\n", "starting stall\n"]
    assert list(engine.logs(name, tail=0)) == []


def test_untag_removes_one_name_and_leaves_the_image_and_its_other_names(engine, llama_image):
    """An image built twice with the same content has one id under two repositories (the update tests' clone
    and the project's own); removing one name must not take the other with it."""
    mine = f"localhost/podllama-conf-{uuid.uuid4().hex[:6]}/llama-server:cpu"
    engine.tag(llama_image, mine)
    engine.untag(mine)
    assert engine.image_id(mine) is None
    assert engine.image_id(llama_image) is not None, f"untagging {mine} removed {llama_image} too"
