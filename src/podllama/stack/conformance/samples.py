"""The stack's own requests as cases: what the gateway kept under `[update] sample = N` (access/samples.py), read
from the stack's database. Nothing is read, and none is replayed, without that setting."""

from __future__ import annotations

from ...access import samples
from ...access.credentials import Credentials
from ...access.database import DatabaseError
from ...config import Config
from .cases import Case


def cases(cfg: Config, credentials: Credentials, server: str) -> list[Case]:
    """SERVER's kept requests (none where [update] sample is 0 or the database cannot be read)."""
    if not cfg.update.sample:
        return []
    db = credentials.database(cfg)
    try:
        return [Case(name, path, body) for name, path, body in samples.read(db, server, cfg.update.sample)]
    except DatabaseError:
        return []
    finally:
        db.close()
