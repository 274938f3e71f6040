"""How long the request log keeps what: rows `[gateway] log_days`, their bodies `log_body_days`, hourly usage
`usage_days`, minute usage rollups.MINUTES_KEPT. Pruned in small batches by the request log's own thread, never
on a request's path; a batch that came back full means more is due, and the writer comes back soon."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import GatewaySection
from . import rollups
from .database import REQUESTS, Database

BATCH = 5000  # rows a statement touches at most: a short transaction, the writer free again soon
DAY = 86400.0


@dataclass(frozen=True)
class Retention:
    """`[gateway] log_days`, `log_body_days`, `usage_days` (their defaults are the config's)."""

    log_days: float
    log_body_days: float
    usage_days: float

    @classmethod
    def of(cls, gw: GatewaySection) -> Retention:
        return cls(gw.log_days, gw.log_body_days, gw.usage_days)


def prune(db: Database, keep: Retention, now: float | None = None, batch: int = BATCH) -> dict[str, int]:
    """One batch of each kind of pruning; returns how many rows each touched (one equal to BATCH: more is due)."""
    now = time.time() if now is None else now
    rows_before = now - keep.log_days * DAY
    bodies_before = now - min(keep.log_body_days, keep.log_days) * DAY
    done = {
        "rows": db.execute(f"DELETE FROM {REQUESTS} WHERE {db.some(REQUESTS, 'ts < ?')}", (rows_before, batch)),
        "bodies": db.execute(
            f"UPDATE {REQUESTS} SET request_body = NULL, response_body = NULL WHERE "
            + db.some(REQUESTS, "ts < ? AND (request_body IS NOT NULL OR response_body IS NOT NULL)"),
            (bodies_before, batch)),
        "minutes": db.execute(f"DELETE FROM {rollups.TABLE} WHERE "
                              + db.some(rollups.TABLE, "span = ? AND bucket < ?"),
                              (rollups.MINUTE, now - rollups.MINUTES_KEPT, batch)),
        "hours": db.execute(f"DELETE FROM {rollups.TABLE} WHERE " + db.some(rollups.TABLE, "span = ? AND bucket < ?"),
                            (rollups.HOUR, now - keep.usage_days * DAY, batch)),
    }
    return done
