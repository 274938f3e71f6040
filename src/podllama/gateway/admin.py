"""The management API under /api: servers, config, builds and updates, shutdown. Admin key required."""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import tomlkit
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response

from .. import changes, hub
from ..changes import ChangeError
from ..stack import StackError
from ..store import StoreError
from .jobs import Jobs


class _Prefixed:
    """Routes registered on the app itself under a prefix, with shared dependencies (so /help and OpenAPI see
    them as plain routes)."""

    def __init__(self, app: FastAPI, prefix: str, **common: Any) -> None:
        self.app, self.prefix, self.common = app, prefix, common

    def __getattr__(self, method: str) -> Any:
        def decorator(path: str, **kw: Any) -> Any:
            return getattr(self.app, method)(self.prefix + path, **self.common, **kw)
        return decorator


def register(app: FastAPI, gw: Any) -> None:
    """The /api routes, on APP. GW: the gateway (stack, registry, supervisor, keys)."""

    def admin(request: Request) -> None:
        if not gw.keys.admin_ok(request.scope["headers"]):
            if not gw.keys.admin and gw.keys.public_bind:
                raise HTTPException(403, "the management API is closed on a published gateway without an admin "
                                         "key; set $PODLLAMA_ADMIN_KEY or [gateway] admin_key_file")
            raise HTTPException(401, "Invalid admin key")

    api = _Prefixed(app, "/api", dependencies=[Depends(admin)], tags=["management"])
    jobs = Jobs()

    def stack():
        return gw.stack

    def change(text: str, if_match: str | None, dry_run: bool) -> dict[str, Any]:
        try:
            proposed = changes.propose(stack(), text, if_match)
        except ChangeError as e:
            raise HTTPException(e.status, str(e)) from None
        if dry_run:
            return {"dry_run": True, "plan": proposed.plan.to_dict()}
        try:
            plan = changes.apply(proposed)
        except StackError as e:
            gw.adopt(proposed.stack)
            raise HTTPException(500, f"the change was saved but did not come up healthy: {e}") from None
        gw.adopt(proposed.stack)
        return {"dry_run": False, "plan": plan.to_dict(), "version": changes.version_of(text)}

    # -- servers ------------------------------------------------------------------------------------------
    @api.get("/servers")
    def list_servers() -> list[dict[str, Any]]:
        """Every server with its config and live status."""
        rows = stack().status()
        return [{"name": n, "config": s.model_dump(mode="json", exclude_none=True),
                 "replicas": [r for r in rows if r["server"] == n]} for n, s in stack().cfg.servers.items()]

    @api.get("/servers/{name}")
    def get_server(name: str) -> dict[str, Any]:
        """One server: config and live status."""
        st = stack()
        if name not in st.cfg.servers:
            raise HTTPException(404, f"no server named '{name}'")
        return {"name": name, "config": st.cfg.servers[name].model_dump(mode="json", exclude_none=True),
                "replicas": [r for r in st.status() if r["server"] == name]}

    @api.post("/servers", status_code=201)
    def create_server(body: dict[str, Any], dry_run: bool = Query(False), request: Request = None) -> dict[str, Any]:
        """Add a server ({name, role, model, …}); it is started."""
        name = body.pop("name", None)
        if not isinstance(name, str):
            raise HTTPException(422, "body needs \"name\"")
        text = changes.current_text(stack())
        if name in stack().cfg.servers:
            raise HTTPException(409, f"server '{name}' exists; PUT or PATCH /api/servers/{name} changes it")
        return change(changes.with_server(text, name, body), request.headers.get("if-match"), dry_run)

    @api.put("/servers/{name}")
    def replace_server(name: str, body: dict[str, Any], request: Request, dry_run: bool = Query(False)) -> dict[str, Any]:
        """Replace a server's config (created if missing); only it restarts."""
        text = changes.current_text(stack())
        return change(changes.with_server(text, name, body), request.headers.get("if-match"), dry_run)

    @api.patch("/servers/{name}")
    def patch_server(name: str, body: dict[str, Any], request: Request, dry_run: bool = Query(False)) -> dict[str, Any]:
        """Change some keys of a server (JSON merge patch: null removes a key); only it restarts."""
        st = stack()
        if name not in st.cfg.servers:
            raise HTTPException(404, f"no server named '{name}'")
        merged = changes.merge_patch(changes.server_fields(st.cfg, name), body)
        return change(changes.with_server(changes.current_text(st), name, merged), request.headers.get("if-match"), dry_run)

    @api.delete("/servers/{name}")
    def delete_server(name: str, request: Request, dry_run: bool = Query(False)) -> dict[str, Any]:
        """Remove a server from the config; its containers go."""
        if name not in stack().cfg.servers:
            raise HTTPException(404, f"no server named '{name}'")
        return change(changes.with_server(changes.current_text(stack()), name, None), request.headers.get("if-match"), dry_run)

    @api.post("/servers/{name}/{action}")
    def server_action(name: str, action: str) -> dict[str, Any]:
        """start, stop or restart one server."""
        st = stack()
        if name not in st.cfg.servers:
            raise HTTPException(404, f"no server named '{name}'")
        try:
            if action == "start":
                st.start([name])
            elif action == "stop":
                st.stop([name])
            elif action == "restart":
                st.restart([name])
            else:
                raise HTTPException(404, f"unknown action '{action}'; use start, stop or restart")
        except StackError as e:
            raise HTTPException(500, str(e)) from None
        gw.supervisor.refresh()
        return {"server": name, "action": action, "replicas": [r for r in st.status() if r["server"] == name]}

    # -- config -------------------------------------------------------------------------------------------
    @api.get("/config")
    def get_config(response: Response, request: Request, format: str = Query("json")) -> Any:
        """The whole services.toml (JSON, or TOML with ?format=toml or Accept: application/toml), with its ETag."""
        text = changes.current_text(stack())
        response.headers["ETag"] = f'"{changes.version_of(text)}"'
        if format == "toml" or "application/toml" in request.headers.get("accept", ""):
            return Response(text, media_type="application/toml", headers={"ETag": f'"{changes.version_of(text)}"'})
        return stack().cfg.model_dump(mode="json", exclude_none=True)

    @api.put("/config")
    async def put_config(request: Request, dry_run: bool = Query(False)) -> Any:
        """Replace services.toml (TOML, or JSON of the same shape). Validated, diffed, applied, saved."""
        raw = (await request.body()).decode()
        if "json" in request.headers.get("content-type", ""):
            try:
                raw = tomlkit.dumps(json.loads(raw))
            except ValueError as e:
                raise HTTPException(422, f"body is not JSON: {e}") from None
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(change, raw, request.headers.get("if-match"), dry_run)

    @api.patch("/config/servers/{name}")
    def patch_config_server(name: str, body: dict[str, Any], request: Request, dry_run: bool = Query(False)) -> dict[str, Any]:
        """Same as PATCH /api/servers/{name}."""
        return patch_server(name, body, request, dry_run)

    # -- builds and updates -------------------------------------------------------------------------------
    @api.post("/jobs/{kind}", status_code=202)
    def start_job(kind: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start an update ({ref, remote}) or a rebuild ({variant}); poll /api/jobs/{id}."""
        from .. import update as upd

        body = body or {}
        if kind == "update":
            work = lambda job: upd.update(stack(), body.get("ref", "HEAD"), body.get("remote"), progress=job.lines.append)  # noqa: E731
        elif kind == "rebuild":
            variant = body.get("variant")
            work = lambda job: upd.rebuild(stack(), [variant] if variant else None, progress=job.lines.append)  # noqa: E731
        else:
            raise HTTPException(404, f"unknown job '{kind}'; use update or rebuild (or POST /api/models/pull)")
        try:
            job = jobs.start(kind, body, work)
        except RuntimeError as e:
            raise HTTPException(409, str(e)) from None
        return job.to_dict()

    @api.get("/jobs")
    def list_jobs() -> list[dict[str, Any]]:
        """Jobs started since the gateway started."""
        return [j.to_dict() for j in jobs.jobs.values()]

    @api.get("/jobs/{job_id}")
    def get_job(job_id: str, log: bool = Query(False)) -> dict[str, Any]:
        """A job's state, its last progress line, and (?log=1) every line."""
        job = jobs.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job '{job_id}'")
        return job.to_dict(with_log=log)

    @api.get("/jobs/{job_id}/events")
    async def job_events(job_id: str) -> Any:
        """The job's progress as server-sent events (one JSON event per change), until it ends."""
        import asyncio

        from fastapi.responses import StreamingResponse

        job = jobs.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job '{job_id}'")

        async def events():
            last = None
            while True:
                now = json.dumps(job.to_dict())
                if now != last:
                    yield f"data: {now}\n\n"
                    last = now
                if job.state != "running":
                    return
                await asyncio.sleep(0.25)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    @api.delete("/jobs/{job_id}", status_code=202)
    def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel a job (a download stops at once and resumes on the next pull)."""
        job = jobs.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job '{job_id}'")
        job.cancel.set()
        return job.to_dict()

    # -- models -------------------------------------------------------------------------------------------
    @api.get("/models")
    def list_models() -> list[dict[str, Any]]:
        """Models in the store: files, size, source, revision, which servers use them."""
        return hub.listing(stack().store, stack().cfg.servers)

    @api.get("/models/usage")
    def models_usage() -> dict[str, Any]:
        """Disk used by the model store, partial downloads, free space."""
        return stack().store.usage()

    @api.post("/models/pull", status_code=202)
    def pull_model(body: dict[str, Any]) -> dict[str, Any]:
        """Download {ref, revision?, mmproj?} from Hugging Face as a job; follow /api/jobs/{id}/events."""
        ref = body.get("ref")
        if not isinstance(ref, str):
            raise HTTPException(422, 'body needs "ref": "ORG/REPO[:QUANT]"')
        try:
            hub.parse_ref(ref)
        except (hub.PullError, StoreError) as e:
            raise HTTPException(422, str(e)) from None
        st = stack()

        def work(job):
            def progress(name: str, done: int, total: int) -> None:
                job.progress[name] = {"done": done, "total": total}

            return hub.pull(st.store, ref, revision=body.get("revision"), mmproj=body.get("mmproj", True),
                            hf_token=hub.token(st.cfg.hub_token_file), hub=st.cfg.hub.endpoint, progress=progress,
                            cancel=job.cancel, say=job.lines.append)

        try:
            return jobs.start("pull", {"ref": ref}, work).to_dict()
        except RuntimeError as e:
            raise HTTPException(409, str(e)) from None

    @api.delete("/models/{model_id:path}")
    def delete_model(model_id: str, force: bool = Query(False)) -> dict[str, Any]:
        """Remove a model; refused (409) while a running server uses it, unless ?force=1 (which stops them)."""
        try:
            removed, stopped = stack().remove_model(model_id, force)
        except StoreError as e:
            raise HTTPException(404 if "no model" in str(e) else 409, str(e)) from None
        return {"removed": removed, "stopped": stopped}

    # -- the whole stack ----------------------------------------------------------------------------------
    @api.get("/status")
    def status() -> dict[str, Any]:
        """Every server's state and health, the supervisor's recent actions, the last update."""
        st = stack()
        return {"stack": st.name, "servers": st.status(), "supervisor": gw.supervisor.events[-20:],
                "last_update": st.state.read().get("last_update")}

    @api.post("/shutdown", status_code=202)
    def shutdown() -> dict[str, Any]:
        """Stop every server and then the gateway itself."""
        def later() -> None:
            stack().stop()  # in a container this stops the gateway's own container too
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Timer(0.2, later).start()
        return {"stopping": [n for n in stack().containers()]}
