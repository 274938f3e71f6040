"""The management API under /admin: servers, config, builds and updates, models, keys and usage, the whole stack. The guard lets
only admin-key holders in (401 before the body is read); here every body is a typed model, so a value that
would reach git, podman or llama-server is checked before any work starts (422)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any

import tomlkit
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.concurrency import run_in_threadpool

from .. import changes, hub, usage, validate
from ..api import ADMIN_PREFIX
from ..changes import ChangeError
from ..config import VariantName
from ..database import DatabaseError
from ..engine import EngineError
from ..keys import KeyProblem, KeyStore, NewKey
from ..stack import StackError
from ..store import ModelNotFound, StoreError
from . import jsonbody
from .jobs import Job, Jobs

if TYPE_CHECKING:
    from .app import Gateway


# -- request bodies -----------------------------------------------------------------------------------------------
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpdateJob(Body):
    ref: str = "HEAD"
    remote: str | None = None

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str) -> str:
        return validate.git_ref(v)

    @field_validator("remote")
    @classmethod
    def _remote(cls, v: str | None) -> str | None:
        return None if v is None else validate.git_remote(v)


class NewKeyBody(Body):
    name: str
    models: list[str] = []
    servers: list[str] = []
    roles: list[str] = []
    admin: bool = False
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    expires: str | None = None


class RebuildJob(Body):
    variant: VariantName | None = None


class PullJob(Body):
    ref: str
    revision: str | None = None
    mmproj: bool = True

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str) -> str:
        try:
            hub.parse_ref(v)
        except (hub.PullError, StoreError) as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        return None if v is None else validate.revision(v)


DryRun = Annotated[bool, Query(description="Only plan: what would start, restart or stop")]


def existing(name: str, request: Request) -> str:
    """The server named in the path, which must exist."""
    cfg = request.app.state.gateway.stack.cfg
    servers = cfg.servers
    if name in cfg.remotes:
        raise HTTPException(409, f"server '{name}' is remote ({cfg.remotes[name].url}): podllama routes to it but "
                                 "does not run it; change it in services.toml (PUT /admin/config)")
    if name not in servers:
        raise HTTPException(404, f"no server named '{name}'; servers: {', '.join(servers)}")
    return name


def existing_job(job_id: str, request: Request) -> Job:
    job: Job | None = request.app.state.jobs.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job '{job_id}'")
    return job


Existing = Annotated[str, Depends(existing)]
ExistingJob = Annotated[Job, Depends(existing_job)]


def routers(gw: Gateway, jobs: Jobs) -> list[APIRouter]:
    """The /admin routers, bound to GW (the gateway: stack, registry, supervisor) and its JOBS."""

    def change(edit: Callable[[str], str], if_match: str | None, dry_run: bool) -> dict[str, Any]:
        try:
            done = changes.submit(gw.stack, edit, if_match, dry_run)
        except ChangeError as e:
            raise HTTPException(e.status, str(e)) from None
        except StackError as e:
            gw.reload()
            raise HTTPException(500, f"the change was saved but did not come up healthy: {e}") from None
        if dry_run:
            return {"dry_run": True, "plan": done.plan.to_dict()}
        gw.adopt(done.stack)
        return {"dry_run": False, "plan": done.plan.to_dict(), "version": changes.version_of(done.text)}

    def server_rows(name: str) -> list[dict[str, Any]]:
        return [r for r in gw.stack.status() if r["server"] == name]

    # -- servers ------------------------------------------------------------------------------------------------
    servers = APIRouter(prefix=f"{ADMIN_PREFIX}/servers", tags=["servers"])

    @servers.get("")
    def list_servers() -> list[dict[str, Any]]:
        """Every server with its config and live status."""
        rows = gw.stack.status()
        return [{"name": n, "config": s.model_dump(mode="json", exclude_none=True),
                 "replicas": [r for r in rows if r["server"] == n]} for n, s in gw.stack.cfg.routable.items()]

    @servers.get("/{name}")
    def get_server(name: Existing) -> dict[str, Any]:
        """One server: config and live status."""
        return {"name": name, "config": gw.stack.cfg.servers[name].model_dump(mode="json", exclude_none=True),
                "replicas": server_rows(name)}

    @servers.post("", status_code=201)
    def create_server(body: dict[str, Any], request: Request, dry_run: DryRun = False) -> dict[str, Any]:
        """Add a server ({name, role, model, …}); it is started."""
        name = body.pop("name", None)
        if not isinstance(name, str):
            raise HTTPException(422, 'body needs "name"')
        if name in gw.stack.cfg.servers:
            raise HTTPException(409, f"server '{name}' exists; PUT or PATCH /admin/servers/{name} changes it")
        return change(lambda text: changes.with_server(text, name, body), request.headers.get("if-match"), dry_run)

    @servers.put("/{name}")
    def replace_server(name: str, body: dict[str, Any], request: Request, dry_run: DryRun = False) -> dict[str, Any]:
        """Replace a server's config (created if missing); only it restarts."""
        return change(lambda text: changes.with_server(text, name, body), request.headers.get("if-match"), dry_run)

    @servers.patch("/{name}")
    def patch_server(name: Existing, body: dict[str, Any], request: Request, dry_run: DryRun = False) -> dict[str, Any]:
        """Change some keys of a server (JSON merge patch: null removes a key); only it restarts."""
        def edit(text: str) -> str:
            merged = changes.merge_patch(changes.server_fields(gw.stack.cfg, name), body)
            return changes.with_server(text, name, merged)

        return change(edit, request.headers.get("if-match"), dry_run)

    @servers.delete("/{name}")
    def delete_server(name: Existing, request: Request, dry_run: DryRun = False) -> dict[str, Any]:
        """Remove a server from the config; its containers go."""
        return change(lambda text: changes.with_server(text, name, None), request.headers.get("if-match"), dry_run)

    def act(name: str, action: Callable[[list[str]], object], verb: str) -> dict[str, Any]:
        try:
            action([name])
        except StackError as e:
            raise HTTPException(500, str(e)) from None
        gw.supervisor.refresh()
        return {"server": name, "action": verb, "replicas": server_rows(name)}

    @servers.post("/{name}/start")
    def start_server(name: Existing) -> dict[str, Any]:
        """Start a server (and wait until it is healthy)."""
        return act(name, gw.stack.start, "start")

    @servers.post("/{name}/stop")
    def stop_server(name: Existing) -> dict[str, Any]:
        """Stop a server; the supervisor leaves it down."""
        return act(name, gw.stack.stop, "stop")

    @servers.post("/{name}/restart")
    def restart_server(name: Existing) -> dict[str, Any]:
        """Recreate a server's containers, one at a time."""
        return act(name, gw.stack.restart, "restart")

    @servers.post("/{name}/load")
    async def load_server(name: Existing, request: Request) -> dict[str, Any]:
        """Load an on-demand server now (room made in the memory budget as for a request); waits until it answers."""
        return await gw.load(name, gw.caller_of(request.scope))

    @servers.post("/{name}/unload")
    async def unload_server(name: Existing, request: Request) -> dict[str, Any]:
        """Stop an on-demand server (its prompt caches saved); its next request loads it again."""
        return await gw.unload(name, gw.caller_of(request.scope))

    @servers.get("/{name}/logs")
    def server_logs(name: Existing, tail: int = Query(100, ge=1, le=2000)) -> dict[str, Any]:
        """The last lines of each of the server's containers' logs."""
        try:
            return {"server": name, "replicas": {r["container"]: gw.stack.tail(r["container"], lines=tail)
                                                 for r in server_rows(name) if r.get("container")}}
        except EngineError as e:
            raise HTTPException(503, f"the engine cannot be asked for logs: {e}") from None

    # -- config -------------------------------------------------------------------------------------------------
    config = APIRouter(prefix=ADMIN_PREFIX, tags=["config"])

    @config.get("/config")
    def get_config(request: Request, format: str = Query("json")) -> Any:
        """The whole services.toml (JSON, or TOML with ?format=toml or Accept: application/toml), with its ETag."""
        try:
            text = changes.current_text(gw.stack)
        except ChangeError as e:
            raise HTTPException(e.status, str(e)) from None
        etag = {"ETag": f'"{changes.version_of(text)}"'}
        if format == "toml" or "application/toml" in request.headers.get("accept", ""):
            return Response(text, media_type="application/toml", headers=etag)
        return Response(json.dumps(gw.stack.cfg.model_dump(mode="json", exclude_none=True)),
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

        return await run_in_threadpool(change, text, request.headers.get("if-match"), dry_run)

    @config.post("/reload")
    async def reload() -> dict[str, Any]:
        """Read services.toml and the keys again now (`podllama start` calls this after an edit)."""
        await asyncio.to_thread(gw.reload)
        await gw.registry.refresh()
        await gw.registry.probe_all()
        return {"version": gw.version(), "error": gw.config_error, "servers": list(gw.registry.servers)}

    @config.get("/status")
    def status() -> dict[str, Any]:
        """Every server's state and health, the supervisor's recent actions, the last update, config problems."""
        st = gw.stack

        def seen(engine: str) -> list[dict[str, Any]]:
            return [{"server": r.server, "container": r.container, "health": r.state, "address": r.host,
                     "engine": engine} for h in gw.registry.handles.values() for r in h.replicas]

        if gw.registry.orchestrated:  # an exported stack: the orchestrator runs the servers, DNS finds them
            servers = seen("none: an exported stack, run by its orchestrator")
        else:
            try:
                servers = st.status()
            except EngineError as e:  # the engine cannot be asked: what the gateway itself sees
                servers = seen(f"cannot be asked: {e}")
        saved = st.state.read()
        return {"stack": st.name, "servers": servers, "supervisor": gw.supervisor.events[-20:],
                "engine_problem": gw.supervisor.engine_problem, "last_update": saved.get("last_update"),
                "config_version": gw.version(), "config_error": gw.config_error}

    @config.post("/shutdown", status_code=202)
    def shutdown() -> dict[str, Any]:
        """Stop every server and then the gateway itself."""
        def later() -> None:
            gw.stack.stop()  # in a container this stops the gateway's own container too
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Timer(0.2, later).start()
        return {"stopping": list(gw.stack.containers())}

    # -- builds, updates and downloads (jobs) ---------------------------------------------------------------------
    job_api = APIRouter(prefix=ADMIN_PREFIX, tags=["jobs"])

    def run_job(kind: str, params: dict[str, Any], work: Callable[[Job], Any]) -> dict[str, Any]:
        try:
            return jobs.start(kind, params, work).to_dict()
        except RuntimeError as e:
            raise HTTPException(409, str(e)) from None

    @job_api.post("/jobs/update", status_code=202)
    def update_job(body: UpdateJob | None = None) -> dict[str, Any]:
        """Move llama.cpp to {ref} (from {remote}), build, restart servers; rolled back on failure."""
        from .. import update as upd

        job = body or UpdateJob()
        return run_job("update", job.model_dump(), lambda j: upd.update(
            gw.stack, job.ref, job.remote, progress=j.lines.append))

    @job_api.post("/jobs/rebuild", status_code=202)
    def rebuild_job(body: RebuildJob | None = None) -> dict[str, Any]:
        """Build the stack's images again ({variant}) and restart servers on them; rolled back on failure."""
        from .. import update as upd

        job = body or RebuildJob()
        variants: list[str] | None = [job.variant] if job.variant and job.variant != "auto" else None
        return run_job("rebuild", job.model_dump(), lambda j: upd.rebuild(gw.stack, variants, progress=j.lines.append))

    @job_api.post("/jobs/{kind}", include_in_schema=False)
    def unknown_job(kind: str) -> None:
        raise HTTPException(404, f"no job kind '{kind}'; POST /admin/jobs/update, /admin/jobs/rebuild or /admin/models/pull")

    @job_api.get("/jobs")
    def list_jobs() -> list[dict[str, Any]]:
        """Jobs started since the gateway started."""
        return [j.to_dict() for j in jobs.jobs.values()]

    @job_api.get("/jobs/{job_id}")
    def get_job(job: ExistingJob, log: bool = Query(False)) -> dict[str, Any]:
        """A job's state, its last progress line, and (?log=1) every line."""
        return job.to_dict(with_log=log)

    @job_api.get("/jobs/{job_id}/events")
    async def job_events(job: ExistingJob) -> StreamingResponse:
        """The job's progress as server-sent events (one JSON event per change), until it ends."""
        async def events() -> AsyncIterator[str]:
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

    @job_api.delete("/jobs/{job_id}", status_code=202)
    def cancel_job(job: ExistingJob) -> dict[str, Any]:
        """Cancel a job (a download stops at once and resumes on the next pull)."""
        job.cancel.set()
        return job.to_dict()

    # -- models -------------------------------------------------------------------------------------------------
    models = APIRouter(prefix=f"{ADMIN_PREFIX}/models", tags=["models"])

    @models.get("")
    def list_models() -> list[dict[str, Any]]:
        """Models in the store: files, size, source, revision, which servers use them."""
        return hub.listing(gw.stack.store, gw.stack.cfg.servers)

    @models.get("/usage")
    def models_usage() -> dict[str, Any]:
        """Disk used by the model store, partial downloads, free space."""
        return gw.stack.store.usage()

    @models.post("/pull", status_code=202)
    def pull_model(body: PullJob) -> dict[str, Any]:
        """Download {ref, revision?, mmproj?} from Hugging Face as a job; follow /admin/jobs/{id}/events."""
        st = gw.stack

        def work(job: Job) -> Any:
            def progress(name: str, done: int, total: int) -> None:
                job.progress[name] = {"done": done, "total": total}

            return hub.pull(st.store, body.ref, revision=body.revision, mmproj=body.mmproj,
                            hf_token=gw.credentials.hub_token(st.cfg), hub=gw.credentials.hub_endpoint(st.cfg),
                            progress=progress, cancel=job.cancel, say=job.lines.append)

        return run_job("pull", {"ref": body.ref}, work)

    @models.post("/verify")
    def verify_models(model_id: str | None = Query(None, alias="model")) -> dict[str, Any]:
        """Re-check every byte of the stored models (or of ?model=ID) against their manifests: {id: [problems]}."""
        try:
            report = gw.stack.store.verify(model_id)
        except ModelNotFound as e:
            raise HTTPException(404, str(e)) from None
        return {"ok": not any(report.values()), "models": report}

    @models.delete("/{model_id:path}")
    def delete_model(model_id: str, force: bool = Query(False)) -> dict[str, Any]:
        """Remove a model; refused (409) while a running server uses it, unless ?force=1 (which stops them)."""
        try:
            removed, stopped = gw.stack.remove_model(model_id, force)
        except ModelNotFound as e:
            raise HTTPException(404, str(e)) from None
        except StoreError as e:
            raise HTTPException(409, str(e)) from None
        return {"removed": removed, "stopped": stopped}

    # -- keys and usage ---------------------------------------------------------------------------------------
    access = APIRouter(prefix=ADMIN_PREFIX, tags=["keys and usage"])

    def database_call(work: Callable[[], Any]) -> Any:
        try:
            return work()
        except KeyProblem as e:
            raise HTTPException(400, str(e)) from None
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        except DatabaseError as e:
            raise HTTPException(503, str(e)) from None

    @access.get("/keys")
    def list_keys(every: bool = Query(False, alias="all")) -> list[dict[str, Any]]:
        """The keys (never the keys themselves): scope, limits, expiry, state; ?all=1 with revoked ones."""
        keys = database_call(lambda: KeyStore(gw.database).list())
        return [k.public() for k in keys if every or k.state == "active"]

    @access.post("/keys", status_code=201)
    def create_key(body: NewKeyBody) -> dict[str, Any]:
        """Make a key; the answer holds it, once ("key"); the gateway takes it at once."""
        key, secret = database_call(lambda: KeyStore(gw.database).create(NewKey(**body.model_dump()), gw.stack.cfg))
        gw.requests.read_keys()
        return {**key.public(), "key": secret}

    @access.delete("/keys/{key_id}")
    def revoke_key(key_id: str) -> dict[str, Any]:
        """Revoke a key (by id or name); refused from then on."""
        key = database_call(lambda: KeyStore(gw.database).revoke(key_id))
        gw.requests.read_keys()
        return dict(key.public())

    @access.get("/usage")
    def get_usage(by: str = Query("key", description="key | model | server | route"),
                  since: str = Query("24h", description="a span (30m, 24h, 7d) or a date")) -> list[dict[str, Any]]:
        """Requests, errors, tokens and latency from the request log."""
        return list(database_call(lambda: usage.summary(gw.database, by, usage.since_of(since))))

    @access.get("/requests")
    def get_requests(limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        """The last requests, newest first (no bodies), and the request log's own state."""
        log = gw.requests
        return {"requests": database_call(lambda: usage.recent(gw.database, limit)),
                "log": {"enabled": log.enabled, "written": log.written, "waiting": log.waiting,
                        "dropped": log.dropped, "error": log.error, "database": gw.database.where}}

    return [servers, config, job_api, models, access]
