"""The usage checks of tests/unit/test_usage.py (rollups against the rows, retention in batches, limits restored
from the minute rollups) on a real Postgres: the distribution's server, a cluster of its own."""

from __future__ import annotations

import pytest

from podllama.access.database import Database
from tests.unit.test_usage import CHECKS


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
