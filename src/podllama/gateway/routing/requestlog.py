"""The request log: one row per request the gateway forwarded, written to the stack's database off the
request path.

A request only appends its row to a bounded queue (a deque: no lock, no wake-up; a full queue drops the row
and counts it). A writer thread takes what is queued every FLUSH_EVERY seconds, in batches of up to BATCH
rows, and inserts each batch in one transaction — waking per row would cost a thread switch and a
transaction per request. When the database is slow, the queue fills meanwhile; when it is down, the batch is kept and
tried again (every RETRY seconds, at most), so rows made during an outage are written once it is back — as
long as they fit in the queue. The same thread reads the database keys every KEYS_EVERY seconds, so that a
key made or revoked by the CLI is seen without a restart, and a slow database never holds up the event loop.

Each batch adds its requests to the usage rollups (access/rollups.py) in the same transaction, and every
PRUNE_EVERY seconds the thread prunes what retention says is old (access/retention.py), a batch at a time
between its writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from ...access import rollups, samples
from ...access.database import REQUESTS, Database, DatabaseError
from ...access.keys import Key, KeyStore
from ...access.retention import BATCH as BATCH_PRUNE
from ...access.retention import Retention, prune
from ...config import GatewaySection

log = logging.getLogger("podllama.gateway")

CAPACITY = 50_000
BATCH = 1000
FLUSH_EVERY = 0.25
RETRY = 2.0
KEYS_EVERY = 2.0
PRUNE_EVERY = 60.0


class Row(NamedTuple):
    ts: float
    key_id: str | None
    method: str
    route: str
    server: str | None
    model: str | None
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    latency: float
    ttft: float | None
    bytes_in: int
    bytes_out: int
    request_body: str | None = None
    response_body: str | None = None
    # which build and model file answered (servers.Lineage; empty where it was not known, or no server answered)
    image: str = ""
    llama_commit: str = ""
    model_sha256: str = ""
    config_hash: str = ""


INSERT = f"INSERT INTO {REQUESTS} ({', '.join(Row._fields)}) VALUES ({', '.join('?' * len(Row._fields))})"


class RequestLog:
    def __init__(self, db: Database, on_keys: Callable[[dict[str, Key], bool], None], capacity: int = CAPACITY,
                 enabled: bool = True, retention: Retention | None = None) -> None:
        """ON_KEYS: given the usable database keys (by hash), and whether any key was ever made, whenever they
        have been read."""
        self.db, self.on_keys = db, on_keys
        self.enabled = enabled
        self.retention = retention or Retention.of(GatewaySection())
        self.pruned: dict[str, int] = {}  # rows each kind of pruning has touched since the start
        self.capacity = capacity
        self.queue: deque[Row] = deque()
        self.written = 0
        self.dropped = 0  # rows that found the queue full
        self.error: str | None = None  # the last failure, while it lasts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[Row] = []
        self._old: list[Database] = []  # databases moved away from, to close
        # requests kept for the update's conformance check ([update] sample; access/samples.py)
        self.reservoir = samples.Reservoir(0)
        self.samples: deque[tuple[samples.Sample, bytes]] = deque(maxlen=1000)  # drawn; the body decoded, checked later
        self._trim: int | None = 0  # slots from here on are deleted at the next write (0: every sample)

    # -- the request path ------------------------------------------------------------------------------------
    def add(self, row: Row) -> None:
        if not self.enabled:
            return
        if len(self.queue) >= self.capacity:
            self.dropped += 1
            return
        self.queue.append(row)

    def sample(self, server: str, family: str, path: str, body: Callable[[], bytes]) -> None:
        """A request answered 200 by SERVER (its body at most samples.MAX_BODY): its BODY read and kept only if
        the reservoir draws it; decoded, checked and written off the request path."""
        slot = self.reservoir.offer(server, family)
        if slot is not None:
            self.samples.append((samples.Sample(server, family, slot, time.time(), path, ""), body()))

    def keep_samples(self, size: int) -> None:
        """Keep SIZE requests per server and family from now on (0: none, and the kept ones deleted)."""
        if size != self.reservoir.size:
            self.reservoir = samples.Reservoir(size)
            self._trim = size

    # -- the writer --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="podllama-request-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (within TIMEOUT), then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def move_to(self, db: Database) -> None:
        """Use DB from now on; the writer closes the old one (closing may wait on a slow database)."""
        self._old.append(self.db)
        self.db = db

    def read_keys(self) -> bool:
        try:
            store = KeyStore(self.db)
            keys, made = store.by_hash(), store.any_made()
        except DatabaseError as e:
            self._failed(e)
            return False
        self.on_keys(keys, made)
        return True

    def recent(self, seconds: float) -> list[tuple[str, float, int]]:
        """(key id, time, tokens) for the requests made with a key in the last SECONDS, from the minute rollups
        (to fill the limits at start): a minute bucket's requests count as made at its end (or now), so a restart
        never gives a key a fresher minute than it had — at most a stricter one. One entry per request; its
        bucket's tokens on the first."""
        now = time.time()
        try:
            rows = self.db.query(f"SELECT key_id, bucket, SUM(requests), SUM(prompt_tokens + completion_tokens) "
                                 f"FROM {rollups.TABLE} WHERE span = ? AND bucket > ? AND key_id <> '' "
                                 "GROUP BY key_id, bucket", (rollups.MINUTE, now - seconds - rollups.MINUTE))
        except DatabaseError as e:
            self._failed(e)
            return []
        out = []
        for key_id, bucket, requests, tokens in rows:
            at = min(float(bucket) + rollups.MINUTE, now)
            out += [(str(key_id), at, int(tokens or 0) if i == 0 else 0) for i in range(int(requests))]
        return out

    def _run(self) -> None:
        next_keys = retry_at = 0.0
        next_prune = time.monotonic() + FLUSH_EVERY
        while True:
            while self._old:
                self._old.pop().close()
            stopping = self._stop.is_set()
            now = time.monotonic()
            if now >= next_keys and not stopping:
                self.read_keys()
                next_keys = now + KEYS_EVERY
            if now >= next_prune and not stopping and self.error is None:  # busy or idle: a batch between writes
                # again soon while there is more to prune, or rows still to write (they may be old ones: a
                # backlog written after an outage is pruned as it lands, not a PRUNE_EVERY later)
                writing = bool(self.queue or self._pending)
                next_prune = now + (FLUSH_EVERY if self._prune() or writing else PRUNE_EVERY)
            while len(self._pending) < BATCH and self.queue:
                self._pending.append(self.queue.popleft())
            if not stopping and (self.samples or self._trim is not None) and time.monotonic() >= retry_at:
                self._write_samples()
            if not self._pending:
                if stopping:
                    return
                self._stop.wait(FLUSH_EVERY)
                continue
            if time.monotonic() < retry_at:
                if stopping:
                    return
                self._stop.wait(FLUSH_EVERY)
                continue
            try:
                self.db.write([(INSERT, self._pending), (rollups.UPSERT, rollups.rows_for(self._pending))])
            except DatabaseError as e:
                self._failed(e)
                retry_at = time.monotonic() + RETRY
                if stopping:
                    return
                continue
            self.written += len(self._pending)
            self._pending = []
            if self.error is not None:
                log.info("the database is written again (%s)", self.db.where)
                self.error = None
            if not self.queue and not stopping:
                self._stop.wait(FLUSH_EVERY)

    def _write_samples(self) -> None:
        kept = []
        while self.samples:
            sample, raw = self.samples.popleft()
            if sample.slot < self.reservoir.size and samples.sampleable(raw):
                kept.append(sample._replace(body=raw.decode(errors="replace")))
        try:
            if self._trim is not None:
                self.db.execute(samples.TRIM, (self._trim,))
                self._trim = None
            self.db.write([(samples.UPSERT, kept)])
        except DatabaseError as e:
            self._failed(e)  # these samples are lost; later requests are drawn again

    def _prune(self) -> bool:
        """One batch of pruning; True when there is more to do."""
        try:
            done = prune(self.db, self.retention)
        except DatabaseError as e:
            self._failed(e)
            return False
        for kind, n in done.items():
            self.pruned[kind] = self.pruned.get(kind, 0) + n
        return any(n >= BATCH_PRUNE for n in done.values())

    def _failed(self, e: DatabaseError) -> None:
        if self.error is None:
            log.warning("the database cannot be used now; keys stay as last read, request log rows wait in "
                        "memory (up to %d): %s", self.capacity, e)
        self.error = str(e)

    @property
    def waiting(self) -> int:
        return len(self.queue) + len(self._pending)
