"""/admin/keys, /admin/usage, /admin/requests: keys made, listed and revoked; what the request log says."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, HTTPException, Query

from ....access import usage
from ....access.database import Database, DatabaseError
from ....access.keys import KeyProblem, KeyStore, NewKey
from ....api import ADMIN_PREFIX
from ....stack import Stack
from ...routing.requestlog import RequestLog
from .common import Body


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


def database_call(work: Callable[[], Any]) -> Any:
    """WORK's result; its refusals as HTTP errors (a bad key 400, a bad value 422, no database 503)."""
    try:
        return work()
    except KeyProblem as e:
        raise HTTPException(400, str(e)) from None
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    except DatabaseError as e:
        raise HTTPException(503, str(e)) from None


def router(database: Callable[[], Database], requests: RequestLog, stack: Stack) -> APIRouter:
    """DATABASE: the stack's database now (it moves when the config names another)."""
    access = APIRouter(prefix=ADMIN_PREFIX, tags=["keys and usage"])

    @access.get("/keys")
    def list_keys(every: bool = Query(False, alias="all")) -> list[dict[str, Any]]:
        """The keys (never the keys themselves): scope, limits, expiry, state; ?all=1 with revoked ones."""
        keys = database_call(lambda: KeyStore(database()).list())
        return [k.public() for k in keys if every or k.state == "active"]

    @access.post("/keys", status_code=201)
    def create_key(body: NewKeyBody) -> dict[str, Any]:
        """Make a key; the answer holds it, once ("key"); the gateway takes it at once."""
        key, secret = database_call(lambda: KeyStore(database()).create(NewKey(**body.model_dump()), stack.cfg))
        requests.read_keys()
        return {**key.public(), "key": secret}

    @access.delete("/keys/{key_id}")
    def revoke_key(key_id: str) -> dict[str, Any]:
        """Revoke a key (by id or name); refused from then on."""
        key = database_call(lambda: KeyStore(database()).revoke(key_id))
        requests.read_keys()
        return dict(key.public())

    @access.get("/usage")
    def get_usage(by: str = Query("key", description="key | model | server | route | build | model-file"),
                  since: str = Query("24h", description="a span (30m, 24h, 7d, 90d) or a date")
                  ) -> list[dict[str, Any]]:
        """Requests, errors, tokens and latency (mean, p50, p95) from the usage rollups: to the minute for the
        last two days, to the hour before; by build (llama.cpp commit) or model file (sha256) too."""
        return list(database_call(lambda: usage.summary(database(), by, usage.since_of(since))))

    @access.get("/requests")
    def get_requests(limit: int = Query(100, ge=1, le=1000),
                     commit: str | None = Query(None, description="only those a build of this llama.cpp commit "
                                                "(or its prefix, 4 hex digits at least) answered")
                     ) -> dict[str, Any]:
        """The last requests, newest first (no bodies), with the build, model file and settings that answered
        each; and the request log's own state: rows written, waiting, dropped, pruned, the database's size and
        how long it keeps what."""
        log = requests
        return {"requests": database_call(lambda: usage.recent(database(), limit, commit)),
                "log": {"enabled": log.enabled, "written": log.written, "waiting": log.waiting,
                        "dropped": log.dropped, "error": log.error, "database": database().where,
                        "bytes": database_call(lambda: database().size()), "pruned": dict(log.pruned),
                        "retention": asdict(log.retention)}}

    return access
