"""A sample of the stack's own requests, bodies included, for the update's conformance check to replay — kept
only where `[update] sample = N` asks for it, never otherwise.

Per server and route family (the gateway's endpoint name: chat.completions, embeddings.oai …) at most N
requests are kept, chosen by reservoir sampling over the requests seen since the gateway started: the k-th
request of a family takes a random slot with probability N/k, so every request seen had the same chance to be
kept whatever the traffic. A slot is one row, replaced in place (SCHEMA), so the table never holds more than
servers × families × N rows. Only answered requests (200) with a JSON body of at most MAX_BODY bytes are offered.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

TABLE = "podllama_samples"
MAX_BODY = 256 * 1024
SCHEMA = [
    f"""CREATE TABLE {TABLE} (
        server TEXT NOT NULL,
        family TEXT NOT NULL,
        slot INTEGER NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        path TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (server, family, slot))""",
]
UPSERT = (f"INSERT INTO {TABLE} (server, family, slot, ts, path, body) VALUES (?, ?, ?, ?, ?, ?) "
          "ON CONFLICT (server, family, slot) DO UPDATE SET ts = excluded.ts, path = excluded.path, "
          "body = excluded.body")
TRIM = f"DELETE FROM {TABLE} WHERE slot >= ?"  # after N was lowered (to 0: every sample goes)


class Sample(NamedTuple):
    server: str
    family: str
    slot: int
    ts: float
    path: str
    body: str


class Reservoir:
    """Which requests to keep: N slots per (server, family), each request seen given an equal chance."""

    def __init__(self, size: int, rng: random.Random | None = None) -> None:
        self.size = size
        self.seen: dict[tuple[str, str], int] = {}
        self.rng = rng or random.Random()

    def offer(self, server: str, family: str) -> int | None:
        """The slot the request just seen goes to, or None where it is not kept."""
        if self.size <= 0:
            return None
        k = self.seen.get((server, family), 0) + 1
        self.seen[(server, family)] = k
        if k <= self.size:
            return k - 1
        slot = self.rng.randrange(k)
        return slot if slot < self.size else None


def sampleable(body: bytes) -> bool:
    """A body worth keeping: JSON, an object, within MAX_BODY."""
    if len(body) > MAX_BODY:
        return False
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


def read(db: Any, server: str, size: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, path, body) of SERVER's kept samples, by family and slot, the first SIZE slots of each."""
    out = []
    rows: Sequence[tuple[Any, ...]] = db.query(
        f"SELECT family, slot, path, body FROM {TABLE} WHERE server = ? AND slot < ? ORDER BY family, slot",
        (server, size))
    for family, slot, path, body in rows:
        try:
            value = json.loads(body)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append((f"sample.{family}.{slot}", str(path), value))
    return out
