"""/admin/jobs: builds and updates as jobs (llama.cpp moved to a ref, images built again, servers restarted,
rolled back on failure), followed by polling or server-sent events, cancelled."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import field_validator

from .... import validate
from ....api import ADMIN_PREFIX
from ....config import VariantName
from ....stack import Stack
from ..jobs import Job, Jobs
from .common import Body, ExistingJob


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


class RebuildJob(Body):
    variant: VariantName | None = None


def start_job(jobs: Jobs, kind: str, params: dict[str, Any], work: Callable[[Job], Any]) -> dict[str, Any]:
    """WORK as a job of KIND; 409 while another job runs."""
    try:
        return jobs.start(kind, params, work).to_dict()
    except RuntimeError as e:
        raise HTTPException(409, str(e)) from None


def router(stack: Stack, jobs: Jobs) -> APIRouter:
    job_api = APIRouter(prefix=ADMIN_PREFIX, tags=["jobs"])

    @job_api.post("/jobs/update", status_code=202)
    def update_job(body: UpdateJob | None = None) -> dict[str, Any]:
        """Move llama.cpp to {ref} (from {remote}), build, restart servers; rolled back on failure."""
        from ....stack import update as upd

        job = body or UpdateJob()
        return start_job(jobs, "update", job.model_dump(), lambda j: upd.update(
            stack, job.ref, job.remote, progress=j.lines.append))

    @job_api.post("/jobs/rebuild", status_code=202)
    def rebuild_job(body: RebuildJob | None = None) -> dict[str, Any]:
        """Build the stack's images again ({variant}) and restart servers on them; rolled back on failure."""
        from ....stack import update as upd

        job = body or RebuildJob()
        variants: list[str] | None = [job.variant] if job.variant and job.variant != "auto" else None
        return start_job(jobs, "rebuild", job.model_dump(), lambda j: upd.rebuild(stack, variants, progress=j.lines.append))

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

    return job_api
