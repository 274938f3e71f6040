"""The stack lifecycle with real llama-server containers: `podllama start|stop|kill|restart|status|logs`,
supervision by the gateway container, orphans, validation before anything starts."""

from __future__ import annotations

import json
import os
import subprocess

import httpx

from podllama.engine import ContainerSpec
from tests.helpers import wait_until


def servers(status: dict) -> dict[str, dict]:
    return {r["server"]: r for r in status["servers"]}


def container_ids(engine, name: str) -> dict[str, str]:
    return {c.name: c.id for c in engine.list({"podllama.stack": name})}


def test_start_gives_healthy_hardened_servers_and_is_idempotent(stack_engine, stack_files):
    engine = stack_engine  # the same checks on Podman and on Docker
    sf = stack_files(engine)
    out = sf.run("start")
    assert f"gateway: http://127.0.0.1:{sf.port}" in out.stdout
    rows = servers(sf.status())
    assert {n: (r["state"], r["health"], r["role"]) for n, r in rows.items()} == {
        "chat": ("running", "ok", "chat"), "embed": ("running", "ok", "embedding")}
    assert rows["chat"]["commit"] == engine.image_labels("podllama/llama-server:cpu")["podllama.llama-commit"][:12]
    assert engine.inspect(f"{sf.name}-gateway").running
    # hardened, as `podman inspect` shows
    for name in (f"{sf.name}-chat-1", f"{sf.name}-embed-1"):
        raw = engine.inspect(name).raw
        mounts = {m["Destination"]: m for m in raw["Mounts"]}
        assert mounts["/models"]["RW"] is False and mounts["/models"]["Source"] == str(sf.models)
        caps = raw["HostConfig"]["CapDrop"]
        assert (caps == ["ALL"] or len(caps) >= 14) and raw["HostConfig"]["ReadonlyRootfs"] is True
        assert engine.inspect(name).ports == {}
        assert f"{sf.name}" in raw["NetworkSettings"]["Networks"]
    # the servers' network has no route out (the gateway reaches them from the host's network)
    net = json.loads(engine.run_cli("network", "inspect", sf.name).stdout)[0]
    assert net.get("internal", net.get("Internal")) is True
    # the role decides the flags: embeddings answer on the embedding server only
    chat_ip, embed_ip = engine.inspect(f"{sf.name}-chat-1").ip, engine.inspect(f"{sf.name}-embed-1").ip
    key = sf.server_key
    assert httpx.post(f"http://{embed_ip}:8080/v1/embeddings", json={"input": "hi"}, headers=key).status_code == 200
    assert httpx.post(f"http://{chat_ip}:8080/v1/embeddings", json={"input": "hi"}, headers=key).status_code == 501
    # around the gateway, without the stack's server key, a server answers nothing but /health
    assert httpx.post(f"http://{embed_ip}:8080/v1/embeddings", json={"input": "hi"}).status_code == 401
    assert httpx.get(f"http://{chat_ip}:8080/props").status_code == 401
    # a second start changes nothing
    before = container_ids(engine, sf.name)
    again = sf.run("start")
    assert "chat, embed untouched" in again.stdout
    assert container_ids(engine, sf.name) == before


def test_supervisor_restarts_a_killed_server_and_leaves_a_stopped_one(stack_engine, stack_files):
    engine = stack_engine  # the same checks on Podman and on Docker
    sf = stack_files(engine)
    sf.run("start")
    chat = f"{sf.name}-chat-1"
    pid = engine.inspect(chat).pid
    subprocess.run(["kill", "-9", str(pid)], check=True)
    assert wait_until(lambda: (i := engine.inspect(chat)) and i.running and i.pid != pid, 30), "not restarted"
    assert wait_until(lambda: servers(sf.status())["chat"]["health"] == "ok", 30)
    row = servers(sf.status())["chat"]
    assert row["restarts"] == 1 and "exited with code 137" in row["last_restart"]["reason"]
    r = httpx.post(f"http://{engine.inspect(chat).ip}:8080/v1/chat/completions", headers=sf.server_key,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, timeout=30)
    assert r.status_code == 200
    # a server the user stopped stays stopped
    sf.run("stop", "embed")
    embed = f"{sf.name}-embed-1"
    assert engine.inspect(embed).state == "exited"
    import time

    time.sleep(3)  # six supervisor rounds
    assert engine.inspect(embed).state == "exited"
    assert servers(sf.status())["embed"]["desired"] == "stopped"
    sf.run("start", "embed")
    assert servers(sf.status())["embed"]["health"] == "ok"


def test_restart_recreates_one_server_at_a_time(podman, stack_files):
    sf = stack_files(podman)
    sf.run("start", "--no-gateway")
    before = container_ids(podman, sf.name)
    sf.run("restart", "chat")
    after = container_ids(podman, sf.name)
    assert after[f"{sf.name}-chat-1"] != before[f"{sf.name}-chat-1"]
    assert after[f"{sf.name}-embed-1"] == before[f"{sf.name}-embed-1"]
    assert servers(sf.status())["chat"]["health"] == "ok"


def test_orphans_are_shown_and_removed_and_foreign_containers_untouched(podman, stack_files, cpu_image):
    sf = stack_files(podman)
    sf.run("start", "--no-gateway")
    orphan, foreign = f"{sf.name}-old-1", f"{sf.name}-foreign"
    podman.run(ContainerSpec(name=orphan, image=cpu_image, entrypoint=["sleep"], args=["300"],
                             labels={"podllama.stack": sf.name, "podllama.kind": "server", "podllama.server": "old",
                                     "podllama.replica": "1", "podllama.role": "chat"}))
    podman.run(ContainerSpec(name=foreign, image=cpu_image, entrypoint=["sleep"], args=["300"]))
    try:
        rows = servers(sf.status())
        assert rows["old"]["declared"] is False and rows["old"]["state"] == "running"
        out = sf.run("start", "--no-gateway")
        assert "remove old" in out.stdout
        assert podman.inspect(orphan) is None
        assert podman.inspect(foreign).running
        sf.run("kill")
        assert podman.inspect(foreign).running  # not podllama's: never touched
    finally:
        podman.remove(foreign)


def test_kill_stops_every_container_including_the_gateway(podman, stack_files):
    sf = stack_files(podman)
    sf.run("start")
    sf.run("kill")
    infos = podman.list({"podllama.stack": sf.name})
    assert len(infos) == 3 and not any(i.running for i in infos)
    assert {i.labels["podllama.kind"] for i in infos} == {"server", "gateway"}
    assert all(i.exit_code == 137 for i in infos)


def test_stop_without_names_stops_everything_gracefully(podman, stack_files):
    sf = stack_files(podman)
    sf.run("start")
    sf.run("stop")
    infos = podman.list({"podllama.stack": sf.name})
    assert infos and not any(i.running for i in infos)
    assert {i.exit_code for i in infos if i.labels["podllama.kind"] == "server"} <= {0, 143}


def test_logs_show_llama_server_output(podman, stack_files):
    sf = stack_files(podman)
    sf.run("start", "--no-gateway")
    out = sf.run("logs", "chat", "--tail", "200").stdout
    assert "listening" in out and "tiny.gguf" in out


def test_an_unknown_flag_is_refused_before_anything_starts(podman, stack_files):
    sf = stack_files(podman, servers='[servers.chat]\nmodel = "tiny.gguf"\nargs = { paralel = 2 }\n')
    proc = sf.run("start", check=False)
    assert proc.returncode == 1
    assert "servers.chat.args.paralel: this llama-server has no flag --paralel (did you mean --parallel?)" in proc.stderr
    assert podman.list({"podllama.stack": sf.name}) == []


def test_a_missing_model_says_how_to_get_it(podman, stack_files):
    sf = stack_files(podman, servers='[servers.chat]\nmodel = "nope.gguf"\n')
    proc = sf.run("start", check=False)
    assert proc.returncode == 1 and "model 'nope.gguf' not found" in proc.stderr and "podllama pull" in proc.stderr
    assert podman.list({"podllama.stack": sf.name}) == []


def test_replicas_get_one_container_each(podman, stack_files):
    sf = stack_files(podman, servers='[servers.chat]\nmodel = "tiny.gguf"\nreplicas = 2\nctx_size = 512\n')
    sf.run("start", "--no-gateway")
    rows = sf.status()["servers"]
    assert [(r["container"], r["health"]) for r in rows] == [(f"{sf.name}-chat-1", "ok"), (f"{sf.name}-chat-2", "ok")]
    # fewer replicas: the extra one goes
    sf.write('[servers.chat]\nmodel = "tiny.gguf"\nreplicas = 1\nctx_size = 512\n')
    out = sf.run("start", "--no-gateway")
    assert "remove chat" in out.stdout and podman.inspect(f"{sf.name}-chat-2") is None


def test_the_stack_comes_back_when_the_docker_service_restarts(docker_ready, stack_files):
    """What a reboot does to Docker: the daemon stops every container and starts again. The gateway's restart
    policy brings it back; its supervisor brings back the servers that should run."""
    from podllama.build import doctor

    docker = docker_ready
    sf = stack_files(docker)
    sf.run("start")
    url = f"http://127.0.0.1:{sf.port}"
    pids = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    assert pids, "no dockerd runs"
    subprocess.run(["kill", "-TERM", *pids], check=True)  # as a service manager stops it (its containers stop too)
    if not wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 90):
        subprocess.run(["kill", "-KILL", *pids])  # a daemon that will not stop is stopped as at a power cut
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 30), "dockerd did not stop"
    doctor.start_dockerd()
    assert wait_until(lambda: (i := docker.inspect(f"{sf.name}-gateway")) and i.running, 60), "gateway not back"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert wait_until(lambda: _answers(f"{url}/v1/chat/completions", chat), 90), "the servers did not come back"
    rows = servers(sf.status())
    assert rows["chat"]["health"] == "ok" and rows["embed"]["health"] == "ok"


def test_the_units_start_brings_a_podman_stack_back_after_a_reboot(podman, stack_files):
    """Podman has no daemon to bring anything back at boot: the unit of `podllama service install` does. After
    a power cut every container is stopped; the unit's own ExecStart, run as systemd would (its working
    directory and environment), brings the stack back, and its ExecStop stops it."""
    from podllama.build import source
    from podllama.stack import service

    sf = stack_files(podman)
    sf.run("start")
    unit = service.unit_for(sf.name, sf.path, "podman", source.project_root())
    fields = dict(line.split("=", 1) for line in unit.text.splitlines() if "=" in line and not line.startswith("#"))
    names = [c.name for c in podman.list({"podllama.stack": sf.name})]
    assert len(names) == 3
    podman.run_cli("kill", *names)  # the power cut
    assert not any(podman.inspect(n).running for n in names)
    env = {**os.environ, **dict([fields["Environment"].split("=", 1)])}
    start = subprocess.run(fields["ExecStart"].split(), cwd=fields["WorkingDirectory"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert start.returncode == 0, start.stderr
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _answers(f"http://127.0.0.1:{sf.port}/v1/chat/completions", chat)
    assert all(podman.inspect(n).running for n in names)  # the same containers, started again
    stop = subprocess.run(fields["ExecStop"].split(), cwd=fields["WorkingDirectory"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert stop.returncode == 0, stop.stderr
    assert not any(podman.inspect(n).running for n in names)


def _answers(url: str, body: dict) -> bool:
    try:
        return httpx.post(url, json=body, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False
