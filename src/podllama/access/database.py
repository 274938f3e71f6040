"""The stack's database: keys and the request log, in SQLite (a file in the state directory, nothing to
install) or in Postgres (`[gateway] database = "postgresql://…"`, or `$PODLLAMA_DATABASE` given to
`podllama start`).

One schema for both, written in the SQL they share, brought up to date by MIGRATIONS (numbered, each applied
once, in a transaction, under a lock: the CLI and the gateway may both open the database at once). Statements
are written with `?` placeholders; Postgres gets them as `%s`. One connection per Database, used under a lock
from any thread; a connection that failed is dropped and made again on the next use, so a database that comes
back is used again without a restart.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..validate import database_url, url_shown
from . import rollups, samples

SQLITE_FILE = "podllama.db"
REQUESTS = "podllama_requests"  # the request log's rows (the gateway's requestlog.Row)

Step = str | Callable[[Any, Callable[[str], str]], None]  # a statement, or code given (connection, to_sql)


def _backfill_rollups(conn: Any, sql: Callable[[str], str]) -> None:
    """Rollups for the rows logged before there were rollups (once, when migration 2 is applied)."""
    from types import SimpleNamespace

    fields = ("ts", "key_id", "route", "server", "model", "status", "prompt_tokens", "completion_tokens", "latency",
              "ttft")
    cur = conn.execute(f"SELECT {', '.join(fields)} FROM {REQUESTS}")
    while chunk := cur.fetchmany(10_000):
        rows = rollups.rows_for(SimpleNamespace(**dict(zip(fields, r, strict=True)), llama_commit="",
                                                model_sha256="") for r in chunk)
        _many(conn, sql(rollups.UPSERT), rows)


def _many(conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    if isinstance(conn, sqlite3.Connection):
        conn.executemany(sql, rows)
    else:
        with conn.cursor() as cur:
            cur.executemany(sql, rows)


# (version, steps); a migration is never edited once released: a change is a new one
MIGRATIONS: list[tuple[int, list[Step]]] = [
    (1, [
        """CREATE TABLE podllama_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            models TEXT NOT NULL DEFAULT '[]',
            servers TEXT NOT NULL DEFAULT '[]',
            roles TEXT NOT NULL DEFAULT '[]',
            admin INTEGER NOT NULL DEFAULT 0,
            rpm INTEGER,
            tpm INTEGER,
            concurrency INTEGER,
            created DOUBLE PRECISION NOT NULL,
            expires DOUBLE PRECISION,
            revoked DOUBLE PRECISION)""",
        """CREATE TABLE podllama_requests (
            ts DOUBLE PRECISION NOT NULL,
            key_id TEXT,
            method TEXT NOT NULL,
            route TEXT NOT NULL,
            server TEXT,
            model TEXT,
            status INTEGER NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            latency DOUBLE PRECISION,
            ttft DOUBLE PRECISION,
            bytes_in BIGINT,
            bytes_out BIGINT,
            request_body TEXT,
            response_body TEXT)""",
        "CREATE INDEX podllama_requests_ts ON podllama_requests (ts)",
    ]),
    (2, [  # rollups, retention, lineage (which build and model file answered)
        "ALTER TABLE podllama_requests ADD COLUMN image TEXT",
        "ALTER TABLE podllama_requests ADD COLUMN llama_commit TEXT",
        "ALTER TABLE podllama_requests ADD COLUMN model_sha256 TEXT",
        "ALTER TABLE podllama_requests ADD COLUMN config_hash TEXT",
        "CREATE INDEX podllama_requests_commit ON podllama_requests (llama_commit, ts)",
        # the rows whose bodies are still kept, for pruning bodies without reading every row
        "CREATE INDEX podllama_requests_bodies ON podllama_requests (ts) "
        "WHERE request_body IS NOT NULL OR response_body IS NOT NULL",
        *rollups.SCHEMA,
        _backfill_rollups,
    ]),
    (3, [*samples.SCHEMA]),  # requests kept for the update's conformance check ([update] sample)
]
LATEST = MIGRATIONS[-1][0]


class DatabaseError(Exception):
    """The database cannot be used; the message names it (never its password) and what to do."""


def url_of(setting: str | None, state_dir: Path) -> str:
    """The database's URL: SETTING (a postgresql:// or sqlite:/// URL), else the SQLite file in STATE_DIR."""
    if setting:
        return setting
    return f"sqlite:///{(Path(state_dir) / SQLITE_FILE).resolve()}"


class Database:
    def __init__(self, url: str) -> None:
        self.url = database_url(url)
        self.postgres = urlsplit(url).scheme != "sqlite"
        self._conn: Any = None
        self._lock = threading.RLock()
        self._migrated = False

    @classmethod
    def of_stack(cls, setting: str | None, state_dir: Path) -> Database:
        return cls(url_of(setting, state_dir))

    @property
    def where(self) -> str:
        return url_shown(self.url)

    @property
    def _sqlite_file(self) -> Path:
        return Path(self.url[len("sqlite:///") - 1:])

    # -- connecting ------------------------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self.postgres:
            try:
                import psycopg
            except ImportError:
                raise DatabaseError("Postgres needs the psycopg package: pip install 'psycopg[binary]' (it comes "
                                    "with podllama[gateway])") from None
            try:
                return psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            except psycopg.Error as e:
                raise DatabaseError(f"cannot connect to {self.where}: {_first_line(e)}; is Postgres running there "
                                    "and the URL right ([gateway] database)?") from None
        path = self._sqlite_file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except (OSError, sqlite3.Error) as e:
            raise DatabaseError(f"cannot open the database {path}: {e}; check that its directory is writable") from None
        path.chmod(0o600)  # key hashes and the request log: the owner's alone
        return conn

    def _errors(self) -> tuple[type[Exception], ...]:
        if self.postgres:
            import psycopg

            return (psycopg.Error,)
        return (sqlite3.Error,)

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
                if not self._migrated:
                    self._migrate(self._conn)
                    self._migrated = True
            try:
                yield self._conn
            except self._errors() as e:
                self._drop()
                raise DatabaseError(f"database {self.where}: {_first_line(e)}") from None

    def _drop(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception:  # a broken connection may fail to close as well
            pass
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- statements ------------------------------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the rows it changed."""
        with self._connection() as conn:
            cur = conn.execute(self._sql(sql), tuple(params))
            return int(cur.rowcount or 0)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as conn:
            return [tuple(row) for row in conn.execute(self._sql(sql), tuple(params)).fetchall()]

    def write(self, work: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        """Each (statement, rows) of WORK run for its rows, all in one transaction."""
        with self._connection() as conn, self._transaction(conn):
            for sql, rows in work:
                if rows:
                    _many(conn, self._sql(sql), rows)

    def some(self, table: str, where: str) -> str:
        """A condition on TABLE's rows for at most ? of those matching WHERE (the last placeholder: how many),
        for work done in small batches: `DELETE FROM t WHERE {some(t, "ts < ?")}`."""
        row = "ctid" if self.postgres else "rowid"
        return f"{row} IN (SELECT {row} FROM {table} WHERE {where} LIMIT ?)"

    def size(self) -> int | None:
        """Bytes the database takes on disk (its file and journal; in Postgres, podllama's tables and indexes)."""
        if self.postgres:
            rows = self.query("SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                              "WHERE c.relkind = 'r' AND left(c.relname, 9) = 'podllama_'")
            return int(rows[0][0])
        path = self._sqlite_file
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists()) or None

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        if self.postgres:
            with conn.transaction():
                yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- the schema ------------------------------------------------------------------------------------------
    def _migrate(self, conn: Any) -> None:
        try:
            with self._transaction(conn):
                if self.postgres:  # one migrator at a time; SQLite's BEGIN IMMEDIATE already is
                    conn.execute("SELECT pg_advisory_xact_lock(5170001)")
                conn.execute("CREATE TABLE IF NOT EXISTS podllama_schema (version INTEGER NOT NULL)")
                row = conn.execute("SELECT MAX(version) FROM podllama_schema").fetchone()
                current = row[0] or 0
                if current > LATEST:
                    raise DatabaseError(f"database {self.where} has schema version {current}, newer than this "
                                        f"podllama knows ({LATEST}); update podllama")
                for version, steps in MIGRATIONS:
                    if version > current:
                        for step in steps:
                            if isinstance(step, str):
                                conn.execute(step)
                            else:
                                step(conn, self._sql)
                        conn.execute(self._sql("INSERT INTO podllama_schema (version) VALUES (?)"), (version,))
        except self._errors() as e:
            self._drop()
            raise DatabaseError(f"database {self.where}: cannot bring its schema up to date: {_first_line(e)}") from None

    def version(self) -> int:
        return int(self.query("SELECT MAX(version) FROM podllama_schema")[0][0] or 0)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
