"""What the request log says: requests, errors, tokens and latency since a time, grouped by key, model,
server or route (`podllama usage`, GET /admin/usage)."""

from __future__ import annotations

import re
import time
from typing import Any

from ..units import timestamp_of
from . import rollups
from .database import REQUESTS, Database
from .keys import KeyStore

# usage by … → the rollups' column; build: the llama.cpp commit, model-file: the model file's sha256
BY = {"key": "key_id", "model": "model", "server": "server", "route": "route", "build": "llama_commit",
      "model-file": "model_sha256"}
_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def since_of(text: str, now: float | None = None) -> float:
    """A time from "30m", "24h", "7d", "2w" (that long ago) or an ISO date/time (UTC unless it says)."""
    now = time.time() if now is None else now
    if m := _SPAN.match(text):
        return now - float(m.group(1)) * _SECONDS[m.group(2)]
    when = timestamp_of(text)
    if when is None:
        raise ValueError(f"--since '{text}' is neither a span (30m, 24h, 7d) nor a date (2026-11-01)")
    return when


def summary(db: Database, by: str = "key", since: float = 0.0, now: float | None = None) -> list[dict[str, Any]]:
    """One row per group: requests, errors (status 400 and above), prompt and completion tokens, mean latency and
    time to first byte (seconds), and the latency under which half and 95 % answered (a histogram bucket's upper
    edge). Read from the rollups (rollups.spans_for: to the minute for the last two days, else to the hour), so
    its cost follows the buckets, not the requests."""
    if by not in BY:
        raise ValueError(f"usage by '{by}': choose one of {', '.join(BY)}")
    column = BY[by]
    now = time.time() if now is None else now
    sums = ", ".join(f"SUM({c})" for c in rollups.SUMS)
    groups: dict[str, list[float]] = {}
    for span, lo, hi in rollups.spans_for(since, now):
        rows = db.query(f"SELECT {column}, SUM(CASE WHEN status_class >= 4 THEN requests ELSE 0 END), {sums} "
                        f"FROM {rollups.TABLE} WHERE span = ? AND bucket >= ? AND bucket < ? GROUP BY {column}",
                        (span, int(lo), int(hi)))
        for group, *values in rows:
            acc = groups.setdefault(group, [0.0] * len(values))
            for i, v in enumerate(values):
                acc[i] += float(v or 0)
    names = _key_names(db) if by == "key" else {}
    out = []
    for group, (errors, requests, prompt, completion, latency, ttft, ttft_n, *bins) in groups.items():
        label = (names.get(group, group) if group else "(no key)") if by == "key" else (group or "-")
        counts = [int(b) for b in bins]
        out.append({by: label, **({"key_id": group or None} if by == "key" else {}), "requests": int(requests),
                    "errors": int(errors), "prompt_tokens": int(prompt), "completion_tokens": int(completion),
                    "mean_latency_s": round(latency / requests, 4) if requests else None,
                    "mean_ttfb_s": round(ttft / ttft_n, 4) if ttft_n else None,
                    "p50_latency_s": rollups.percentile(counts, 0.5), "p95_latency_s": rollups.percentile(counts, 0.95)})
    return sorted(out, key=lambda r: -r["requests"])


RECENT = ("ts", "key_id", "method", "route", "server", "model", "status", "prompt_tokens", "completion_tokens",
          "latency", "ttft", "bytes_in", "bytes_out", "image", "llama_commit", "model_sha256", "config_hash")
_HEX = re.compile(r"^[0-9a-f]{4,64}$")


def recent(db: Database, limit: int = 100, commit: str | None = None) -> list[dict[str, Any]]:
    """The last LIMIT requests, newest first (no bodies); with COMMIT (4 to 64 hex digits), only those a build of
    that llama.cpp commit answered."""
    where = ""
    params: list[Any] = [max(1, min(limit, 1000))]
    if commit is not None:
        if not _HEX.match(commit.lower()):
            raise ValueError(f"commit '{commit[:80]}' is not 4 to 64 hex digits (a llama.cpp commit or its prefix)")
        where = "WHERE llama_commit >= ? AND llama_commit < ? "  # a prefix, by the index
        params = [commit.lower(), commit.lower() + "g", *params]
    rows = db.query(f"SELECT {', '.join(RECENT)} FROM {REQUESTS} {where}ORDER BY ts DESC LIMIT ?", params)
    names = _key_names(db)
    keys = RECENT
    return [{**dict(zip(keys, r, strict=True)), "key": names.get(r[1], r[1]) if r[1] else None} for r in rows]


def _key_names(db: Database) -> dict[str, str]:
    return {k.id: k.name for k in KeyStore(db).list()}
