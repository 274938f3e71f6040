"""/help and the OpenAPI document, generated from the route table, the management routes and the live config."""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from ..front.auth import Keys
from ..front.guard import Access, access_of_own
from ..routing.routes import ENDPOINTS, PASSTHROUGH, Endpoint
from ..routing.upstreams import Registry
from .ollama import ROUTES as OLLAMA_ROUTES


def _routes_to(ep: Endpoint, registry: Registry, visible: set[str] | None) -> str:
    """Where EP goes now, naming only the VISIBLE servers (None: all)."""
    if ep.scope == "gateway":
        return "the gateway itself"
    default = registry.default(ep.roles)
    if visible is not None and default not in visible:
        default = None
    if ep.scope == "server":
        return f"?server=NAME or ?model=NAME, else '{default}'" if default else "?server=NAME or ?model=NAME"
    servers = [s for s in registry.servers_with_role(ep.roles) if visible is None or s in visible]
    if not servers:
        return f"nothing here: needs a server with role {' or '.join(ep.roles)}"
    others = [s for s in servers if s != default]
    return (f"'{default}'; by model: " if default else "by model: ") + ", ".join(others) if others else f"'{default}'"


def entries(app: FastAPI, registry: Registry, keys: Keys, visible: set[str] | None = None) -> list[dict[str, Any]]:
    """Every endpoint; where each routes names only the VISIBLE servers (None: all; what a scoped key, or a
    caller without a key, may hear of)."""
    inference = Access.INFERENCE.value if keys.any_inference else "no key (none configured)"
    out = []
    for ep in ENDPOINTS:
        out.append({
            "name": ep.name, "methods": list(ep.methods), "path": ep.paths[0] + ("{id}" if ep.prefix else ""),
            "aliases": [p + ("{id}" if ep.prefix else "") for p in ep.paths[1:]],
            "purpose": ep.purpose, "params": list(ep.params), "streams": ep.streams,
            "routes_to": _routes_to(ep, registry, visible), "roles": list(ep.roles) if ep.scope == "model" else [],
            "llama_server_flag": ep.flag, "auth": "public" if ep.name == "health" else inference,
        })
    out.append({"name": "passthrough", "methods": ["*"], "path": f"{PASSTHROUGH}{{name}}/{{path}}", "aliases": [],
                "purpose": "Anything, passed through to one server (its web UI, routes added upstream later …)",
                "params": [], "streams": True,
                "routes_to": ", ".join(s for s in registry.servers if visible is None or s in visible) or "no servers",
                "roles": [], "llama_server_flag": None, "auth": inference})
    for r in OLLAMA_ROUTES:
        out.append({"name": "ollama" + r.path.removeprefix("/api").replace("/", "."), "methods": [r.method],
                    "path": r.path, "aliases": [], "purpose": r.purpose, "params": [], "streams": r.streams,
                    "routes_to": f"{r.upstream} of the model's server" if r.upstream else "the gateway itself",
                    "roles": [], "llama_server_flag": None, "auth": inference})
    own: dict[str, dict[str, Any]] = {}
    for route in app.routes:
        if not isinstance(route, APIRoute) or route.path in ("/health", "/v1/health", "/v1/models", "/models", "/metrics"):
            continue
        methods = sorted((route.methods or set()) - {"HEAD"})
        text = (route.description or route.summary or "").strip()
        purpose = f"{'/'.join(methods)}: {text.splitlines()[0] if text else route.name}"
        entry = own.get(route.path)
        if entry is not None:  # one entry per path, with every method it has
            entry["methods"] = sorted(set(entry["methods"]) | set(methods))
            entry["purpose"] += f"; {purpose}"
            entry["params"] = sorted(set(entry["params"]) | {p.name for p in route.dependant.query_params})
            continue
        own[route.path] = {
            "name": route.name, "methods": methods, "path": route.path, "aliases": [], "purpose": purpose,
            "params": [p.name for p in route.dependant.query_params] + [p.name for p in route.dependant.path_params],
            "streams": False, "routes_to": "the gateway itself", "roles": [], "llama_server_flag": None,
            "auth": inference if access_of_own(route.path) is Access.INFERENCE else access_of_own(route.path).value,
        }
        out.append(own[route.path])
    return out


def render_html(items: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td><code>{html.escape(' '.join(e['methods']))}</code></td><td><code>{html.escape(e['path'])}</code>"
        f"{''.join(f'<br><code>{html.escape(a)}</code>' for a in e['aliases'])}</td>"
        f"<td>{html.escape(e['purpose'])}</td><td>{html.escape(', '.join(e['params']))}</td>"
        f"<td>{html.escape(e['routes_to'])}</td><td>{html.escape(e['auth'])}</td></tr>"
        for e in items)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>podllama gateway</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}</style></head><body>"
            "<h1>podllama gateway</h1><p>Every endpoint, where it routes now, and what it needs. "
            "JSON: <code>GET /help</code> with <code>Accept: application/json</code>; OpenAPI: "
            "<a href='/openapi.json'>/openapi.json</a>.</p><table><tr><th>method</th><th>path</th><th>purpose</th>"
            f"<th>parameters</th><th>routes to</th><th>auth</th></tr>{rows}</table></body></html>")


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for the gateway's own routes, plus every proxied llama-server route of the table."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="One port for a stack of llama-servers. See /help.")
    for ep in ENDPOINTS:
        if ep.scope == "gateway":
            continue
        for path in ep.paths:
            item = doc["paths"].setdefault(path + ("{id}" if ep.prefix else ""), {})
            for method in ep.methods:
                op: dict[str, Any] = {
                    "summary": ep.purpose.split(";")[0], "description": ep.purpose, "operationId": f"{ep.name}_{method}_{path}",
                    "tags": [f"llama-server ({ep.capability})"],
                    "parameters": [{"name": p, "in": "query", "required": False, "schema": {"type": "string"}}
                                   for p in ("server", "model") if p in ep.params and ep.scope == "server"],
                    "responses": {"200": {"description": "llama-server's answer, passed through"},
                                  "503": {"description": "the server is down or still loading (Retry-After)"}},
                }
                if method == "POST":
                    op["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
                item[method.lower()] = op
    for r in OLLAMA_ROUTES:
        doc["paths"].setdefault(r.path, {})[r.method.lower()] = {
            "summary": r.purpose, "operationId": f"ollama_{r.method}_{r.path}", "tags": ["Ollama API"],
            "responses": {"200": {"description": "Ollama's shape" + (" (NDJSON when streamed)" if r.streams else "")}},
            **({"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}}}
               if r.method == "POST" else {})}
    return doc


def markdown() -> str:
    """The llama-server routes of the table as a Markdown reference (docs/api.md is this, generated)."""
    lines = ["| method | path (aliases) | what | main parameters | served by role | needs flag | streams |",
             "|---|---|---|---|---|---|---|"]
    for ep in ENDPOINTS:
        paths = "<br>".join(f"`{p}{'{id}' if ep.prefix else ''}`" for p in ep.paths)
        roles = "the gateway" if ep.scope == "gateway" else (
            "one server: `?server=`/`?model=`, else the chat default" if ep.scope == "server" else ", ".join(ep.roles))
        lines.append(f"| {' '.join(ep.methods)} | {paths} | {ep.purpose} | {', '.join(f'`{p}`' for p in ep.params)} | "
                     f"{roles} | {f'`{ep.flag}`' if ep.flag else ''} | {'yes' if ep.streams else ''} |")
    return "\n".join(lines) + "\n"
