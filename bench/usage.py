#!/usr/bin/env python3
"""Usage summaries over a big request log: rollups against the rows, side by side in one run.

Writes --rows synthetic requests spread over --days days (a few keys, routes, servers, two builds, some
errors) through the request log's own write path — each batch of 1000 rows and its rollups in one transaction,
as the writer thread does — and measures:

  writer   rows/s sustained with rollups on (against the gateway's peak rate from bench/RESULTS-requestlog.md)
  summary  `usage` by key and by build for the last 24 h and 30 days: from the rollups (what podllama does) and
           from the rows (what it did before rollups, the same SQL it ran), medians of --repeat runs each
  size     the database's bytes with every row kept, and after retention pruned it to [gateway] log_days = 7

on SQLite (a file in a temporary directory) and, with --postgres URL, on Postgres. Writes bench/RESULTS-usage.md
and bench/results-usage.json.

Usage: bench/usage.py [--rows 10000000] [--days 30] [--postgres postgresql://…] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from podllama.access import rollups, usage  # noqa: E402
from podllama.access.database import Database  # noqa: E402
from podllama.access.retention import Retention, prune  # noqa: E402
from podllama.gateway.routing.requestlog import INSERT, Row  # noqa: E402

BATCH = 1000
COMMITS = ["0c1e57098bba" + "0" * 28, "1234abcd" + "f" * 32]
GATEWAY_PEAK = 6442  # small requests/s through one gateway, log on (bench/RESULTS-requestlog.md)


def fill(db: Database, rows: int, days: float, now: float) -> float:
    """ROWS requests over DAYS before NOW, in time order (as a log is written); returns rows/s."""
    rnd = random.Random(1)
    span = days * 86400
    started = time.perf_counter()
    for start in range(0, rows, BATCH):
        batch = []
        for i in range(start, min(rows, start + BATCH)):
            server = "chat" if rnd.random() < 0.8 else "embed"
            batch.append(Row(now - span + span * i / rows, rnd.choice(["k1", "k2", "k3", "k4", None]), "POST",
                             "chat.completions" if server == "chat" else "embeddings", server, f"tiny-{server}",
                             200 if rnd.random() < 0.97 else 503, rnd.randint(5, 500), rnd.randint(1, 200),
                             rnd.random() * 3, rnd.random() * 0.2, 800, 1500, None, None, "sha256:img",
                             COMMITS[i * 2 // rows], "a" * 64, "cfg"))
        db.write([(INSERT, batch), (rollups.UPSERT, rollups.rows_for(batch))])
        if start // BATCH % 1000 == 0:
            print(f"  {start + len(batch):,} rows", file=sys.stderr)
    return rows / (time.perf_counter() - started)


def from_rows(db: Database, by: str, since: float) -> list[tuple[object, ...]]:
    """The summary as it was read before rollups: every row since SINCE."""
    column = usage.BY[by]
    return db.query(f"SELECT {column}, COUNT(*), SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "
                    "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), AVG(latency), AVG(ttft) "
                    f"FROM podllama_requests WHERE ts >= ? GROUP BY {column}", (since,))


def timed(work, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(url: str, rows: int, days: float, repeat: int) -> dict[str, object]:
    db = Database(url)
    now = time.time()
    print(f"{db.where}: writing {rows:,} rows", file=sys.stderr)
    rate = fill(db, rows, days, now)
    size_all = db.size()
    out: dict[str, object] = {"database": "postgres" if db.postgres else "sqlite", "rows": rows, "days": days,
                              "writer_rows_per_s": round(rate), "bytes_all_rows": size_all, "summaries": []}
    for label, since in (("24 h", now - 86400), ("30 days", now - 30 * 86400)):
        for by in ("key", "build"):
            rolled = timed(lambda b=by, s=since: usage.summary(db, b, s, now=now), repeat)
            raw = timed(lambda b=by, s=since: from_rows(db, b, s), max(1, repeat // 2))
            out["summaries"].append({"span": label, "by": by, "rollups_ms": round(rolled * 1000, 2),  # type: ignore[attr-defined]
                                     "rows_ms": round(raw * 1000, 1), "ratio": round(raw / rolled, 1)})
    keep = Retention(log_days=7, log_body_days=7, usage_days=400)
    t0 = time.perf_counter()
    while any(prune(db, keep, now=now).values()):
        pass
    out["prune_seconds"] = round(time.perf_counter() - t0, 1)
    if not db.postgres:
        db.execute("VACUUM")
    else:
        db.execute("VACUUM podllama_requests")
    out["bytes_after_retention"] = db.size()
    out["rows_after_retention"] = db.query("SELECT COUNT(*) FROM podllama_requests")[0][0]
    out["summary_30d_after_retention_ms"] = round(timed(lambda: usage.summary(db, "key", now - 30 * 86400, now=now),
                                                        repeat) * 1000, 2)
    db.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--days", type=float, default=30)
    p.add_argument("--postgres", help="a postgresql:// URL of an empty database to measure too")
    p.add_argument("--postgres-rows", type=int, help="rows for Postgres (default: --rows)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="podllama-usage-", dir="/var/tmp") as d:
        results.append(measure(f"sqlite:///{d}/podllama.db", args.rows, args.days, args.repeat))
    if args.postgres:
        results.append(measure(args.postgres, args.postgres_rows or args.rows, args.days, args.repeat))
    cores = len(__import__("os").sched_getaffinity(0))
    lines = [f"# Usage over a big request log\n\n`bench/usage.py --rows {args.rows}`"
             f"{' --postgres … --postgres-rows ' + str(args.postgres_rows) if args.postgres else ''}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {cores} cores.\n",
             "Summaries read from the rollups (what `podllama usage`, `/admin/usage` and the dashboard do) against the "
             "same summary read from the rows (what they did before rollups), side by side on the same database; "
             "medians. The writer's rate is rows/s with rollups, written as the request log's thread writes them "
             f"(batches of {BATCH} rows and their rollups, one transaction each); the gateway's peak, for "
             f"comparison, is {GATEWAY_PEAK} requests/s (bench/RESULTS-requestlog.md). Sizes after retention: SQLite "
             "after VACUUM; Postgres after a plain VACUUM, which keeps the freed pages for new rows (the size stops "
             "growing; VACUUM FULL would return them).\n"]
    for r in results:
        lines += [f"## {r['database']}: {r['rows']:,} requests over {r['days']:g} days\n",
                  f"- writer: **{r['writer_rows_per_s']:,} rows/s** with rollups "
                  f"({r['writer_rows_per_s'] / GATEWAY_PEAK:.1f}× the gateway's peak)",
                  f"- size with every row: {r['bytes_all_rows'] / 2**20:,.0f} MiB; after retention "
                  f"(log_days = 7, pruned in batches in {r['prune_seconds']} s): "
                  f"{r['bytes_after_retention'] / 2**20:,.0f} MiB, {r['rows_after_retention']:,} rows",
                  f"- a 30-day summary after retention, from the rollups: {r['summary_30d_after_retention_ms']} ms\n",
                  "| span | by | rollups | rows | rows ÷ rollups | under 100 ms |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['span']} | {s['by']} | {s['rollups_ms']} ms | {s['rows_ms']:,} ms | {s['ratio']:,}× | "
                  f"{'✓' if s['rollups_ms'] < 100 else '✗'} |" for s in r["summaries"]]  # type: ignore[attr-defined]
        lines.append("")
    (ROOT / "bench" / "RESULTS-usage.md").write_text("\n".join(lines))
    (ROOT / "bench" / "results-usage.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
