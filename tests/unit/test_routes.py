"""The route table: complete, consistent, and the documentation generated from it."""

import typing

from podllama.config import Role
from podllama.gateway.apis import help as helpdoc
from podllama.gateway.routing.routes import CAPABILITY_ROLES, ENDPOINTS, RouteTable

# Every route llama-server registers at the pinned commit (tools/server/server.cpp), router-only routes aside.
LLAMA_SERVER_ROUTES = {
    ("POST", "/completion"), ("POST", "/completions"), ("POST", "/v1/completions"), ("POST", "/chat/completions"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/chat/completions/control"), ("POST", "/v1/responses"),
    ("POST", "/responses"), ("POST", "/v1/audio/transcriptions"), ("POST", "/audio/transcriptions"),
    ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"), ("POST", "/chat/completions/input_tokens"),
    ("POST", "/v1/chat/completions/input_tokens"), ("POST", "/responses/input_tokens"),
    ("POST", "/v1/responses/input_tokens"), ("POST", "/infill"), ("POST", "/embedding"), ("POST", "/embeddings"),
    ("POST", "/v1/embeddings"), ("POST", "/rerank"), ("POST", "/reranking"), ("POST", "/v1/rerank"),
    ("POST", "/v1/reranking"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("POST", "/apply-template"),
    ("GET", "/props"), ("POST", "/props"), ("GET", "/models"), ("GET", "/v1/models"), ("GET", "/slots"),
    ("GET", "/metrics"), ("GET", "/lora-adapters"), ("POST", "/lora-adapters"), ("GET", "/health"),
    ("GET", "/v1/health"), ("GET", "/v1/stream"), ("DELETE", "/v1/stream"), ("POST", "/v1/streams/lookup"),
    ("GET", "/tools"), ("POST", "/tools"), ("GET", "/cors-proxy"), ("POST", "/cors-proxy"),
}


def test_the_table_has_every_llama_server_route():
    table = RouteTable.build()
    missing = {(m, p) for m, p in LLAMA_SERVER_ROUTES if table.match(m, p) is None}
    assert missing == set()
    assert table.match("POST", "/slots/0").name == "slots.action"
    assert table.match("POST", "/slots/") is None and table.match("GET", "/nope") is None


def test_entries_are_consistent():
    names = [ep.name for ep in ENDPOINTS]
    assert len(names) == len(set(names))
    for ep in ENDPOINTS:
        assert ep.capability in CAPABILITY_ROLES and ep.purpose and ep.paths
        assert ep.scope in ("model", "server", "gateway")
        assert all(p.startswith("/") for p in ep.paths)
    roles = {ep.name: ep.roles for ep in ENDPOINTS}
    assert roles["embeddings.oai"] == ("embedding",) and roles["rerank"] == ("rerank",)
    assert roles["audio.transcriptions"] == ("transcription", "audio") and roles["chat.completions"][0] == "chat"
    assert roles["images.generations"] == ("image",) and roles["audio.speech"] == ("speech",)
    every_role = set(typing.get_args(Role))
    assert {r for rs in CAPABILITY_ROLES.values() for r in rs} == every_role, "each role serves something"
    for role in every_role:  # each role's server kind has a route of its own
        assert any(role in ep.roles and ep.scope == "model" for ep in ENDPOINTS), role


def test_docs_api_md_is_generated_from_the_table(project_root):
    text = (project_root / "docs" / "api.md").read_text()
    assert helpdoc.markdown() in text, "docs/api.md is stale: regenerate it with `podllama endpoints`"
