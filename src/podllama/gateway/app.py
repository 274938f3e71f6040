"""The gateway application: one ASGI app. llama-server routes take the raw proxy path (routes.py, proxy.py);
everything the gateway answers itself — /health, /v1/models, /metrics, /help, /api — is FastAPI.

`podllama gateway` serves it in-process; the gateway container runs the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException as FastAPIHTTPException
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from .. import __version__, config
from ..engine import get_engine
from ..stack import Stack
from ..supervisor import Supervisor
from . import admin, help as helpdoc
from .auth import Keys
from .metrics import Metrics
from .proxy import Proxy, error_body
from .routes import ENDPOINTS, PASSTHROUGH, RouteTable
from .upstreams import Registry

log = logging.getLogger("podllama.gateway")


class Gateway:
    """The ASGI app. Holds the stack, the registry of servers, the proxy, the supervisor and the FastAPI app."""

    def __init__(self, cfg: config.Config, supervise: bool = True, engine_name: str | None = None) -> None:
        engine = get_engine(engine_name or os.environ.get("PODLLAMA_ENGINE") or cfg.stack.engine)
        self.stack = Stack(cfg, engine, progress=log.info, default_variant=os.environ.get("PODLLAMA_VARIANT"))
        self.registry = Registry(self.stack)
        self.keys = Keys.load(cfg)
        self.metrics = Metrics()
        self.proxy = Proxy(self.registry, self.keys, self.metrics)
        self.supervisor = Supervisor(self.stack)
        self.supervise = supervise
        self.table = RouteTable.build()
        self.started = int(time.time())
        self.api = self._fastapi()

    def adopt(self, stack: Stack) -> None:
        """After a config change: the new config everywhere (routing, supervision)."""
        self.stack.cfg = stack.cfg
        self.registry.configure(stack.cfg)
        self.registry.refresh()
        self.supervisor.refresh()

    # -- ASGI ---------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            ep = self.table.match(scope["method"], path)
            if ep is not None and ep.scope != "gateway" and not (ep.name == "metrics" and not _asks_server(scope)):
                return await self.proxy.endpoint(scope, receive, send, ep)
            if path.startswith(PASSTHROUGH):
                return await self.proxy.passthrough(scope, receive, send)
        await self.api(scope, receive, send)

    # -- the routes the gateway answers -------------------------------------------------------------------
    def _fastapi(self) -> FastAPI:
        gw = self

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            stop = asyncio.Event()
            await asyncio.to_thread(gw.registry.refresh)
            await gw.registry.probe_all()
            poller = asyncio.create_task(gw.registry.run(stop))
            sup_stop = gw.supervisor.start_thread()[1] if gw.supervise else None
            if gw.keys.public_bind and not gw.keys.inference:
                log.warning("the gateway is published on a non-loopback address without inference keys: anyone "
                            "who reaches it can use the models (set $PODLLAMA_API_KEYS or [gateway] api_keys_file)")
            yield
            stop.set()
            if sup_stop is not None:
                sup_stop.set()
            await poller
            await gw.proxy.close()
            gw.registry.probes.close()

        app = FastAPI(title="podllama gateway", version=__version__, lifespan=lifespan, docs_url="/docs",
                      redoc_url=None)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 409: "conflict_error", 422: "invalid_request_error"}.get(exc.status_code, "server_error")
            message = str(exc.detail)
            if exc.status_code == 404 and message == "Not Found":
                message = f"no endpoint {request.method} {request.url.path}; GET /help lists every endpoint"
            return JSONResponse({"error": {"code": exc.status_code, "message": message, "type": kind}},
                                status_code=exc.status_code)

        from fastapi.exceptions import RequestValidationError

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            return JSONResponse({"error": {"code": 422, "message": str(exc.errors()), "type": "invalid_request_error"}},
                                status_code=422)

        @app.get("/health", summary="The gateway is up (public, no key)")
        @app.get("/v1/health", include_in_schema=False)
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        def require_inference(request: Request) -> None:
            if not gw.keys.inference_ok(request.scope["headers"]):
                raise FastAPIHTTPException(401, "Invalid API Key")

        @app.get("/v1/models", summary="Every model of every server (OpenAI list shape)")
        @app.get("/models", include_in_schema=False)
        async def models(request: Request) -> dict[str, Any]:
            require_inference(request)
            data = []
            for name, server in gw.registry.servers.items():
                caps = sorted({ep.capability for ep in ENDPOINTS if ep.scope == "model" and server.role in ep.roles})
                data.append({
                    "id": server.alias or name, "object": "model", "created": gw.started, "owned_by": "podllama",
                    "server": name, "role": server.role, "model_file": server.model, "capabilities": caps,
                    "status": gw.registry.state_of(name), "aliases": [a for a in (name, server.model) if a != (server.alias or name)],
                })
            return {"object": "list", "data": data}

        @app.get("/metrics", summary="Gateway metrics (Prometheus); ?server=NAME for a server's own")
        async def metrics(request: Request) -> PlainTextResponse:
            require_inference(request)
            return PlainTextResponse(gw.metrics.render(), media_type="text/plain; version=0.0.4")

        @app.get("/help", summary="Every endpoint: where it routes now and what it needs (JSON or HTML)")
        async def help_all(request: Request) -> Any:
            items = helpdoc.entries(app, gw.registry, gw.keys)
            if "text/html" in request.headers.get("accept", ""):
                return HTMLResponse(helpdoc.render_html(items))
            return {"endpoints": items}

        @app.get("/help/{path:path}", summary="One endpoint's entry (by path or alias)")
        async def help_one(path: str) -> dict[str, Any]:
            wanted = "/" + path.strip("/")
            for item in helpdoc.entries(app, gw.registry, gw.keys):
                if wanted == item["path"] or wanted in item["aliases"]:
                    return item
            raise FastAPIHTTPException(404, f"no endpoint {wanted}; GET /help lists them")

        admin.register(app, gw)
        app.openapi = lambda: app.openapi_schema or _cache(app, helpdoc.openapi(app))  # type: ignore[method-assign]
        return app


def _cache(app: FastAPI, schema: dict[str, Any]) -> dict[str, Any]:
    app.openapi_schema = schema
    return schema


def _asks_server(scope: dict[str, Any]) -> bool:
    q = scope["query_string"]
    return b"server=" in q or b"model=" in q


def create_app(cfg: config.Config, supervise: bool = True) -> Gateway:
    return Gateway(cfg, supervise=supervise)


__all__ = ["Gateway", "create_app", "error_body"]
