"""The gateway application. `podllama gateway` serves it in-process; the gateway container runs the same."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI

from .. import __version__, config
from ..engine import get_engine
from ..stack import Stack
from ..supervisor import Supervisor

log = logging.getLogger("podllama.gateway")


def create_app(cfg: config.Config, supervise: bool = True) -> FastAPI:
    engine = get_engine(os.environ.get("PODLLAMA_ENGINE") or cfg.stack.engine)
    stack = Stack(cfg, engine, progress=log.info, default_variant=os.environ.get("PODLLAMA_VARIANT"))
    supervisor = Supervisor(stack)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = None
        if supervise:
            _, stop = supervisor.start_thread()
        yield
        if stop is not None:
            stop.set()

    app = FastAPI(title="podllama gateway", version=__version__, lifespan=lifespan)
    app.state.stack, app.state.supervisor = stack, supervisor

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/api/status")
    def status() -> dict:
        return {"stack": stack.name, "servers": stack.status(), "supervisor": supervisor.events[-20:]}

    return app
