"""Usage from rollups, retention, lineage — against SQLite here; tests/integration/test_usage_postgres.py runs the
same checks on a real Postgres. Each check takes a Database: the rows go through the request log's own writer
thread, and what the rollups say is compared with what the raw rows say, computed apart in plain Python."""

from __future__ import annotations

import random
import sqlite3
import time
from collections import defaultdict
from pathlib import Path

import pytest

from podllama.access import rollups
from podllama.access.database import MIGRATIONS, Database
from podllama.access.retention import Retention, prune
from podllama.access.usage import BY, recent, summary
from podllama.gateway.routing.requestlog import RequestLog, Row
from tests.helpers import wait_until

NOW = 1_800_000_000.0  # a fixed "now" (2027-01-15), so that buckets fall the same on every run
COMMITS = ["0c1e57098bba" + "0" * 28, "1234abcd" + "f" * 32]


def synthetic(n: int, span: float, seed: int = 7) -> list[Row]:
    """N requests over the SPAN seconds before NOW: a few keys, routes, servers, builds; some errors."""
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        server = rnd.choice(["chat", "embed"])
        latency = rnd.choice([0.05, 0.2, 0.7, 3.0, 40.0])
        rows.append(Row(NOW - rnd.random() * span, rnd.choice([None, "k1", "k2"]), "POST",
                        "chat.completions" if server == "chat" else "embeddings", server, f"tiny-{server}",
                        rnd.choice([200, 200, 200, 400, 429, 503]), rnd.randint(0, 50), rnd.choice([None, 7]),
                        latency, rnd.choice([None, 0.01]), 100, 200, "body" if rnd.random() < 0.3 else None, None,
                        "sha256:img", rnd.choice(COMMITS), rnd.choice(["a" * 64, "b" * 64]), "cfg"))
    return rows


def write(db: Database, rows: list[Row]) -> RequestLog:
    """ROWS through the request log's writer, as the gateway writes them."""
    log = RequestLog(db, lambda keys, made: None)
    log.start()
    for r in rows:
        log.add(r)
    assert wait_until(lambda: log.written == len(rows), 60), (log.written, log.error)
    log.stop()
    return log


def by_hand(rows: list[Row], by: str, since: float) -> dict[str, tuple[int, int, int, int]]:
    """(requests, errors, prompt tokens, completion tokens) per group, from the rows themselves."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in rows:
        if r.ts >= since:
            g = out[getattr(r, BY[by]) or ("(no key)" if by == "key" else "-")]
            g[0] += 1
            g[1] += r.status >= 400
            g[2] += r.prompt_tokens or 0
            g[3] += r.completion_tokens or 0
    return {k: (v[0], v[1], v[2], v[3]) for k, v in out.items()}


def from_rollups(db: Database, by: str, since: float) -> dict[str, tuple[int, int, int, int]]:
    label = "key_id" if by == "key" else by
    return {(r[label] or "(no key)") if by == "key" else r[label]: (
        r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"])
        for r in summary(db, by, since, now=NOW)}


def check_rollups_agree_with_the_rows(db: Database) -> None:
    rows = synthetic(3000, 30 * 86400)
    write(db, rows)
    for since in (NOW - 3600 * 24, NOW - 1800):  # the last day, to the minute; the last half hour
        for by in BY:
            assert from_rollups(db, by, since) == by_hand(rows, by, since // 60 * 60), (by, since)
    # thirty days: to the hour (minute buckets are kept two days), so from the hour that holds `since`
    since = NOW - 30 * 86400 + 1000
    assert from_rollups(db, "build", since) == by_hand(rows, "build", since // 3600 * 3600)
    # the histogram: a p95 that is one of its edges, the mean from the sums
    chat = next(r for r in summary(db, "server", NOW - 86400, now=NOW) if r["server"] == "chat")
    day = [r for r in rows if r.ts >= NOW - 86400 and r.server == "chat"]
    assert chat["mean_latency_s"] == pytest.approx(sum(r.latency for r in day) / len(day), abs=1e-3)
    assert chat["p95_latency_s"] is None or chat["p95_latency_s"] in rollups.HISTOGRAM
    # which requests did this build serve
    served = recent(db, 1000, COMMITS[1][:8])
    assert served and {r["llama_commit"] for r in served} == {COMMITS[1]}
    assert {r["model_sha256"] for r in served} <= {"a" * 64, "b" * 64} and served[0]["image"] == "sha256:img"


def check_retention_prunes_in_batches_and_usage_outlives_the_rows(db: Database) -> None:
    rows = synthetic(2000, 60 * 86400, seed=11)
    write(db, rows)
    before = summary(db, "key", NOW - 59 * 86400, now=NOW)
    keep = Retention(log_days=30, log_body_days=7, usage_days=400)
    rounds = 0
    while any(n for n in prune(db, keep, now=NOW, batch=100).values()):
        rounds += 1
    assert rounds > 5, "several small batches, not one big statement"
    oldest = db.query("SELECT MIN(ts) FROM podllama_requests")[0][0]
    assert oldest >= NOW - 30 * 86400
    kept = db.query("SELECT COUNT(*) FROM podllama_requests")[0][0]
    assert kept == sum(1 for r in rows if r.ts >= NOW - 30 * 86400)
    bodies = db.query("SELECT MIN(ts) FROM podllama_requests WHERE request_body IS NOT NULL")[0][0]
    assert bodies >= NOW - 7 * 86400
    assert db.query("SELECT MIN(bucket) FROM podllama_usage WHERE span = 60")[0][0] >= NOW - rollups.MINUTES_KEPT - 60
    # rows a month gone, their usage still there (hours)
    assert summary(db, "key", NOW - 59 * 86400, now=NOW) == before
    short = Retention(log_days=30, log_body_days=7, usage_days=10)
    while any(prune(db, short, now=NOW, batch=1000).values()):
        pass
    assert db.query("SELECT MIN(bucket) FROM podllama_usage WHERE span = 3600")[0][0] >= NOW - 10 * 86400 - 3600


def check_limits_are_restored_from_the_minute_rollups(db: Database) -> None:
    now = time.time()
    rows = [Row(now - 5 - i, "k1", "POST", "chat.completions", "chat", "tiny-chat", 200, 10, 5, 0.1, None, 1, 1)
            for i in range(12)] + [Row(now - 600, "k1", "POST", "chat.completions", "chat", "tiny-chat", 200, 10, 5,
                                       0.1, None, 1, 1)]
    log = write(db, rows)
    past = log.recent(60)
    assert len(past) >= 12 and all(k == "k1" and now - 130 <= at <= now + 1 for k, at, _ in past)
    assert sum(t for _, _, t in past) >= 12 * 15, "the last minute's tokens, none lost"
    assert len(past) <= 13, "nothing from ten minutes ago"


CHECKS = [check_rollups_agree_with_the_rows, check_retention_prunes_in_batches_and_usage_outlives_the_rows,
          check_limits_are_restored_from_the_minute_rollups]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_on_sqlite(tmp_path: Path, check) -> None:
    db = Database(f"sqlite:///{tmp_path}/podllama.db")
    try:
        check(db)
    finally:
        db.close()


def test_spans_read_minutes_for_the_recent_part_and_hours_for_the_rest():
    now = NOW
    assert rollups.spans_for(now - 1800, now) == [(60, (now - 1800) // 60 * 60, (now - 1800) // 3600 * 3600 + 3600),
                                                  (3600, (now - 1800) // 3600 * 3600 + 3600, now + 3600)]
    far = now - 90 * 86400 + 100
    assert rollups.spans_for(far, now) == [(3600, far // 3600 * 3600, now + 3600)]
    assert rollups.percentile([0] * len(rollups.BINS), 0.5) is None
    assert rollups.percentile([1, 1, 0, 0, 0, 0, 0, 0, 2], 0.5) == 0.25  # half answered within 250 ms
    assert rollups.percentile([1, 1, 0, 0, 0, 0, 0, 0, 2], 0.95) is None  # above the last edge


def test_a_version_1_log_is_migrated_and_its_rows_rolled_up(tmp_path: Path):
    path = tmp_path / "podllama.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE podllama_schema (version INTEGER NOT NULL)")
    for statement in MIGRATIONS[0][1]:
        old.execute(statement)  # type: ignore[arg-type]
    old.execute("INSERT INTO podllama_schema (version) VALUES (1)")
    rows = synthetic(500, 3 * 86400, seed=3)
    old.executemany("INSERT INTO podllama_requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [r[:15] for r in rows])
    old.commit()
    old.close()
    db = Database(f"sqlite:///{path}")
    assert db.version() == MIGRATIONS[-1][0]
    day = by_hand(rows, "key", (NOW - 86400) // 60 * 60)
    assert from_rollups(db, "key", NOW - 86400) == day
    total = tuple(sum(v[i] for v in day.values()) for i in range(4))
    assert from_rollups(db, "build", NOW - 86400) == {"-": total}  # logged before builds were: none named
    db.close()


def test_the_writer_prunes_while_it_writes(tmp_path: Path):
    """Retention is the writer thread's own work, between batches, busy or idle: rows older than log_days go,
    their usage stays."""
    db = Database(f"sqlite:///{tmp_path}/podllama.db")
    now = time.time()
    old = [Row(now - 40 * 86400 - i, "k1", "POST", "embeddings", "embed", "tiny-embed", 200, 3, None, 0.1, None, 1, 1)
           for i in range(12_000)]
    fresh = [r._replace(ts=now - i) for i, r in enumerate(old[:50])]
    log = RequestLog(db, lambda keys, made: None, retention=Retention(log_days=30, log_body_days=7, usage_days=400))
    log.start()
    try:
        for r in old + fresh:
            log.add(r)
        assert wait_until(lambda: log.written == len(old) + len(fresh), 60), (log.written, log.error)
        # the writer counts a batch once all of that batch's pruning is done, after its rows are gone: both
        assert wait_until(lambda: log.pruned.get("rows") == len(old), 60), log.pruned
        assert db.query("SELECT COUNT(*) FROM podllama_requests")[0][0] == len(fresh)
        assert len(old) > 2 * 5000, "in several batches"
        assert summary(db, "key", now - 41 * 86400)[0]["requests"] == len(old) + len(fresh)
    finally:
        log.stop()
        db.close()
