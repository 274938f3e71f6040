"""/admin/config, /admin/reload, /admin/status, /admin/events, /admin/shutdown: the stack's services.toml read
and replaced, its state and each server's stages as they change, the whole stack stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

import tomlkit
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ....api import ADMIN_PREFIX
from ....engine import EngineError
from ....stack import Stack, changes
from ....stack.changes import ChangeError
from ....stack.conformance import shadow, verdict
from ....stack.supervisor import Supervisor
from ...front import jsonbody
from ...routing.feed import event_of
from ...routing.upstreams import Registry
from .common import DryRun, Following

KEEPALIVE = 15.0  # seconds between comment lines on a quiet /admin/events (proxies close silent connections)


def router(stack: Stack, following: Following, registry: Registry, supervisor: Supervisor) -> APIRouter:
    config = APIRouter(prefix=ADMIN_PREFIX, tags=["config"])

    @config.get("/config")
    def get_config(request: Request, format: str = Query("json")) -> Any:
        """The whole services.toml (JSON, or TOML with ?format=toml or Accept: application/toml), with its ETag."""
        try:
            text = changes.current_text(stack)
        except ChangeError as e:
            raise HTTPException(e.status, str(e)) from None
        etag = {"ETag": f'"{changes.version_of(text)}"'}
        if format == "toml" or "application/toml" in request.headers.get("accept", ""):
            return Response(text, media_type="application/toml", headers=etag)
        return Response(json.dumps(stack.cfg.model_dump(mode="json", exclude_none=True)),
                        media_type="application/json", headers=etag)

    @config.put("/config")
    async def put_config(request: Request, dry_run: DryRun = False) -> Any:
        """Replace services.toml (TOML, or JSON of the same shape). Validated, diffed, applied, saved."""
        body = await request.body()
        as_json = "json" in request.headers.get("content-type", "")

        def text(_: str) -> str:  # in the worker thread: a big config is rendered off the event loop
            if not as_json:
                return body.decode(errors="replace")
            try:
                return tomlkit.dumps(jsonbody.loads(body))
            except jsonbody.JsonProblem as e:
                raise ChangeError(e.status if e.status != 400 else 422, str(e)) from None

        return await run_in_threadpool(following.change, stack, text, request.headers.get("if-match"), dry_run)

    @config.post("/reload")
    async def reload() -> dict[str, Any]:
        """Read services.toml and the keys again now (`podllama start` calls this after an edit)."""
        await asyncio.to_thread(following.reload)
        await registry.refresh()
        await registry.probe_all()
        return {"version": following.version(), "error": following.error(), "servers": list(registry.servers)}

    @config.get("/status")
    def status() -> dict[str, Any]:
        """Every server's state and health, the supervisor's recent actions, the last update and the verdict of
        its conformance check, config problems."""

        def seen(engine: str) -> list[dict[str, Any]]:
            return [{"server": r.server, "container": r.container, "health": r.state, "address": r.host,
                     "engine": engine} for h in registry.handles.values() for r in h.replicas]

        if registry.orchestrated:  # an exported stack: the orchestrator runs the servers, DNS finds them
            servers = seen("none: an exported stack, run by its orchestrator")
        else:
            try:
                servers = stack.status()
            except EngineError as e:  # the engine cannot be asked: what the gateway itself sees
                servers = seen(f"cannot be asked: {e}")
        saved = stack.state.read()
        return {"stack": stack.name, "servers": servers, "supervisor": supervisor.events[-20:],
                "stages": {name: event_of(h) for name, h in registry.handles.items()},
                "changes": list(registry.feed.recent)[-20:],
                "engine_problem": supervisor.engine_problem, "last_update": saved.get("last_update"),
                "conformance": verdict.latest(stack.cfg.state_path / shadow.CHECKS),
                "config_version": following.version(), "config_error": following.error()}

    @config.get("/events")
    async def events() -> StreamingResponse:
        """Each server's phase and load stage (queued, making room, starting container, loading model, restoring
        prompt caches, ready …) as server-sent events: first where every server is now, then each change."""
        async def stream() -> AsyncIterator[str]:
            with registry.feed.follow() as queue:
                for h in list(registry.handles.values()):
                    yield f"data: {json.dumps(event_of(h))}\n\n"
                while True:
                    try:
                        yield f"data: {json.dumps(await asyncio.wait_for(queue.get(), KEEPALIVE))}\n\n"
                    except TimeoutError:
                        yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    @config.post("/shutdown", status_code=202)
    def shutdown() -> dict[str, Any]:
        """Stop every server and then the gateway itself."""
        def later() -> None:
            stack.stop()  # in a container this stops the gateway's own container too
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Timer(0.2, later).start()
        return {"stopping": list(stack.containers())}

    return config
