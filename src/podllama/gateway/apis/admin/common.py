"""What the /admin routers share: typed request bodies, the path parameters that must name something, and the
one way a change to services.toml is made (validated, diffed, applied, adopted by the gateway)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict

from ....stack import Stack, StackError, changes
from ....stack.changes import ChangeError
from ..jobs import Job


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


DryRun = Annotated[bool, Query(description="Only plan: what would start, restart or stop")]


@dataclass
class Following:
    """The gateway's following of its config: read it again (RELOAD), take a change made here (ADOPT), its
    version and what is wrong with the file on disk (ERROR)."""

    reload: Callable[[], bool]
    adopt: Callable[[Stack], None]
    version: Callable[[], str | None]
    error: Callable[[], str | None]

    def change(self, stack: Stack, edit: Callable[[str], str], if_match: str | None, dry_run: bool) -> dict[str, Any]:
        """EDIT applied to services.toml (under IF_MATCH), or only planned."""
        try:
            done = changes.submit(stack, edit, if_match, dry_run)
        except ChangeError as e:
            raise HTTPException(e.status, str(e)) from None
        except StackError as e:
            self.reload()
            raise HTTPException(500, f"the change was saved but did not come up healthy: {e}") from None
        if dry_run:
            return {"dry_run": True, "plan": done.plan.to_dict()}
        self.adopt(done.stack)
        return {"dry_run": False, "plan": done.plan.to_dict(), "version": changes.version_of(done.text)}


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
