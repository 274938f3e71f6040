"""The management API under /admin, one router per resource: servers, config and status, jobs (builds and
updates), models, keys and usage. The guard lets only admin-key holders in (401 before the body is read); every
body is a typed model, so a value that would reach git, podman or llama-server is checked before any work starts
(422). Each router takes the collaborators it uses, not the gateway."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

from ..jobs import Jobs
from . import access, config, jobs, models, servers
from .common import Body, Following

if TYPE_CHECKING:
    from ...app import Gateway


def routers(gw: Gateway, jobs_: Jobs) -> list[APIRouter]:
    """The /admin routers, wired to GW's parts and its JOBS."""
    following = Following(gw.reload, gw.adopt, gw.version, lambda: gw.config_error)
    return [servers.router(gw.stack, following, gw.supervisor, gw.load, gw.unload),
            config.router(gw.stack, following, gw.registry, gw.supervisor),
            jobs.router(gw.stack, jobs_),
            models.router(gw.stack, gw.credentials, jobs_),
            access.router(lambda: gw.database, gw.requests, gw.stack)]


__all__ = ["Body", "routers"]
