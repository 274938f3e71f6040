"""On-demand loading in the gateway, in-process, against the fake engine (tests/fakeengine.py): concurrent
mixed requests within a budget that holds one server, streams in flight never cut, idle servers stopped,
refusals that name what holds the memory, a server that exits while loading, prompt caches across a swap,
the status router mode shows. The same on real llama-server containers: tests/integration/test_ondemand.py."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from podllama import config
from podllama.gateway.app import Gateway
from podllama.gateway.front import server
from podllama.stack import Stack
from podllama.stack.state import UNLOADED
from tests.fakeengine import FakeEngine, Script
from tests.helpers import wait_until
from tests.unit.conftest import free_port

MiB = 2**20


def on_demand(*names: str, idle: str = "10m") -> str:
    return "".join(f'\n[servers.{n}]\nmodel = "tiny.gguf"\nstart = "on-demand"\nidle_timeout = "{idle}"\n'
                   "ctx_size = 1024\nargs = { parallel = 2 }\n" for n in names)


ALWAYS = '\n[servers.always]\nmodel = "tiny.gguf"\nctx_size = 1024\nargs = { parallel = 2 }\n'  # as big as each


class Served:
    """A gateway in-process over a stack on the fake engine."""

    def __init__(self, url: str, gw: Gateway, engine: FakeEngine) -> None:
        self.url, self.gw, self.engine = url, gw, engine
        self.client = httpx.Client(base_url=url, timeout=60)

    def chat(self, model: str, **extra) -> httpx.Response:
        return self.client.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]} | extra)

    def statuses(self) -> dict[str, str]:
        return {m["server"]: m["status"]["value"] for m in self.client.get("/v1/models").json()["data"]}

    def starts(self, server: str) -> int:
        """How often SERVER's container was started (made or started again)."""
        cname = f"{self.gw.stack.name}-{server}-1"
        return sum(1 for what, name in self.engine.calls if name == cname and what in ("run", "start"))


@pytest.fixture
def stack(tmp_path, tiny_models, monkeypatch) -> Iterator:
    """stack(servers_toml, budget_in_servers, **scripts) → Served: the `always` servers started, the gateway
    serving; the CPU budget holds BUDGET_IN_SERVERS servers of the tiny model (each holds what it is estimated
    to hold, unless its script says otherwise)."""
    monkeypatch.setenv("PODLLAMA_VARIANT", "cpu")
    started: list[tuple[uvicorn.Server, threading.Thread, Served]] = []

    def start(servers: str, budget_in_servers: float = 2.5, load_timeout: int = 20, progress_interval: float = 5,
              **scripts: Script) -> Served:
        port = free_port()
        path = tmp_path / "services.toml"
        head = (f'[stack]\nname = "od{uuid.uuid4().hex[:6]}"\nmodels_dir = "{tiny_models}"\n'
                f"[gateway]\nport = {port}\nload_timeout = {load_timeout}\nprogress_interval = {progress_interval}\n"
                "[supervisor]\ninterval = 0.5\n")
        path.write_text(head + servers)
        engine = FakeEngine()
        plain = Stack(config.load(path), engine, default_variant="cpu")
        estimates = {name: plain.estimate(name).devices["cpu"] for name in plain.cfg.servers}
        path.write_text(head + f'[placement]\ncpu_memory = "{int(max(estimates.values()) * budget_in_servers)}"\n'
                        + servers)
        gw = Gateway(config.load(path), supervise=True, engine=engine, poll_every=0.25)
        engine.server_key = gw.credentials.server_key() or ""
        engine.on_demand = {n for n, s in gw.stack.cfg.servers.items() if s.on_demand}
        engine.scripts.update(scripts)
        for name, estimate in estimates.items():  # each holds what it was estimated to hold, unless scripted
            script = engine.scripts.setdefault(name, Script())
            script.memory = script.memory or estimate
        gw.stack.start()
        srv = uvicorn.Server(server.config(gw, "127.0.0.1", port, gw.limits))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        wait_until(lambda: srv.started, timeout=10)
        s = Served(f"http://127.0.0.1:{port}", gw, engine)
        started.append((srv, thread, s))
        return s

    yield start
    for srv, thread, s in started:
        srv.should_exit = True
        thread.join(10)
        s.client.close()
        s.engine.close()


def test_mixed_concurrent_requests_each_load_once_within_a_budget_that_holds_one(stack):
    s = stack(ALWAYS + on_demand("a", "b", "c"), budget_in_servers=2.5,
              **{n: Script(load_seconds=0.3) for n in "abc"})
    assert s.engine.running() == {"always"}
    assert s.statuses() == {"always": "loaded", "a": "unloaded", "b": "unloaded", "c": "unloaded"}
    for model in "abca":
        r = s.chat(model)
        assert r.status_code == 200 and r.headers["x-podllama-server"] == model, r.text
        assert s.engine.running() == {"always", model}

    # 30 at once: one load per server (a request that waited for a load is not undone by the next load)
    before = {n: s.starts(n) for n in "abc"}
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda i: s.chat("abc"[i % 3]), range(30)))
    assert [a.status_code for a in answers] == [200] * 30, [a.text for a in answers if a.status_code != 200]
    assert [a.headers["x-podllama-server"] for a in answers] == ["abc"[i % 3] for i in range(30)]
    loads = sum(s.starts(n) - before[n] for n in "abc")
    assert loads <= 3, f"{loads} loads for three servers: loads undid each other"
    assert s.engine.most_on_demand == 1, "never two on-demand servers at once in a budget that holds one"
    assert s.engine.running() & {"always"} and s.starts("always") == 1, "the always server was never stopped"


def test_a_stream_in_flight_is_not_cut_and_idle_servers_stop(stack):
    s = stack(ALWAYS + on_demand("a", "b", idle="1s"), budget_in_servers=2.5,
              a=Script(tokens_per_second=40))  # 80 tokens: a stream of 2 s, longer than a's idle timeout
    events: list[str] = []
    ended: list[float] = []

    def stream() -> None:
        with s.client.stream("POST", "/completion", json={"model": "a", "prompt": "x", "n_predict": 80,
                                                          "stream": True}) as r:
            assert r.status_code == 200
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))
        ended.append(time.monotonic())

    streaming = threading.Thread(target=stream)
    streaming.start()
    wait_until(lambda: s.engine.running() == {"always", "a"} and s.statuses()["a"] == "loaded", timeout=10)
    r = s.chat("b")  # needs a's memory: waits until a's stream is done
    b_answered = time.monotonic()
    streaming.join()
    assert r.status_code == 200, r.text
    assert len(events) == 80 and '"stop": true' in events[-1], "the stream came whole"
    assert b_answered >= ended[0] - 0.05, "b was loaded only once a's stream had ended"
    assert s.engine.running() == {"always", "b"}

    # idle: b (idle_timeout 1 s) is stopped by the reaper (a round every 2 s); the always server never is
    wait_until(lambda: s.engine.running() == {"always"}, timeout=6)
    assert s.statuses() == {"always": "loaded", "a": "unloaded", "b": "unloaded"}
    assert s.gw.stack.state.desired("b-1") == UNLOADED, "the supervisor does not bring it back"
    rounds = s.gw.supervisor.rounds
    assert wait_until(lambda: s.gw.supervisor.rounds >= rounds + 2, timeout=10)  # two rounds later
    assert s.engine.running() == {"always"} and s.starts("always") == 1


def test_no_room_is_a_503_naming_what_holds_the_memory(stack):
    s = stack(ALWAYS + ALWAYS.replace("always", "pinned") + on_demand("lazy"), budget_in_servers=2.5)
    r = s.chat("lazy")
    assert r.status_code == 503 and r.headers["retry-after"]
    message = r.json()["error"]["message"]
    assert "servers that always run" in message and "'always'" in message and "'pinned'" in message, message
    assert 'start = \\"on-demand\\"' in r.text or 'start = "on-demand"' in message
    assert s.engine.running() == {"always", "pinned"} and s.starts("lazy") == 0

    big = stack(on_demand("huge"), budget_in_servers=0.5)
    r = big.chat("huge")
    assert r.status_code == 503 and "more than the whole budget" in r.json()["error"]["message"]


def test_a_server_that_exits_while_loading_is_a_502_with_its_logs_and_stays_unloaded(stack):
    s = stack(on_demand("broken"), broken=Script(load_seconds=5, exit_while_loading=1,
                                                  logs=["llama_model_load: error: tensor data is not within bounds"]))
    for attempt in (1, 2):
        r = s.chat("broken")
        assert r.status_code == 502, r.text
        assert "exited while loading" in r.text and "not within bounds" in r.text
        assert s.starts("broken") == attempt, "a new attempt per request, no restart loop"
    assert s.gw.stack.state.desired("broken-1") == UNLOADED
    rounds = s.gw.supervisor.rounds
    assert wait_until(lambda: s.gw.supervisor.rounds >= rounds + 2, timeout=10)  # two rounds later: not restarted
    assert s.starts("broken") == 2 and s.statuses()["broken"] == "unloaded"


def test_loading_is_shown_and_prompt_caches_survive_unload_and_load(stack):
    s = stack(on_demand("a"), a=Script(load_seconds=1.0))
    asking = threading.Thread(target=s.chat, args=("a",))
    asking.start()
    wait_until(lambda: s.statuses()["a"] == "loading", timeout=5)
    asking.join()
    assert s.statuses()["a"] == "loaded"
    cname = f"{s.gw.stack.name}-a-1"
    held = s.engine.containers[cname].slots[0]
    assert held > 0

    assert s.client.post("/models/unload", json={"model": "a"}).status_code == 200
    saved = list(s.gw.stack.slot_dir("a").glob("*-0.bin"))
    assert s.engine.running() == set() and [f.read_text() for f in saved] == [str(held)], "slot 0 saved"
    r = s.client.post("/models/load", json={"model": "a"})
    assert r.status_code == 200 and r.json()["status"]["value"] == "loaded", r.text
    container = s.engine.containers[cname]
    assert ("POST", "/slots/0?action=restore") in container.requests and container.slots[0] == held


# -- clients kept informed while their server loads -------------------------------------------------------------
READ_TIMEOUT = 1.5  # the client gives up on a connection silent this long; the server takes longer to load
SLOW_LOAD = Script(load_seconds=4 * READ_TIMEOUT)


def stream_lines(s: Served, path: str, body: dict) -> list[str]:
    """The lines of a streamed answer, read by a client that gives up on READ_TIMEOUT seconds of silence."""
    with httpx.Client(base_url=s.url, timeout=httpx.Timeout(10, read=READ_TIMEOUT)) as client, \
            client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line]


def test_a_stream_waiting_for_a_load_hears_what_its_server_does_and_a_silent_one_is_given_up(stack):
    s = stack(on_demand("a"), progress_interval=0.2, a=SLOW_LOAD)
    lines = stream_lines(s, "/v1/chat/completions", {"model": "a", "stream": True, "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    comments = [line for line in lines if line.startswith(":")]
    assert comments and all(c.startswith(": waiting for server 'a': ") for c in comments), lines
    assert any("loading model" in c for c in comments), comments
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert all(line.startswith(":") for line in lines[:first_data]) and lines[-1] == "data: [DONE]", lines
    assert not any(line.startswith(":") for line in lines[first_data:]), "comments only until the answer begins"

    quiet = stack(on_demand("b"), progress_interval=0, b=SLOW_LOAD)  # the same wait without progress lines
    with pytest.raises(httpx.ReadTimeout):
        stream_lines(quiet, "/v1/chat/completions", {"model": "b", "stream": True,
                                                     "messages": [{"role": "user", "content": "hi"}]})


def test_ollama_clients_get_empty_chunks_while_the_server_loads(stack):
    s = stack(on_demand("a"), progress_interval=0.2, a=SLOW_LOAD)
    lines = [json.loads(line) for line in stream_lines(s, "/api/chat", {
        "model": "a", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 4}})]
    waiting = [x for x in lines if not x["done"] and x["message"]["content"] == ""]
    assert waiting and all(x["model"] == "a" and x["message"]["role"] == "assistant" for x in waiting), lines
    assert len(waiting) >= 2 and lines[-1]["done"] is True, lines  # (the fake server's events carry no deltas)


def test_a_load_that_fails_after_the_stream_began_ends_it_with_an_error_event_in_the_apis_shape(stack):
    s = stack(on_demand("a", "b"), progress_interval=0.1,
              a=Script(load_seconds=2, exit_while_loading=3), b=Script(load_seconds=2, exit_while_loading=3))
    lines = stream_lines(s, "/v1/chat/completions", {"model": "a", "stream": True,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    assert lines[0].startswith(": waiting for server 'a'"), lines
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert lines[-1].startswith("data: ") and error["code"] == 502 and "exited while loading" in error["message"]

    lines = stream_lines(s, "/api/chat", {"model": "b", "messages": [{"role": "user", "content": "hi"}]})
    last = json.loads(lines[-1])
    assert "exited while loading" in last["error"] and not any('"done": true' in x for x in lines), lines


def test_admin_events_follow_each_stage_of_a_load(stack):
    s = stack(on_demand("a"), a=Script(load_seconds=1))
    key = s.gw.credentials.admin_key()
    seen: list[dict] = []

    def follow() -> None:
        with httpx.Client(base_url=s.url, timeout=30) as client, client.stream(
                "GET", "/admin/events", headers={"authorization": f"Bearer {key}"}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["server"] == "a" and seen[-1]["phase"] == "ready":
                        return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    wait_until(lambda: seen, timeout=10)  # the snapshot came: following from here
    assert seen[0] == seen[0] | {"server": "a", "phase": "down"}
    assert s.chat("a").status_code == 200
    follower.join(10)
    stages = [e["stage"] for e in seen if e["server"] == "a"]
    assert stages[0] == "down" and stages[-1] == "ready", stages
    assert stages.index("starting container") < stages.index("loading model"), stages
    status = s.client.get("/admin/status", headers={"authorization": f"Bearer {key}"}).json()
    assert status["stages"]["a"]["phase"] == "ready" and status["changes"][-1]["stage"] == "ready"


def test_a_fitted_context_is_read_back_from_the_server_and_replaces_the_guess(stack):
    # the server chooses its context itself (llama-server's --fit on a GPU): 3000 tokens per slot, two slots
    s = stack('\n[servers.fitted]\nmodel = "tiny.gguf"\nstart = "on-demand"\nctx_size = "fit"\n'
              "args = { parallel = 2 }\n", fitted=Script(context=3000))
    guess = s.gw.stack.estimate("fitted").devices  # before it runs: the model's whole context counted
    assert s.chat("fitted").status_code == 200

    def noted() -> dict:
        return s.gw.stack.state.read()["servers"].get("fitted-1", {}).get("memory") or {}

    assert wait_until(lambda: noted().get("context"), timeout=30), noted()
    assert noted()["context"] == 3000
    section = s.gw.stack.cfg.servers["fitted"].model_copy(update={"ctx_size": 6000})  # one pool per slot
    assert noted()["estimate"] == s.gw.stack.estimate("fitted", section).devices
    assert noted()["estimate"]["cpu"] < guess["cpu"]
    rows = {r["server"]: r for r in s.gw.stack.status(probe=False)}
    assert rows["fitted"]["memory"]["context"] == 3000


def test_a_gpu_server_is_measured_by_what_its_driver_says(tmp_path, tiny_models, monkeypatch):
    """On a GPU, what a server holds is the driver's per-process figure (engine.gpu_memory), kept for its settings
    as a CPU server's resident memory is; the host memory stays estimated."""
    monkeypatch.setenv("PODLLAMA_VARIANT", "cuda")
    monkeypatch.setenv("PODLLAMA_GPU_MEMORY", f"cuda:0={8 * 1024 * MiB}")
    path = tmp_path / "services.toml"
    path.write_text(f'[stack]\nname = "gm{uuid.uuid4().hex[:6]}"\nmodels_dir = "{tiny_models}"\n'
                    f"[gateway]\nport = {free_port()}\n" + on_demand("g"))
    engine = FakeEngine()
    gw = Gateway(config.load(path), supervise=True, engine=engine, poll_every=0.25)
    engine.server_key = gw.credentials.server_key() or ""
    engine.on_demand = {"g"}
    engine.scripts["g"] = Script(gpu_memory=777 * MiB)
    srv = uvicorn.Server(server.config(gw, "127.0.0.1", gw.stack.cfg.gateway.port, gw.limits))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: srv.started, timeout=10)
        r = httpx.post(f"http://127.0.0.1:{gw.stack.cfg.gateway.port}/v1/chat/completions", timeout=60,
                       json={"model": "g", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text

        def measured() -> dict:  # the state keeps it by the server's unit (g-1)
            saved = gw.stack.state.read().get("servers", {})
            return {k: v for unit in saved.values() for k, v in ((unit.get("memory") or {}).get("measured") or {}).items()}

        assert wait_until(lambda: measured().get("cuda:0") == 777 * MiB, timeout=20), gw.stack.state.read()
        assert "cpu" not in measured()  # what the process holds on the host is not the GPU server's measure
    finally:
        srv.should_exit = True
        thread.join(10)
