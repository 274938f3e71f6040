"""Ollama's API on the gateway, driven by the `ollama` Python client against the gateway in-process, in front of a
scripted upstream that answers as llama-server does: what goes upstream is checked as much as what comes back."""

from __future__ import annotations

import base64
import json
import shutil

import httpx
import ollama
import pytest

from podllama.models import gguf_meta
from tests import scripted
from tests.helpers import control_loop

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
TIMINGS = {"prompt_n": 7, "prompt_ms": 12.5, "predicted_n": 3, "predicted_ms": 30.0}


def chunk(content: str | None = None, finish: str | None = None, **delta) -> dict:
    d = ({"content": content} if content is not None else {}) | delta
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


STREAM = (chunk(role="assistant", content=None), chunk("Hel"), chunk("lo"), chunk(finish="stop"),
          {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}, "timings": TIMINGS})


def sent(upstream, path: str) -> dict:
    [req] = upstream.received(path)
    return json.loads(req.body)


@pytest.fixture
def client(gateway, tiny_models, tmp_path):
    shutil.copytree(tiny_models, tmp_path / "models", dirs_exist_ok=True)
    gw = gateway()
    return gw, ollama.Client(host=gw.url)


def test_models_are_listed_and_shown_with_their_gguf_details(client):
    gw, c = client
    listed = {m.model: m for m in c.list().models}
    assert set(listed) == {"tiny-chat", "tiny-embed"}
    meta = gguf_meta.read(gw.cfg_path.parent / "models" / "tiny.gguf")
    chat = listed["tiny-chat"]
    assert chat.size == meta.size and chat.details.format == "gguf"
    assert chat.details.family == meta.architecture and len(chat.digest) == 64
    shown = c.show("tiny-chat")
    assert shown.capabilities == ["completion"]
    assert shown.modelinfo["general.architecture"] == meta.architecture
    assert c.show("tiny-embed:latest").capabilities == ["embedding"]  # Ollama's tag form finds the model
    running = {m.model for m in c.ps().models}
    assert running == {"tiny-chat", "tiny-embed"}  # both servers answer /health
    assert httpx.get(f"{gw.url}/api/version").json()["version"].count(".") == 2


def test_a_streamed_chat_becomes_ndjson_lines_with_ollamas_counts(client, upstream):
    gw, c = client
    upstream.on("/v1/chat/completions", scripted.events(*STREAM))
    parts = list(c.chat(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], stream=True,
                        options={"temperature": 0.2, "num_predict": 5, "top_k": 3, "num_ctx": 4096}))
    assert "".join(p.message.content for p in parts) == "Hello"
    assert [p.done for p in parts] == [False, False, True]
    last = parts[-1]
    assert last.done_reason == "stop" and last.eval_count == 3 and last.prompt_eval_count == 7
    assert last.eval_duration == 30_000_000 and last.prompt_eval_duration == 12_500_000
    body = sent(upstream, "/v1/chat/completions")
    assert body["model"] == "tiny-chat" and body["stream"] is True
    assert body["temperature"] == 0.2 and body["max_tokens"] == 5 and body["top_k"] == 3
    assert "num_ctx" not in body and body["stream_options"] == {"include_usage": True}


def test_a_whole_chat_carries_images_in_and_tool_calls_out(client, upstream):
    gw, c = client
    upstream.on("/v1/chat/completions", scripted.json_reply({
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4}}))
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    r = c.chat(model="tiny-chat", stream=False, tools=tools, format="json",
               messages=[{"role": "user", "content": "what is this?", "images": [PNG]}])
    assert r.done and r.message.tool_calls[0].function.name == "weather"
    assert r.message.tool_calls[0].function.arguments == {"city": "Oslo"}
    assert r.prompt_eval_count == 9 and r.eval_count == 4
    body = sent(upstream, "/v1/chat/completions")
    text, image = body["messages"][0]["content"]
    assert text == {"type": "text", "text": "what is this?"}
    assert image["image_url"]["url"] == f"data:image/png;base64,{PNG}"
    assert body["tools"] == tools and body["response_format"] == {"type": "json_object"}
    assert body["stream"] is False


def test_generate_uses_the_template_unless_raw(client, upstream):
    gw, c = client
    upstream.on("/v1/chat/completions", scripted.events(*STREAM))
    parts = list(c.generate(model="tiny-chat", prompt="Say hello", system="Be brief", stream=True))
    assert "".join(p.response for p in parts) == "Hello" and parts[-1].done
    assert sent(upstream, "/v1/chat/completions")["messages"] == [
        {"role": "system", "content": "Be brief"}, {"role": "user", "content": "Say hello"}]
    upstream.on("/v1/completions", scripted.json_reply(
        {"choices": [{"index": 0, "text": " Paris.", "finish_reason": "length"}], "timings": TIMINGS}))
    r = c.generate(model="tiny-chat", prompt="Q: capital of France? A:", raw=True, stream=False)
    assert r.response == " Paris." and r.done_reason == "length" and r.eval_count == 3
    assert sent(upstream, "/v1/completions")["prompt"] == "Q: capital of France? A:"


def test_embeddings_in_both_shapes(client, upstream):
    gw, c = client
    upstream.on("/v1/embeddings", scripted.json_reply({
        "data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}],
        "usage": {"prompt_tokens": 4, "total_tokens": 4}}))
    r = c.embed(model="tiny-embed", input=["a", "b"])
    assert r.embeddings == [[1.0, 0.0], [0.0, 1.0]] and r.prompt_eval_count == 4  # in input order
    assert sent(upstream, "/v1/embeddings") == {"model": "tiny-embed", "input": ["a", "b"], "encoding_format": "float"}
    old = c.embeddings(model="tiny-embed", prompt="a")
    assert list(old.embedding) == [1.0, 0.0]


def test_errors_come_in_ollamas_shape(client, upstream):
    gw, c = client
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and "nope" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.embed(model="tiny-chat", input="x")  # a chat model cannot embed: llama-server's route refuses
    assert e.value.status_code == 400 and "embed" in e.value.error
    upstream.on("/v1/chat/completions", scripted.json_reply({"error": {"code": 400, "message": "bad grammar"}}, 400))
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="tiny-chat", messages=[{"role": "user", "content": "x"}], stream=False)
    assert e.value.status_code == 400 and e.value.error == "bad grammar"
    upstream.on("/v1/chat/completions", scripted.events(chunk("par"), {"error": {"code": 500, "message": "oom"}}))
    with pytest.raises(ollama.ResponseError, match="oom"):
        list(c.chat(model="tiny-chat", messages=[{"role": "user", "content": "x"}], stream=True))
    with pytest.raises(ollama.ResponseError) as e:
        c.pull("llama3")
    assert e.value.status_code == 501 and "podllama pull" in e.value.error
    bad = httpx.post(f"{gw.url}/api/chat", content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"].startswith("the body is not JSON")


def test_the_management_api_moved_to_admin_and_old_paths_say_so(client):
    gw, c = client
    old = httpx.get(f"{gw.url}/api/status", headers=gw.admin)
    assert old.status_code == 404 and "/admin/status" in old.json()["error"]
    assert httpx.get(f"{gw.url}/admin/status", headers=gw.admin).status_code == 200
    assert httpx.get(f"{gw.url}/admin/status").status_code == 401  # still the admin key's
    help_paths = {e["path"] for e in httpx.get(f"{gw.url}/help").json()["endpoints"]}
    assert {"/api/chat", "/api/tags", "/admin/status"} <= help_paths
    assert "/api/chat" in httpx.get(f"{gw.url}/openapi.json").json()["paths"]


def test_keys_and_scopes_hold_on_the_ollama_routes(gateway, upstream, monkeypatch):
    monkeypatch.setenv("PODLLAMA_API_KEYS", "sk-one")
    gw = gateway()
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=gw.url).list()
    assert e.value.status_code == 401
    c = ollama.Client(host=gw.url, headers={"Authorization": "Bearer sk-one"})
    assert {m.model for m in c.list().models} == {"tiny-chat", "tiny-embed"}
    upstream.on("/v1/embeddings", scripted.json_reply({"data": [{"index": 0, "embedding": [1.0]}]}))
    assert c.embed(model="tiny-embed", input="x").embeddings == [[1.0]]
    assert upstream.received("/v1/embeddings")[0].headers[b"authorization"] != b"Bearer sk-one"  # the server key


def test_a_cross_site_page_cannot_post_to_the_ollama_routes(client, upstream):
    gw, c = client
    r = httpx.post(f"{gw.url}/api/chat", headers={"Origin": "http://evil.example"},
                   json={"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 403 and not upstream.received("/v1/chat/completions")
    rebound = httpx.get(f"{gw.url}/api/tags", headers={"Host": "evil.example"})
    assert rebound.status_code == 421


def test_a_big_image_goes_through_whole_without_holding_the_event_loop(client, upstream):
    """A body over 1 MiB is parsed in the worker process and its long strings spliced back from a file: the
    server gets every byte of the image; the gateway's loop is never held long."""
    gw, c = client
    upstream.on("/v1/chat/completions", scripted.json_reply({
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "a cat"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2}}))
    big = PNG + base64.b64encode(bytes(range(256)) * 24_000).decode()  # about 8 MB of base64, a PNG's start
    lag = gw.gw.metrics.loop_lag
    lag.max = 0.0
    with control_loop() as control:  # what the machine's load costs any loop here, measured side by side
        r = c.chat(model="tiny-chat", stream=False, messages=[
            {"role": "user", "content": "what is this? \"quoted\" \u00e9", "images": [big]}])
    assert r.message.content == "a cat"
    body = sent(upstream, "/v1/chat/completions")
    text, image = body["messages"][0]["content"]
    assert text["text"] == "what is this? \"quoted\" \u00e9"
    assert image["image_url"]["url"] == f"data:image/png;base64,{big}", "the image arrived whole and unchanged"
    assert lag.max < 0.1 + control.max, f"the event loop was held for {lag.max * 1000:.0f} ms"
