"""/admin/servers: each server's config and live status; add, change, remove, start, stop, restart, load,
unload; its logs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request

from ....api import ADMIN_PREFIX
from ....engine import EngineError
from ....stack import Stack, StackError, changes
from ....stack.supervisor import Supervisor
from ...front.auth import Caller
from ...front.guard import caller_of
from .common import DryRun, Existing, Following

Act = Callable[[str, Caller], Awaitable[dict[str, Any]]]


def router(stack: Stack, following: Following, supervisor: Supervisor, load: Act, unload: Act) -> APIRouter:
    """LOAD and UNLOAD: an on-demand server's, within the caller's limits (the gateway's)."""

    def change(edit: Callable[[str], str], request: Request, dry_run: bool) -> dict[str, Any]:
        return following.change(stack, edit, request.headers.get("if-match"), dry_run)

    def server_rows(name: str) -> list[dict[str, Any]]:
        return [r for r in stack.status() if r["server"] == name]

    servers = APIRouter(prefix=f"{ADMIN_PREFIX}/servers", tags=["servers"])

    @servers.get("")
    def list_servers() -> list[dict[str, Any]]:
        """Every server with its config and live status."""
        rows = stack.status()
        return [{"name": n, "config": s.model_dump(mode="json", exclude_none=True),
                 "replicas": [r for r in rows if r["server"] == n]} for n, s in stack.cfg.routable.items()]

    @servers.get("/{name}")
    def get_server(name: Existing) -> dict[str, Any]:
        """One server: config and live status."""
        return {"name": name, "config": stack.cfg.servers[name].model_dump(mode="json", exclude_none=True),
                "replicas": server_rows(name)}

    @servers.post("", status_code=201)
    def create_server(body: dict[str, Any], request: Request, dry_run: DryRun = False) -> dict[str, Any]:
        """Add a server ({name, role, model, …}); it is started."""
        name = body.pop("name", None)
        if not isinstance(name, str):
            raise HTTPException(422, 'body needs "name"')
        if name in stack.cfg.servers:
            raise HTTPException(409, f"server '{name}' exists; PUT or PATCH /admin/servers/{name} changes it")
        return change(lambda text: changes.with_server(text, name, body), request, dry_run)

    @servers.put("/{name}")
    def replace_server(name: str, body: dict[str, Any], request: Request, dry_run: DryRun = False) -> dict[str, Any]:
        """Replace a server's config (created if missing); only it restarts."""
        return change(lambda text: changes.with_server(text, name, body), request, dry_run)

    @servers.patch("/{name}")
    def patch_server(name: Existing, body: dict[str, Any], request: Request, dry_run: DryRun = False) -> dict[str, Any]:
        """Change some keys of a server (JSON merge patch: null removes a key); only it restarts."""
        def edit(text: str) -> str:
            merged = changes.merge_patch(changes.server_fields(stack.cfg, name), body)
            return changes.with_server(text, name, merged)

        return change(edit, request, dry_run)

    @servers.delete("/{name}")
    def delete_server(name: Existing, request: Request, dry_run: DryRun = False) -> dict[str, Any]:
        """Remove a server from the config; its containers go."""
        return change(lambda text: changes.with_server(text, name, None), request, dry_run)

    _lifecycle(servers, stack, supervisor, load, unload, server_rows)
    return servers


def _lifecycle(servers: APIRouter, stack: Stack, supervisor: Supervisor, load: Act, unload: Act,
               server_rows: Callable[[str], list[dict[str, Any]]]) -> None:
    """A server's lifecycle on SERVERS: start, stop, restart, load, unload, its logs."""

    def act(name: str, action: Callable[[list[str]], object], verb: str) -> dict[str, Any]:
        try:
            action([name])
        except StackError as e:
            raise HTTPException(500, str(e)) from None
        supervisor.refresh()
        return {"server": name, "action": verb, "replicas": server_rows(name)}

    @servers.post("/{name}/start")
    def start_server(name: Existing) -> dict[str, Any]:
        """Start a server (and wait until it is healthy)."""
        return act(name, stack.start, "start")

    @servers.post("/{name}/stop")
    def stop_server(name: Existing) -> dict[str, Any]:
        """Stop a server; the supervisor leaves it down."""
        return act(name, stack.stop, "stop")

    @servers.post("/{name}/restart")
    def restart_server(name: Existing) -> dict[str, Any]:
        """Recreate a server's containers, one at a time."""
        return act(name, stack.restart, "restart")

    @servers.post("/{name}/load")
    async def load_server(name: Existing, request: Request) -> dict[str, Any]:
        """Load an on-demand server now (room made in the memory budget as for a request); waits until it answers."""
        return await load(name, caller_of(request.scope))

    @servers.post("/{name}/unload")
    async def unload_server(name: Existing, request: Request) -> dict[str, Any]:
        """Stop an on-demand server (its prompt caches saved); its next request loads it again."""
        return await unload(name, caller_of(request.scope))

    @servers.get("/{name}/logs")
    def server_logs(name: Existing, tail: int = Query(100, ge=1, le=2000)) -> dict[str, Any]:
        """The last lines of each of the server's containers' logs."""
        try:
            return {"server": name, "replicas": {r["container"]: stack.tail(r["container"], lines=tail)
                                                 for r in server_rows(name) if r.get("container")}}
        except EngineError as e:
            raise HTTPException(503, f"the engine cannot be asked for logs: {e}") from None
