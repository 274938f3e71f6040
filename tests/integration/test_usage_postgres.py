"""The usage checks of tests/unit/test_usage.py (rollups against the rows, retention in batches, limits restored
from the minute rollups) on a real Postgres: the distribution's server, a cluster of its own."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from podllama.access.database import Database
from tests.integration.conftest import free_port
from tests.postgres import Postgres
from tests.unit.test_usage import CHECKS


@pytest.fixture(scope="module")
def postgres():
    d = Path(tempfile.mkdtemp(prefix="podllama-pg-", dir="/var/tmp"))
    os.chmod(d, 0o755)  # the postgres user runs the server inside
    pg = Postgres(d / "cluster", free_port()).init()
    yield pg
    pg.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_on_postgres(postgres, check) -> None:
    db = Database(postgres.url)
    try:
        for table in ("podllama_requests", "podllama_usage"):  # each check starts from an empty log
            db.execute(f"DELETE FROM {table}")
        check(db)
        assert (db.size() or 0) > 0
    finally:
        db.close()
