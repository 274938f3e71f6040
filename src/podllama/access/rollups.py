"""Usage rollups: the request log summed per time bucket, so that a summary costs what its buckets cost, not what
its rows cost.

Two spans: a minute (kept MINUTES_KEPT, for exact recent summaries and for the limits' last minute after a
restart) and an hour (kept `[gateway] usage_days`). A bucket's row is keyed by key × route × server × model ×
status class × build (llama.cpp commit) × model file (sha256), and holds requests, prompt and completion tokens,
latency and time-to-first-byte sums and a latency histogram (HISTOGRAM's edges). The request log's writer adds
each batch's rows to both spans in the same transaction as the rows themselves (add()), so rollups and rows never
disagree.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

MINUTE, HOUR = 60, 3600
SPANS = (MINUTE, HOUR)
MINUTES_KEPT = 2 * 86400  # minute buckets older than this are pruned; summaries reaching further go by the hour
HISTOGRAM = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # latency edges (s); one more bucket above the last
TABLE = "podllama_usage"

DIMENSIONS = ("key_id", "route", "server", "model", "status_class", "llama_commit", "model_sha256")
BINS = tuple(f"h{i}" for i in range(len(HISTOGRAM) + 1))
SUMS = ("requests", "prompt_tokens", "completion_tokens", "latency_sum", "ttft_sum", "ttft_count", *BINS)
COLUMNS = ("span", "bucket", *DIMENSIONS, *SUMS)

SCHEMA = [
    f"""CREATE TABLE {TABLE} (
        span INTEGER NOT NULL,
        bucket BIGINT NOT NULL,
        key_id TEXT NOT NULL,
        route TEXT NOT NULL,
        server TEXT NOT NULL,
        model TEXT NOT NULL,
        status_class INTEGER NOT NULL,
        llama_commit TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        requests BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        latency_sum DOUBLE PRECISION NOT NULL,
        ttft_sum DOUBLE PRECISION NOT NULL,
        ttft_count BIGINT NOT NULL,
        {', '.join(f'{b} BIGINT NOT NULL' for b in BINS)},
        PRIMARY KEY (span, bucket, {', '.join(DIMENSIONS)}))""",
]

UPSERT = (f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
          f"ON CONFLICT (span, bucket, {', '.join(DIMENSIONS)}) DO UPDATE SET "
          + ", ".join(f"{c} = {TABLE}.{c} + excluded.{c}" for c in SUMS))


def rows_for(batch: Iterable[Any]) -> list[tuple[Any, ...]]:
    """BATCH (logged requests: requestlog.Row's ts, key_id, route, server, model, status, tokens, latency,
    ttft, llama_commit, model_sha256) summed into one upsert row per span, bucket and dimensions (a batch of a
    thousand requests is a few rows: the same key, route and server, a minute or two)."""
    sums: dict[tuple[Any, ...], list[float]] = {}
    for r in batch:
        dims = (r.key_id or "", r.route, r.server or "", r.model or "", r.status // 100, r.llama_commit or "",
                r.model_sha256 or "")
        ttft = r.ttft
        for span in SPANS:
            acc = sums.setdefault((span, int(r.ts // span) * span, *dims), [0.0] * len(SUMS))
            acc[0] += 1
            acc[1] += r.prompt_tokens or 0
            acc[2] += r.completion_tokens or 0
            acc[3] += r.latency or 0.0
            if ttft is not None:
                acc[4] += ttft
                acc[5] += 1
            acc[6 + bisect.bisect_left(HISTOGRAM, r.latency or 0.0)] += 1
    return [(*k, *(v if i in (3, 4) else int(v) for i, v in enumerate(acc))) for k, acc in sums.items()]


def spans_for(since: float, now: float) -> list[tuple[int, float, float]]:
    """(span, from, to) to read for the time since SINCE: whole hours from the hour buckets, the part before the
    first whole hour from the minute buckets while they are kept (to the minute), else from the hour that holds
    SINCE (to the hour)."""
    first_hour = -(-since // HOUR) * HOUR
    if since >= now - MINUTES_KEPT + HOUR and first_hour > since:
        return [(MINUTE, since // MINUTE * MINUTE, first_hour), (HOUR, first_hour, now + HOUR)]
    return [(HOUR, since // HOUR * HOUR, now + HOUR)]


def percentile(bins: Sequence[int], q: float) -> float | None:
    """The latency below which Q of the requests in BINS answered, as the upper edge of its histogram bucket
    (None above the last edge, or with no requests)."""
    total = sum(bins)
    if not total:
        return None
    seen = 0
    for edge, n in zip((*HISTOGRAM, None), bins, strict=True):
        seen += n
        if seen >= q * total:
            return edge
    return None
