"""What the request log says: requests, errors, tokens and latency since a time, grouped by key, model,
server or route (`podllama usage`, GET /admin/usage)."""

from __future__ import annotations

import re
import time
from typing import Any

from ..units import timestamp_of
from .database import Database
from .keys import KeyStore

BY = {"key": "key_id", "model": "model", "server": "server", "route": "route"}
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


def summary(db: Database, by: str = "key", since: float = 0.0) -> list[dict[str, Any]]:
    """One row per group: requests, errors (status 400 and above), prompt and completion tokens, mean latency
    and time to first byte (seconds)."""
    if by not in BY:
        raise ValueError(f"usage by '{by}': choose one of {', '.join(BY)}")
    column = BY[by]
    rows = db.query(
        f"SELECT {column}, COUNT(*), SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "
        "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), AVG(latency), AVG(ttft) "
        f"FROM podllama_requests WHERE ts >= ? GROUP BY {column} ORDER BY COUNT(*) DESC", (since,))
    names = _key_names(db) if by == "key" else {}
    out = []
    for group, requests, errors, prompt, completion, latency, ttft in rows:
        label = (names.get(group, group) if group else "(no key)") if by == "key" else (group or "-")
        out.append({by: label, **({"key_id": group} if by == "key" else {}), "requests": int(requests),
                    "errors": int(errors or 0), "prompt_tokens": int(prompt), "completion_tokens": int(completion),
                    "mean_latency_s": round(float(latency), 4) if latency is not None else None,
                    "mean_ttfb_s": round(float(ttft), 4) if ttft is not None else None})
    return out


def recent(db: Database, limit: int = 100) -> list[dict[str, Any]]:
    """The last LIMIT requests, newest first (no bodies)."""
    rows = db.query("SELECT ts, key_id, method, route, server, model, status, prompt_tokens, completion_tokens, "
                    "latency, ttft, bytes_in, bytes_out FROM podllama_requests ORDER BY ts DESC LIMIT ?",
                    (max(1, min(limit, 1000)),))
    names = _key_names(db)
    keys = ("ts", "key_id", "method", "route", "server", "model", "status", "prompt_tokens", "completion_tokens",
            "latency", "ttft", "bytes_in", "bytes_out")
    return [{**dict(zip(keys, r, strict=True)), "key": names.get(r[1], r[1]) if r[1] else None} for r in rows]


def _key_names(db: Database) -> dict[str, str]:
    return {k.id: k.name for k in KeyStore(db).list()}
