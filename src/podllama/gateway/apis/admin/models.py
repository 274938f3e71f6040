"""/admin/models: the model store — its models and disk use, downloads from Hugging Face as jobs, every byte
verified, a model removed."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import field_validator

from .... import validate
from ....access.credentials import Credentials
from ....api import ADMIN_PREFIX
from ....models import hub
from ....models.store import ModelNotFound, StoreError
from ....stack import Stack
from ..jobs import Job, Jobs
from .common import Body
from .jobs import start_job


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


def router(stack: Stack, credentials: Credentials, jobs: Jobs) -> APIRouter:
    models = APIRouter(prefix=f"{ADMIN_PREFIX}/models", tags=["models"])

    @models.get("")
    def list_models() -> list[dict[str, Any]]:
        """Models in the store: files, size, source, revision, which servers use them."""
        return hub.listing(stack.store, stack.cfg.servers)

    @models.get("/usage")
    def models_usage() -> dict[str, Any]:
        """Disk used by the model store, partial downloads, free space."""
        return stack.store.usage()

    @models.post("/pull", status_code=202)
    def pull_model(body: PullJob) -> dict[str, Any]:
        """Download {ref, revision?, mmproj?} from Hugging Face as a job; follow /admin/jobs/{id}/events."""

        def work(job: Job) -> Any:
            def progress(name: str, done: int, total: int) -> None:
                job.progress[name] = {"done": done, "total": total}

            return hub.pull(stack.store, body.ref, revision=body.revision, mmproj=body.mmproj,
                            hf_token=credentials.hub_token(stack.cfg), hub=credentials.hub_endpoint(stack.cfg),
                            progress=progress, cancel=job.cancel, say=job.lines.append)

        return start_job(jobs, "pull", {"ref": body.ref}, work)

    @models.post("/verify")
    def verify_models(model_id: str | None = Query(None, alias="model")) -> dict[str, Any]:
        """Re-check every byte of the stored models (or of ?model=ID) against their manifests: {id: [problems]}."""
        try:
            report = stack.store.verify(model_id)
        except ModelNotFound as e:
            raise HTTPException(404, str(e)) from None
        return {"ok": not any(report.values()), "models": report}

    @models.delete("/{model_id:path}")
    def delete_model(model_id: str, force: bool = Query(False)) -> dict[str, Any]:
        """Remove a model; refused (409) while a running server uses it, unless ?force=1 (which stops them)."""
        try:
            removed, stopped = stack.remove_model(model_id, force)
        except ModelNotFound as e:
            raise HTTPException(404, str(e)) from None
        except StoreError as e:
            raise HTTPException(409, str(e)) from None
        return {"removed": removed, "stopped": stopped}

    return models
