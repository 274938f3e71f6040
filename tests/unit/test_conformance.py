"""The update's conformance check (stack/conformance/), in-process: answers compared case by case (a table of
pairs, each difference named); shadow servers on the fake engine, never routed and always removed; a candidate
build scripted to regress refused under the strict gate with everything put back, let through under "report";
the gateway keeping a sample of requests only when told to, and the check replaying it. The same on real
llama-server builds: tests/integration/test_update.py."""

from __future__ import annotations

import json
import random
import threading
import uuid
from pathlib import Path

import httpx
import pytest
import uvicorn

from podllama import config
from podllama.build import images
from podllama.config import UpdateSection
from podllama.gateway.app import Gateway
from podllama.gateway.front import server
from podllama.stack import Stack
from podllama.stack.conformance import cases, compare, shadow, verdict
from podllama.stack.update import UpdateError, rebuild
from tests.fakeengine import FakeEngine, Script
from tests.helpers import wait_until
from tests.unit.conftest import free_port

POLICY = UpdateSection()
CANDIDATE = "sha256:" + "c" * 64
REPO = "podllama/llama-server"


def ok(body=None, events=None, framing=None) -> compare.Answer:
    return compare.Answer(200, body=body, events=events, framing=framing)


def chat(content=None, tool_calls=None, tps=None) -> dict:
    msg = {"role": "assistant", "content": content} | ({"tool_calls": tool_calls} if tool_calls else {})
    return {"choices": [{"message": msg}]} | ({"timings": {"predicted_n": 10, "predicted_per_second": tps}} if tps else {})


def call(name, args='{"city": "Paris"}') -> list:
    return [{"function": {"name": name, "arguments": args}}]


def vectors(*vs) -> dict:
    return {"data": [{"embedding": list(v)} for v in vs]}


def ranked(*scores) -> dict:
    return {"results": [{"index": i, "relevance_score": s} for i, s in enumerate(scores)]}


TOOLS = cases.Case("t", "/v1/chat/completions", {"tools": [cases.WEATHER_TOOL]})
JSON = cases.Case("j", "/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
    "schema": cases.ANSWER_SCHEMA}}})
TEXT = cases.Case("x", "/v1/chat/completions", {})
STREAM = cases.Case("s", "/v1/chat/completions", {"stream": True})
EMBED = cases.Case("e", "/v1/embeddings", {"input": ["a", "b"]})
RERANK = cases.Case("r", "/v1/rerank", {"query": "q", "documents": ["a", "b", "c"]})

# (case, current build's answer, candidate's answer, the difference named; None: none)
PAIRS = [
    (TOOLS, ok(chat(tool_calls=call("get_weather"))), ok(chat(tool_calls=call("get_weather"))), None),
    (TOOLS, ok(chat(tool_calls=call("get_weather"))), ok(chat("It is sunny.")), "now name nothing"),
    (TOOLS, ok(chat(tool_calls=call("get_weather"))), ok(chat(tool_calls=call("get_time"))), "now name ['get_time']"),
    (TOOLS, ok(chat(tool_calls=call("get_weather"))), ok(chat(tool_calls=call("get_weather", '{"city": '))),
     "no longer parse"),
    (TOOLS, ok(chat("no tools here")), ok(chat("still none")), None),  # a model that never calls: nothing to lose
    (JSON, ok(chat('{"answer": "yes"}')), ok(chat('{"answer": "no", "confidence": 0.5}')), None),
    (JSON, ok(chat('{"answer": "yes"}')), ok(chat("{answer: yes")), "not JSON"),
    (JSON, ok(chat('{"answer": "yes"}')), ok(chat('{"confidence": 1}')), "not valid against its schema"),
    (TEXT, compare.Answer(200, chat("hi")), compare.Answer(500, {"error": "boom"}), "status 200 → 500"),
    (TEXT, compare.Answer(400, {}), compare.Answer(400, {}), None),  # refused alike
    (STREAM, ok(events=[{"choices": [{"delta": {"content": "a"}}]}, "[DONE]"]),
     ok(events=[{"choices": [{"delta": {"content": "a"}}]}], framing="the stream does not end with [DONE]"),
     "event stream is broken"),
    (EMBED, ok(vectors([1, 0], [0, 1])), ok(vectors([2, 0], [0, 3])), None),  # scale is not a move
    (EMBED, ok(vectors([1, 0], [0, 1])), ok(vectors([1, 0], [1, 1])), "embeddings moved: cosine 0.7071"),
    (EMBED, ok(vectors([1, 0], [0, 1])), ok(vectors([1, 0, 0], [0, 1, 0])), "changed shape"),
    (RERANK, ok(ranked(0.1, 0.9, 0.5)), ok(ranked(0.2, 0.8, 0.4)), None),
    (RERANK, ok(ranked(0.1, 0.9, 0.5)), ok(ranked(0.9, 0.1, 0.5)), "rerank order [1, 2, 0] → [0, 2, 1]"),
]


@pytest.mark.parametrize("case,base,cand,named", PAIRS)
def test_each_kind_of_answer_is_compared_by_what_it_is(case, base, cand, named):
    out = compare.compare(case, base, cand, POLICY)
    if named is None:
        assert out.differences == []
    else:
        assert len(out.differences) == 1 and named in out.differences[0], out.differences


def test_stream_framing_is_read_from_the_bytes():
    good = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: {"choices": []}\n\ndata: [DONE]\n\n'
    events, problem = compare.parse_stream(good)
    assert problem is None and events[-1] == "[DONE]" and compare.Answer(200, events=events).text == "a"
    for raw, named in [(good.replace(b"data: [DONE]\n\n", b""), "[DONE]"), (b"data: {broken\n\n", "not JSON"),
                       (b"hello\n\n", "not a field"), (b"", "no events")]:
        assert named in (compare.parse_stream(raw)[1] or ""), raw


def test_a_server_sums_up_speed_load_time_and_the_share_of_equal_texts():
    r = compare.ServerResult("chat", load_seconds=(2.0, 9.0))
    r.outcomes = [compare.compare(TEXT, ok(chat("a", tps=100)), ok(chat("b", tps=40)), POLICY),
                  compare.compare(TEXT, ok(chat("a", tps=100)), ok(chat("a", tps=45)), POLICY)]
    strict = UpdateSection(min_text_equal=0.9, max_slowdown=0.5)
    r.sum_up(strict)
    assert r.text_equal == 0.5 and r.speed == pytest.approx(0.425)
    text = " | ".join(r.all_differences)
    assert "50% of answers are the same text" in text and "43% of the current build's tokens/s" in text
    assert "loads in 9.0s, the current build in 2.0s" in text
    fine = compare.ServerResult("chat", load_seconds=(2.0, 3.0), outcomes=r.outcomes[1:])
    fine.sum_up(UpdateSection(max_slowdown=0.6))
    assert fine.all_differences == []  # 45 % of the speed is within 60 %; a second more to load is noise


def test_replayed_bodies_are_deterministic_and_short():
    body = cases.deterministic("/v1/chat/completions", {"model": "x", "max_tokens": 4000, "temperature": 1.3, "n": 3})
    assert body == {"max_tokens": cases.MAX_TOKENS, "temperature": 0, "seed": cases.SEED, "n": 1}
    assert cases.deterministic("/completion", {"prompt": "p"})["n_predict"] == cases.MAX_TOKENS
    assert cases.deterministic("/v1/embeddings", {"input": "x", "model": "m"}) == {"input": "x", "model": "m"}


def test_every_role_llama_server_serves_has_cases_and_media_where_an_mmproj_is_set():
    from podllama.config.kinds import KINDS

    for role in KINDS["llama"].roles:
        extra = {"mmproj": "p.gguf"} if role in ("vision", "audio") else {}
        assert cases.for_server(config.ServerSection(role=role, model="m.gguf", **extra)), role
    assert not any(c.name == "vision" for c in cases.for_server(config.ServerSection(model="m.gguf")))
    vision = cases.for_server(config.ServerSection(role="vision", model="m.gguf", mmproj="p.gguf"))
    assert any(c.name == "vision" and "image/png;base64" in json.dumps(c.body) for c in vision)
    audio = cases.for_server(config.ServerSection(role="audio", model="m.gguf", mmproj="p.gguf"))
    assert any(c.name == "audio" and "input_audio" in json.dumps(c.body) for c in audio)


def test_the_reservoir_keeps_at_most_n_and_gives_every_request_the_same_chance():
    r = __import__("podllama.access.samples", fromlist=["Reservoir"]).Reservoir(3, random.Random(7))
    assert [r.offer("chat", "f") for _ in range(3)] == [0, 1, 2]
    kept_late = 0
    for trial in range(2000):
        r = type(r)(3, random.Random(trial))
        slots = [r.offer("chat", "f") for _ in range(12)]
        assert all(s is None or 0 <= s < 3 for s in slots)
        kept_late += slots[-1] is not None
    assert 0.2 < kept_late / 2000 < 0.3  # the 12th request is kept with probability 3/12
    assert type(r)(0).offer("chat", "f") is None


# -- shadows on the fake engine -------------------------------------------------------------------------------
SERVERS = """
[servers.chat]
model = "tiny.gguf"
[servers.embed]
role = "embedding"
model = "tiny.gguf"
[servers.rank]
role = "rerank"
model = "tiny.gguf"
"""


@pytest.fixture
def stack(tmp_path, tiny_models, monkeypatch):
    """make(update_toml, **scripts) → a started stack of chat, embed and rank on the fake engine."""
    monkeypatch.setenv("PODLLAMA_VARIANT", "cpu")
    engines = []

    def make(update: str = "", **scripts: Script) -> Stack:
        path = tmp_path / "services.toml"
        path.write_text(f'[stack]\nname = "cf{uuid.uuid4().hex[:6]}"\nmodels_dir = "{tiny_models}"\n'
                        f"[update]\n{update}\n" + SERVERS)
        engine = FakeEngine()
        engines.append(engine)
        st = Stack(config.load(path), engine, default_variant="cpu")
        st.credentials.ensure()
        engine.server_key = st.credentials.server_key() or ""
        engine.scripts.update({k.replace("__", "@"): v for k, v in scripts.items()})
        st.start()
        return st

    yield make
    for e in engines:
        e.close()


def candidate(**regressions: str) -> dict[str, Script]:
    """Scripts for the servers' containers on the candidate image."""
    return {f"{server}__{CANDIDATE}": Script(regression=what) for server, what in regressions.items()}


def test_shadows_compare_builds_without_ever_being_routed_and_are_removed(stack):
    st = stack()
    servers_before = {n: c.id for n, c in st.containers("server").items()}
    seen_shadows: set[str] = set()
    engine = st.engine
    real_run = engine.run

    def watch(spec):  # what a shadow looks like when it is made
        seen_shadows.add(spec.name)
        assert spec.labels["podllama.kind"] == "shadow" and spec.network_aliases == []
        assert "podllama.config-hash" not in spec.labels
        return real_run(spec)

    engine.run = watch  # type: ignore[method-assign]
    v = shadow.check(st, {"cpu": FakeEngine.IMAGE_ID}, "a" * 40, "b" * 40)
    assert v.passed, v.differences
    assert sorted(s.server for s in v.servers) == ["chat", "embed", "rank"]
    assert seen_shadows == {f"{st.name}-{s}-shadow" for s in ("chat", "embed", "rank")}
    assert not any(n.endswith("-shadow") for n in engine.containers)  # every shadow removed
    assert {n: c.id for n, c in st.containers("server").items()} == servers_before  # real servers untouched
    chat = next(s for s in v.servers if s.server == "chat")
    assert {o.case for o in chat.outcomes} >= {"chat", "chat.tools", "chat.json", "chat.stream", "completion"}
    assert chat.text_equal == 1.0 and chat.speed == pytest.approx(1.0)
    saved = verdict.latest(st.cfg.state_path / shadow.CHECKS)
    assert saved and saved["passed"] and Path(saved["report"]).read_text().startswith("# Conformance: aaaaaaaaaaaa")


@pytest.mark.parametrize("server,regression,named", [
    ("embed", "embeddings", "embeddings: embeddings moved: cosine"),
    ("rank", "rerank", "rerank: rerank order [0, 1, 3, 2] → [2, 1, 3, 0]"),
    ("chat", "tools", "chat.tools: tool calls named ['get_weather'] now name nothing"),
    ("chat", "json", "chat.json: the answer is not JSON"),
    ("chat", "stream", "chat.stream: the event stream is broken: the stream does not end with [DONE]"),
])
def test_a_regressed_candidate_is_named_by_server_and_case(stack, server, regression, named):
    st = stack(**candidate(**{server: regression}))
    st.engine.tag(CANDIDATE, f"{REPO}:cpu")
    v = shadow.check(st, {"cpu": FakeEngine.IMAGE_ID}, "a" * 40, "b" * 40)
    assert not v.passed
    assert any(d.startswith(f"{server}: {named}") for d in v.differences), v.differences
    assert all(d.startswith(f"{server}:") for d in v.differences)  # the other servers answered alike


def fake_build(engine: FakeEngine):
    """A build that makes the candidate image and moves the variant's tag to it, keeping the old as -previous."""
    def build(variant: str) -> images.BuildResult:
        previous = images.promote(engine, CANDIDATE, variant, "b" * 40, repo=REPO)
        return images.BuildResult(variant, "b" * 40, CANDIDATE, [], previous, "", "", "", 0.0)
    return build


def test_strict_gate_refuses_a_regression_and_puts_everything_back(stack):
    st = stack(**candidate(embed="embeddings"))
    before = {n: c.id for n, c in st.containers("server").items()}
    with pytest.raises(UpdateError) as e:
        rebuild(st, ["cpu"], progress=lambda m: None, build=fake_build(st.engine))
    assert "the new build answers differently" in str(e.value) and "embeddings moved" in str(e.value)
    assert "Rolled back" in str(e.value)
    assert st.engine.image_id(f"{REPO}:cpu") == FakeEngine.IMAGE_ID  # the tag is back on the current build
    assert {n: c.id for n, c in st.containers("server").items()} == before  # no server was restarted
    last = st.state.read()["last_update"]
    assert not last["ok"] and "embeddings moved" in " ".join(last["check"]["differences"])


def test_report_gate_lets_a_difference_through_and_says_so(stack):
    st = stack('gate = "report"', **candidate(rank="rerank"))
    result = rebuild(st, ["cpu"], progress=lambda m: None, build=fake_build(st.engine))
    assert result.ok and len(result.restarted) == 3
    assert result.check and not result.check["passed"] and "rerank order" in result.check["summary"]
    assert {c.image for c in st.containers("server").values()} == {f"{REPO}:cpu"}


def test_an_unchanged_candidate_is_promoted_and_no_check_skips_the_shadows(stack):
    st = stack()
    result = rebuild(st, ["cpu"], progress=lambda m: None, build=fake_build(st.engine))
    assert result.ok and result.check and result.check["passed"] and len(result.restarted) == 3
    st2 = stack(**candidate(embed="embeddings"))
    runs = len([c for c in st2.engine.calls if c[0] == "run"])
    result = rebuild(st2, ["cpu"], progress=lambda m: None, build=fake_build(st2.engine), check=False)
    assert result.ok and result.check is None
    made = [n for what, n in st2.engine.calls[runs:] if what == "run"]
    assert made and not any(n.endswith("-shadow") for n in made)


def test_a_shadow_that_cannot_load_stops_the_rollout(stack):
    st = stack(**{f"chat__{CANDIDATE}": Script(exit_while_loading=1, load_seconds=1)})
    with pytest.raises(UpdateError) as e:
        rebuild(st, ["cpu"], progress=lambda m: None, build=fake_build(st.engine))
    assert "the conformance check could not run" in str(e.value) and "candidate build's shadow of chat exited" \
        in str(e.value) and "--no-check" in str(e.value)
    assert not any(n.endswith("-shadow") for n in st.engine.containers)


# -- the stack's own requests ----------------------------------------------------------------------------------
def serve(st: Stack) -> tuple[str, Gateway, uvicorn.Server, threading.Thread]:
    port = free_port()
    st.cfg.gateway.port = port
    gw = Gateway(st.cfg, supervise=False, engine=st.engine, poll_every=0.25)
    srv = uvicorn.Server(server.config(gw, "127.0.0.1", port, gw.limits))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, timeout=10)
    return f"http://127.0.0.1:{port}", gw, srv, thread


@pytest.mark.parametrize("sample", [0, 2])
def test_the_gateway_keeps_requests_only_when_told_and_the_check_replays_them(stack, sample):
    st = stack(f"sample = {sample}")
    url, gw, srv, thread = serve(st)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(5):
                r = client.post("/v1/chat/completions", json={
                    "model": "chat", "max_tokens": 3, "messages": [{"role": "user", "content": f"secret {i}"}]})
                assert r.status_code == 200
            assert client.post("/v1/embeddings", json={"model": "embed", "input": "x"}).status_code == 200
        db = gw.credentials.database(st.cfg)

        def kept() -> list:
            return db.query("SELECT server, family, slot, path, body FROM podllama_samples ORDER BY server, slot")
        if sample:
            wait_until(lambda: len(kept()) == 3, timeout=20)
            rows = kept()
            assert [(r[0], r[1], r[3]) for r in rows] == [("chat", "chat.completions", "/v1/chat/completions")] * 2 \
                + [("embed", "embeddings.oai", "/v1/embeddings")]
            assert all("secret" in r[4] for r in rows[:2])
            v = shadow.check(st, {"cpu": FakeEngine.IMAGE_ID}, "a" * 40, "b" * 40)
            chat = next(s for s in v.servers if s.server == "chat")
            assert {"sample.chat.completions.0", "sample.chat.completions.1"} <= {o.case for o in chat.outcomes}
            # the dashboard's source: the management API's status carries the latest verdict
            status = httpx.get(f"{url}/admin/status", headers={"Authorization": f"Bearer {gw.credentials.admin_key()}"})
            assert status.json()["conformance"]["passed"] is True and status.json()["conformance"]["report"]
        else:
            wait_until(lambda: gw.requests.written >= 6, timeout=20)  # the writer has run its rounds
            assert kept() == []
            v = shadow.check(st, {"cpu": FakeEngine.IMAGE_ID}, "a" * 40, "b" * 40)
            assert not any(o.case.startswith("sample.") for s in v.servers for o in s.outcomes)
    finally:
        srv.should_exit = True
        thread.join(10)
