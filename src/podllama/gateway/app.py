"""The gateway application: one ASGI app. Every request passes the guard first (Host, Origin, keys, body
limits); llama-server routes then take the raw proxy path (routes.py, proxy.py); everything the gateway
answers itself — /health, /v1/models, /metrics, /help, /admin, /api (Ollama) — is FastAPI.

The gateway follows its config: services.toml, the key files it names and the stack's credentials are looked
at every round of the registry and of the supervisor, and a change is applied to routing, keys, limits,
timeouts and supervision at once (an invalid file is reported and the running config kept).
`podllama gateway` serves it in-process; the gateway container runs the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .. import __version__, config
from ..access.credentials import Credentials
from ..access.keys import Key
from ..access.retention import Retention
from ..api import ADMIN_PREFIX
from ..config import ServerSection
from ..engine import CliEngine, get_engine
from ..stack import Stack
from ..stack.changes import version_of
from ..stack.supervisor import Supervisor
from .apis import admin, dashboard
from .apis import help as helpdoc
from .apis.jobs import Jobs
from .apis.ollama import PREFIX as OLLAMA
from .apis.ollama import Ollama
from .front.auth import Caller, Keys, key_files
from .front.errors import error_type
from .front.guard import ACCESS, Access, Guard, access_of_own, caller_of
from .front.server import Limits
from .routing.metrics import Metrics, watch_loop
from .routing.ondemand import Loader, Refused
from .routing.proxy import Proxy
from .routing.quota import WINDOW, OverLimit
from .routing.requestlog import RequestLog
from .routing.routes import ENDPOINTS, PASSTHROUGH
from .routing.upstreams import Discover, Registry, dns_discovery, engine_discovery

log = logging.getLogger("podllama.gateway")


class ModelRef(BaseModel):
    model: str


class Gateway:
    """The ASGI app. Holds the stack, the registry of servers, the guard, the proxy, the supervisor and the
    FastAPI app."""

    def __init__(self, cfg: config.Config, supervise: bool = True, engine_name: str | None = None,
                 discover: Discover | None = None, bound: str | None = None, poll_every: float = 2.0,
                 engine: CliEngine | None = None, orchestrated: bool = False) -> None:
        """DISCOVER: where the servers' addresses come from (default: the engine's containers). BOUND: the
        address the gateway listens on, when not [gateway] host. POLL_EVERY: seconds between looks at the
        servers' health and at the config files. ENGINE: the engine itself (default: by ENGINE_NAME).
        ORCHESTRATED: an exported stack (compose, Kubernetes): servers found by DNS, no engine, no supervisor."""
        if orchestrated:
            supervise = False
            discover = dns_discovery(lambda: self.stack.cfg)
        engine = engine or get_engine(engine_name or os.environ.get("PODLLAMA_ENGINE")
                                      or ("podman" if orchestrated else cfg.stack.engine))  # never asked then
        self.stack = Stack(cfg, engine, progress=log.info, default_variant=os.environ.get("PODLLAMA_VARIANT"))
        self.credentials = Credentials(cfg.state_path)
        for made in self.credentials.ensure():
            log.info(made)
        self.bound = bound
        self.keys = Keys.load(cfg)
        self.guard = Guard(cfg.gateway, self.keys, bound)
        self.limits = Limits()
        self.limits.configure(cfg.gateway)
        self.registry = Registry(cfg, discover or engine_discovery(self.stack), self.stack.state, orchestrated)
        # the database (keys, the request log), read and written by the request log's own thread
        self.database = self.credentials.database(cfg)
        self.requests = RequestLog(self.database, self._stored_keys, enabled=cfg.gateway.log_requests,
                                   retention=Retention.of(cfg.gateway))
        self.requests.keep_samples(cfg.update.sample)
        self.metrics = Metrics(log_state=lambda: (self.requests.written, self.requests.waiting, self.requests.dropped))
        self.loader = Loader(self.stack, self.registry, cfg.gateway.load_timeout, self.credentials.server_key())
        # the supervisor leaves alone a server the gateway is loading (its exit is the load's to report), and a
        # restart it makes is looked up at once (a recreated container has a new address)
        self.supervisor = Supervisor(self.stack, before_round=self.follow_config, loading=self._loading,
                                     on_restart=lambda unit: self.registry.refresh_from_thread(),
                                     observed=self.registry.observed)
        self.supervise = supervise
        # a request that finds a server gone wakes the supervisor
        self.proxy = Proxy(self.registry, self.metrics, cfg.gateway, self.credentials.server_key(), self.loader,
                           self.requests, self.supervisor.wake if supervise else lambda server: None)
        self.poll_every = poll_every
        self.table = self.proxy.table
        self.started = int(time.time())
        self.config_error: str | None = None
        self._reload_lock = threading.Lock()
        self._seen = self._stamp()
        self.api = self._fastapi()
        self.ollama = Ollama(self)

    # -- following the config -----------------------------------------------------------------------------
    def _stamp(self) -> tuple[Any, ...]:
        cfg = self.stack.cfg
        files = [p for p in [cfg.source, *key_files(cfg)] if p is not None]
        stats = []
        for p in files:
            try:
                st = p.stat()
                stats.append((str(p), st.st_mtime_ns, st.st_size))
            except OSError:
                stats.append((str(p), 0, 0))
        return tuple(stats) + self.credentials.stamp()

    def follow_config(self) -> bool:
        """Reload when services.toml, a key file or a credential changed since last seen. True: reloaded."""
        if self.stack.cfg.source is None or self._stamp() == self._seen:
            return False
        return self.reload()

    def reload(self) -> bool:
        """Read services.toml (and keys) again and apply them; an invalid file is reported, the running config
        kept. True when the new config is in use."""
        with self._reload_lock:
            self._seen = self._stamp()
            source = self.stack.cfg.source
            if source is None:
                return False
            try:
                cfg = config.load(source)
                keys = Keys.load(cfg)
                for name in cfg.remotes:  # readable now, or the running config stays
                    cfg.remote_key(name)
            except (config.ConfigError, ValueError) as e:
                self.config_error = str(e)
                log.error("services.toml changed but cannot be used; the running config stays: %s", e)
                return False
            self.config_error = None
            self._adopt(cfg, keys)
            log.info("config reloaded (version %s)", self.version())
            return True

    def adopt(self, stack: Stack) -> None:
        """After a change made through the API (in a worker thread): its config everywhere, and the servers'
        new containers looked up at once (a restarted server has a new address)."""
        with self._reload_lock:
            self._seen = self._stamp()
            self._adopt(stack.cfg, Keys.load(stack.cfg))
        self.registry.refresh_from_thread()

    def _stored_keys(self, stored: dict[str, Key], made: bool) -> None:
        self.keys.stored, self.keys.made = stored, made

    def _adopt(self, cfg: config.Config, keys: Keys) -> None:
        self.stack.cfg = cfg
        keys.stored, keys.made = self.keys.stored, self.keys.made  # the database keys as last read
        self.keys = keys
        self.requests.enabled = cfg.gateway.log_requests
        self.requests.retention = Retention.of(cfg.gateway)
        self.requests.keep_samples(cfg.update.sample)
        database = self.credentials.database(cfg)
        if database.url != self.database.url:  # moved: keys and rows go to the new one from the next round
            self.database = database
            self.requests.move_to(database)
        self.guard.configure(cfg.gateway, keys, self.bound)
        self.limits.configure(cfg.gateway)
        self.registry.configure(cfg)
        self.proxy.configure(cfg.gateway, self.credentials.server_key())
        self.loader.configure(cfg.gateway.load_timeout, self.credentials.server_key())
        self.supervisor.configure(cfg.supervisor)
        self._seen = self._stamp()

    # -- on-demand servers ---------------------------------------------------------------------------------
    def _loading(self) -> set[str]:
        """The servers the gateway is loading now (read from the supervisor's thread)."""
        return {h.name for h in list(self.registry.handles.values()) if h.loading is not None}

    def model_state(self, server: str) -> str:
        """loaded | loading | unloaded (as llama.cpp's router mode says it)."""
        return self.registry[server].model_state

    def usable(self, caller: Caller) -> dict[str, ServerSection]:
        """The servers CALLER's key may use (a scoped key sees only those), by name."""
        return {name: s for name, s in self.registry.servers.items() if caller.refusal(name, s) is None}

    def visible(self, caller: Caller) -> set[str] | None:
        """The servers an answer to CALLER may name: None for all (an admin, a listed key, or a gateway that
        needs no key), else those its key may use (none for a caller without a key where keys are needed)."""
        if caller.admin or (caller.key is None and (caller.id or not self.keys.any_inference)):
            return None
        return set(self.usable(caller)) if caller.key is not None else set()

    def server_of(self, model: str, caller: Caller) -> str:
        server = self.registry.server_for_model(model)
        if server is None:
            raise StarletteHTTPException(404, f"model '{model}' not found; GET /v1/models lists them")
        if why := caller.refusal(server, self.registry.servers[server]):
            raise StarletteHTTPException(403, why)
        return server

    async def load(self, server: str, caller: Caller) -> dict[str, Any]:
        """Load on-demand SERVER now (as its first request would), within CALLER's limits; for other servers, say
        how they run."""
        if not self.loader.manages(server):
            raise StarletteHTTPException(400, f"server '{server}' is not on demand (start = \"always\"): it runs from "
                                              "`podllama start` on; POST /admin/servers/NAME/start starts it")
        try:
            with self.proxy.limited(caller):
                await self.loader.ensure(server)
        except OverLimit as e:
            raise StarletteHTTPException(429, str(e), {"retry-after": str(e.retry_after)}) from None
        except Refused as e:
            raise StarletteHTTPException(e.status, str(e), {"retry-after": str(e.retry_after)}) from None
        except TimeoutError:
            raise StarletteHTTPException(503, f"server '{server}' is still loading after "
                                              f"{self.loader.load_timeout:.0f}s ([gateway] load_timeout)") from None
        return {"success": True, "server": server, "status": {"value": self.model_state(server)}}

    async def unload(self, server: str, caller: Caller) -> dict[str, Any]:
        if not self.loader.manages(server):
            raise StarletteHTTPException(400, f"server '{server}' is not on demand (start = \"always\"); "
                                              "POST /admin/servers/NAME/stop stops it")
        try:
            with self.proxy.limited(caller):
                stopped = await self.loader.unload(server)
        except OverLimit as e:
            raise StarletteHTTPException(429, str(e), {"retry-after": str(e.retry_after)}) from None
        except Refused as e:
            raise StarletteHTTPException(e.status, str(e), {"retry-after": str(e.retry_after)}) from None
        return {"success": True, "server": server, "was_loaded": stopped, "status": {"value": self.model_state(server)}}

    def version(self) -> str | None:
        source = self.stack.cfg.source
        return version_of(source.read_text()) if source is not None and source.exists() else None

    # -- ASGI ---------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.api(scope, receive, send)
        path = scope["path"]
        ep = self.table.match(scope["method"], path)
        proxied = ep is not None and ep.scope != "gateway" and not (ep.name == "metrics" and not _asks_server(scope))
        passthrough = not proxied and path.startswith(PASSTHROUGH)
        ollama = path == OLLAMA or path.startswith(OLLAMA + "/")
        ui = not proxied and not passthrough and scope["method"] in ("GET", "HEAD") and _is_ui(path)
        streamed = proxied or passthrough or ollama  # bodies read (and capped) by the proxy or the translation
        # who may call it: the route table says, for its routes; the gateway's own routes by their prefix
        access = (Access.PUBLIC if ui else ACCESS[ep.access] if ep is not None else Access.INFERENCE if streamed
                  else access_of_own(path))
        own = not (streamed or ui)
        checked = await self.guard(scope, receive, send, access, own=own,
                                   takes_body=own and self._takes_body(scope))
        if checked is None:
            return
        receive, send = checked
        if proxied:
            assert ep is not None
            return await self.proxy.endpoint(scope, receive, send, ep)
        if passthrough:
            return await self.proxy.passthrough(scope, receive, send)
        if ollama:
            return await self.ollama(scope, receive, send)
        if ui:
            return await self.proxy.ui(scope, receive, send)
        await self.api(scope, receive, send)

    def _takes_body(self, scope: dict[str, Any]) -> bool:
        """A route of the gateway's own that takes a body matches this request (else its body is never read)."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return False
        return any(route.matches(scope)[0] is Match.FULL for route in self.api.router.routes)

    # -- the routes the gateway answers -------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """The gateway's background work, from the app's start to its end: the request log's writer, the
        registry's looks, the supervisor's thread, the on-demand rounds, the loop's lag watch."""
        gw, stop = self, asyncio.Event()
        if await asyncio.to_thread(gw.requests.read_keys):  # the limits go on where they were
            gw.proxy.quota.seed(await asyncio.to_thread(gw.requests.recent, WINDOW))
        gw.requests.start()
        await gw.registry.refresh()
        await gw.registry.probe_all()
        poller = asyncio.create_task(gw.registry.run(stop, every=gw.poll_every, refresh_busy=gw.poll_every,
                                                     on_round=gw.follow_config))
        sup_stop = gw.supervisor.start_thread()[1] if gw.supervise else None
        # on-demand servers: stopped when idle, measured while they run (it drives the engine, as the
        # supervisor does)
        reaper = asyncio.create_task(gw.loader.run(stop)) if gw.supervise else None
        lag = asyncio.create_task(watch_loop(gw.metrics.loop_lag, stop))
        if gw.keys.public_bind and not gw.keys.any_inference:
            log.warning("the gateway is published on a non-loopback address without inference keys: anyone "
                        "who reaches it can use the models (set $PODLLAMA_API_KEYS or [gateway] api_keys_file)")
        yield
        stop.set()
        if sup_stop is not None:
            sup_stop.set()
        await poller
        if reaper is not None:
            await reaper
        await lag
        await gw.loader.close()
        await gw.proxy.close()
        await asyncio.to_thread(gw.requests.stop)
        gw.database.close()
        gw.registry.probes.close()

    def _fastapi(self) -> FastAPI:
        gw = self
        # no Swagger page: its scripts come from a CDN, which machines without the internet cannot load; /help
        # (JSON and HTML) and /openapi.json document every route from local data
        app = FastAPI(title="podllama gateway", version=__version__, lifespan=self.lifespan, docs_url=None,
                      redoc_url=None)
        _error_handlers(app)
        self._own_routes(app)
        app.state.gateway, app.state.jobs = gw, Jobs()
        for router in [*admin.routers(gw, app.state.jobs), dashboard.router(gw)]:  # as the app's own routes:
            app.router.routes.extend(router.routes)  # /help and OpenAPI see them
        app.openapi = lambda: app.openapi_schema or _cache(app, helpdoc.openapi(app))  # type: ignore[method-assign]
        return app

    def _own_routes(self, app: FastAPI) -> None:
        """What the gateway answers itself for everyone: its health, the models, loads, metrics, help."""
        gw = self

        @app.get("/health", summary="The gateway is up, and whose it is (public, no key)")
        @app.get("/v1/health", include_in_schema=False)
        async def health() -> dict[str, str]:
            return {"status": "ok", "service": "podllama-gateway", "stack": gw.stack.name, "version": __version__}

        @app.get("/v1/models", summary="Every model of every server (OpenAI list shape)")
        @app.get("/models", include_in_schema=False)
        async def models(request: Request) -> dict[str, Any]:
            data = []
            for name, server in gw.usable(_caller(request)).items():
                caps = sorted({ep.capability for ep in ENDPOINTS if ep.scope == "model" and server.role in ep.roles})
                data.append({
                    "id": server.alias or name, "object": "model", "created": gw.started, "owned_by": "podllama",
                    "server": name, "role": server.role, "model_file": server.model, "capabilities": caps,
                    "status": {"value": gw.model_state(name)},
                    "aliases": [a for a in (name, server.model) if a != (server.alias or name)],
                })
            return {"object": "list", "data": data}

        @app.post("/models/load", summary="Load a model's server now and wait until it answers (on-demand servers)")
        async def load_model(body: ModelRef, request: Request) -> dict[str, Any]:
            return await gw.load(gw.server_of(body.model, _caller(request)), _caller(request))

        @app.post("/models/unload", summary="Stop a model's on-demand server (its prompt caches saved)")
        async def unload_model(body: ModelRef, request: Request) -> dict[str, Any]:
            return await gw.unload(gw.server_of(body.model, _caller(request)), _caller(request))

        @app.get("/metrics", summary="Gateway metrics (Prometheus); ?server=NAME for a server's own")
        async def metrics(request: Request) -> PlainTextResponse:
            caller = _caller(request)
            visible = gw.visible(caller)
            models = None if visible is None else {gw.registry.servers[s].alias or s for s in visible}
            text = gw.metrics.render(visible, models, None if visible is None else caller.name)
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4",
                                     headers={"Process-Start-Time-Unix": str(gw.started)})

        @app.get("/help", summary="Every endpoint: where it routes now and what it needs (JSON or HTML)")
        async def help_all(request: Request) -> Any:
            items = helpdoc.entries(app, gw.registry, gw.keys, gw.visible(_caller(request)))
            if "text/html" in request.headers.get("accept", ""):
                return HTMLResponse(helpdoc.render_html(items))
            return {"endpoints": items}

        @app.get("/help/{path:path}", summary="One endpoint's entry (by path or alias)")
        async def help_one(path: str, request: Request) -> dict[str, Any]:
            wanted = "/" + path.strip("/")
            for item in helpdoc.entries(app, gw.registry, gw.keys, gw.visible(_caller(request))):
                if wanted == item["path"] or wanted in item["aliases"]:
                    return item
            raise StarletteHTTPException(404, f"no endpoint {wanted}; GET /help lists them")



def _error_handlers(app: FastAPI) -> None:
    """Errors in the OpenAI shape: {"error": {"code", "message", "type"}}."""
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no endpoint {request.method} {request.url.path}; GET /help lists every endpoint"
        return JSONResponse({"error": {"code": exc.status_code, "message": message,
                                       "type": error_type(exc.status_code)}},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": {"code": 422, "message": problems, "type": "invalid_request_error"}},
                            status_code=422)


def _cache(app: FastAPI, schema: dict[str, Any]) -> dict[str, Any]:
    app.openapi_schema = schema
    return schema


UI_FILES = (".js", ".css", ".html", ".svg", ".png", ".ico", ".webp", ".woff", ".woff2", ".ttf", ".webmanifest",
            ".map", ".txt")


def _is_ui(path: str) -> bool:
    """llama.cpp's web UI: its page and its static files (served by the default chat server); not podllama's
    own dashboard (/ui) or API."""
    return path == "/" or path.startswith("/_app/") or (
        path.endswith(UI_FILES) and not path.startswith((ADMIN_PREFIX + "/", "/api/", "/ui/")))


def _caller(request: Request) -> Caller:
    """Who the guard let this request in as."""
    return caller_of(request.scope)


def _asks_server(scope: dict[str, Any]) -> bool:
    q = scope["query_string"]
    return b"server=" in q or b"model=" in q


__all__ = ["Gateway"]
