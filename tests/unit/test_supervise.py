"""The supervisor against the fake engine (tests/fakeengine.py): crashes, missing containers, wedged servers,
slow loads and stalls, crash loops, servers the user stopped, and an engine that stops answering. The same
behaviours on a real engine are in tests/integration/test_supervisor.py and test_faults.py."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from podllama import config
from podllama.engine.health import OK, probe
from podllama.stack import Stack
from podllama.stack.supervisor import Supervisor
from tests.fakeengine import FakeEngine, Script

POLICY = """
[supervisor]
backoff_initial = 0
unhealthy_after = 2
stall_timeout = 0.5
crash_loop_limit = 3
"""


@pytest.fixture
def make(tmp_path, tiny_models) -> Iterator:
    """make(servers_toml, scripts) → (stack, engine): a stack on the fake engine, not started yet."""
    engines: list[FakeEngine] = []

    def build(servers: str, extra: str = POLICY, **scripts: Script) -> tuple[Stack, FakeEngine]:
        path = tmp_path / "services.toml"
        path.write_text(f'[stack]\nname = "fk{uuid.uuid4().hex[:6]}"\nmodels_dir = "{tiny_models}"\n{extra}\n{servers}')
        cfg = config.load(path)
        engine = FakeEngine()
        engine.scripts.update(scripts)
        stack = Stack(cfg, engine, default_variant="cpu")
        stack.credentials.ensure()
        engine.server_key = stack.credentials.server_key() or ""
        engines.append(engine)
        return stack, engine

    yield build
    for e in engines:
        e.close()


CHAT = """
[servers.chat]
model = "tiny.gguf"
"""


def answers(stack: Stack, engine: FakeEngine, server: str = "chat") -> str:
    info = engine.inspect(f"{stack.name}-{server}-1")
    return probe(f"http://{info.ip}:8080") if info is not None and info.ip else "no address"


def test_a_crashed_server_is_started_again_and_a_crash_loop_is_given_up(make):
    stack, engine = make(CHAT)
    stack.start()
    sup = Supervisor(stack)
    cname = f"{stack.name}-chat-1"
    assert sup.check_once() == [] and answers(stack, engine) == OK

    for n in range(3):
        engine.crash(cname, 139)
        done = sup.check_once()
        assert done == [{"container": cname, "action": "restart", "reason": "exited with code 139"}], (n, done)
        assert ("start", cname) == engine.calls[-1], "restarted in place, not recreated"
        assert answers(stack, engine) == OK
    assert len(stack.state.server("chat-1")["recent_restarts"]) == 3

    engine.crash(cname, 139)  # the fourth within the window: given up on, with its logs kept
    assert sup.check_once()[0]["action"] == "failed"
    failed = stack.state.server("chat-1")["failed"]
    assert failed["reason"].startswith("crash loop: 3 restarts") and "server is listening" in failed["logs"]
    calls = len(engine.calls)
    assert sup.check_once() == [] and not engine.containers[cname].state == "running"
    assert not [c for c in engine.calls[calls:] if c[0] in ("start", "run")], "nothing restarts a failed server"


def test_a_removed_container_is_made_again_and_a_wedged_one_replaced(make):
    stack, engine = make(CHAT)
    stack.start()
    sup = Supervisor(stack)
    cname = f"{stack.name}-chat-1"
    engine.remove(cname)
    assert sup.check_once() == [{"container": cname, "action": "restart", "reason": "container missing"}]
    assert ("run", cname) in engine.calls and answers(stack, engine) == OK

    first = engine.containers[cname].id
    engine.break_health(cname, 500)
    assert sup.check_once() == [], "one failed probe is not enough (unhealthy_after = 2)"
    done = sup.check_once()
    assert done and done[0]["reason"] == "not answering /health (error:500) 2 times", done
    assert engine.containers[cname].id != first, "recreated" and answers(stack, engine) == OK


def test_a_loading_server_is_waited_for_while_it_makes_progress_and_restarted_when_it_stalls(make):
    stack, engine = make(CHAT, chat=Script(load_seconds=60))
    stack.start(wait=False)
    sup = Supervisor(stack)
    cname = f"{stack.name}-chat-1"
    container = engine.containers[cname]
    for n in range(4):  # a new log line every round: progress (stall_timeout is 0.5 s)
        container.log.append(f"llama_model_load: loading tensors {n}")
        assert sup.check_once() == [], n
        time.sleep(0.3)
    assert answers(stack, engine) == "loading" and engine.containers[cname] is container
    time.sleep(0.6)  # no new line for longer than stall_timeout
    done = sup.check_once()
    assert done and done[0]["reason"].startswith("no loading progress for 0s"), done
    assert engine.containers[cname] is not container


def test_what_the_user_stopped_and_unloaded_on_demand_servers_stay_down(make):
    stack, engine = make(CHAT + """
[servers.lazy]
model = "tiny.gguf"
start = "on-demand"
""")
    stack.start()
    assert engine.running() == {"chat"}
    sup = Supervisor(stack)
    stack.stop(["chat"])
    calls = len(engine.calls)
    for _ in range(3):
        sup._engine_at = 0  # look at the engine every round
        assert sup.check_once() == []
    assert engine.running() == set()
    assert not [c for c in engine.calls[calls:] if c[0] in ("start", "run")]


def test_healthy_servers_cost_no_engine_call_and_a_lost_engine_pauses_supervision(make):
    stack, engine = make(CHAT)
    stack.start()
    sup = Supervisor(stack)
    assert sup.check_once() == []  # the first round looks at the engine and learns the addresses
    lists = engine.calls.count(("list", ""))
    for _ in range(5):
        assert sup.check_once() == []
    assert engine.calls.count(("list", "")) == lists, "every server answered: the engine was not asked"

    cname = f"{stack.name}-chat-1"
    engine.crash(cname)
    engine.down = "Cannot connect to Podman: dial unix /run/podman/podman.sock: connect: no such file or directory"
    assert sup.check_once() == []
    assert sup.engine_problem is not None and "podman.sock" in sup.engine_problem["error"]
    assert "podman.sock" in stack.state.read()["engine_problem"]["error"], "`status` says so"

    engine.down = None
    done = sup.check_once()
    assert done and done[0]["reason"] == "exited with code 139" and answers(stack, engine) == OK
    assert sup.engine_problem is None and stack.state.read().get("engine_problem") is None


def test_planning_writes_nothing(make):
    """Stack.units() names the files a container mounts and makes none: a plan or a dry run leaves the stack's
    state as it was; the files come when a container is made."""
    stack, engine = make(CHAT + '\n[servers.lazy]\nmodel = "tiny.gguf"\nstart = "on-demand"\n')
    state = stack.cfg.state_path

    def files() -> set[str]:
        return {str(p.relative_to(state)) for p in state.rglob("*")} if state.exists() else set()

    for name in ("admin.key", "server.key"):
        (state / "secrets" / name).unlink(missing_ok=True)
    before = files()
    units = stack.units()
    stack.plan(None, units)
    assert files() == before, files() - before
    slots = [m for u in units for m in u.spec.mounts if m.target.endswith("slots")]
    assert slots and not (state / "slots" / "lazy").exists()
    stack.recreate(next(u for u in units if u.server == "lazy"), exists=False)
    assert (state / "slots" / "lazy").is_dir() and (state / "secrets" / "server.key").is_file()
    assert not (state / "images").exists()
    stack.apply(stack.plan(None, units), units)  # the image's flags, for the gateway container's plans
    shared = list((state / "images").glob("*.json"))
    assert len(shared) == 1 and "--model" in json.loads(shared[0].read_text())["help"]


def test_a_replica_names_the_build_and_model_file_it_runs(make):
    """The request log's lineage comes from the containers: the model file's sha256 from the store's manifest
    (a label that describes and decides nothing: the config hash does not change with it), the llama.cpp
    commit, the settings' hash and the image, as the gateway's discovery reads them from the engine."""
    from podllama.gateway.routing.upstreams import engine_discovery
    from podllama.models.store import Manifest, Store, StoredFile, manifest_file_name, sha256_of
    from podllama.stack import L_SHA

    stack, engine = make(CHAT)
    plain = stack.units()[0]
    assert plain.spec.labels[L_SHA] == ""  # a file put there by hand: no manifest, no sha256 claimed
    sha = sha256_of(stack.cfg.models_path / "tiny.gguf")
    manifest = Store(stack.cfg.models_path).root / ".manifests" / manifest_file_name("local/tiny")
    Store(stack.cfg.models_path).save(Manifest("local/tiny", "import", [StoredFile("tiny.gguf", 1, sha)]))
    try:  # (the session's shared models directory: the manifest goes again)
        unit = stack.units()[0]
        assert unit.spec.labels[L_SHA] == sha and unit.hash == plain.hash
        stack.start(wait=False)
        found = engine_discovery(stack)()
    finally:
        manifest.unlink()
    assert found and found[0].lineage.model_sha256 == sha and found[0].lineage.config_hash == unit.hash
    assert found[0].lineage.image == engine.image_id(unit.spec.image)
