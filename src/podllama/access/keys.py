"""Keys made with `podllama keys create` (or POST /admin/keys): each with a name, an optional scope (models,
servers, roles), admin rights or not, limits (requests and tokens per minute, requests at once) and an expiry.

The key itself is shown once, when it is made; the database keeps only its SHA-256 (a key is 32 random bytes,
so a plain hash cannot be turned back) and its first characters, to tell keys apart in a list. A key is found
by the hash of what a request presents.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from ..config import NAME_RE, Config
from ..units import timestamp_of
from .database import Database

KEY_PREFIX = "pk-"
PREFIX_SHOWN = 10  # characters of a key kept to tell keys apart ("pk-AbCdEfG")
COLUMNS = "id, name, prefix, models, servers, roles, admin, rpm, tpm, concurrency, created, expires, revoked"


class KeyProblem(ValueError):
    """A key that cannot be made, found or revoked; the message says why."""


def digest(key: bytes | str) -> str:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


@dataclass(frozen=True)
class Key:
    id: str
    name: str
    prefix: str
    models: tuple[str, ...] = ()
    servers: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    admin: bool = False
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    created: float = 0.0
    expires: float | None = None
    revoked: float | None = None

    @classmethod
    def of_row(cls, row: tuple[Any, ...]) -> Key:
        (id_, name, prefix, models, servers, roles, admin, rpm, tpm, conc, created, expires, revoked) = row
        return cls(id_, name, prefix, tuple(json.loads(models)), tuple(json.loads(servers)), tuple(json.loads(roles)),
                   bool(admin), rpm, tpm, conc, float(created), expires, revoked)

    def usable(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.revoked is None and (self.expires is None or now < self.expires)

    @property
    def state(self) -> str:
        if self.revoked is not None:
            return "revoked"
        return "expired" if not self.usable() else "active"

    def public(self) -> dict[str, Any]:
        """What a list shows (never the key or its hash)."""
        return {"id": self.id, "name": self.name, "prefix": self.prefix + "…", "models": list(self.models),
                "servers": list(self.servers), "roles": list(self.roles), "admin": self.admin,
                "rpm": self.rpm, "tpm": self.tpm, "concurrency": self.concurrency, "created": _iso(self.created),
                "expires": _iso(self.expires), "revoked": _iso(self.revoked), "state": self.state}


@dataclass
class NewKey:
    """What `keys create` takes; checked before anything is written."""

    name: str
    models: list[str] = field(default_factory=list)
    servers: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    admin: bool = False
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    expires: str | None = None  # an ISO date or date and time (UTC unless it says); None: never

    def check(self, cfg: Config | None = None) -> float | None:
        """Raise KeyProblem naming what is wrong; returns the expiry as a timestamp."""
        if not NAME_RE.match(self.name):
            raise KeyProblem(f"key name '{self.name}': 1-40 characters of a-z, 0-9, '-' or '_'")
        for what, value in (("rpm", self.rpm), ("tpm", self.tpm), ("concurrency", self.concurrency)):
            if value is not None and not 1 <= value <= 10**9:
                raise KeyProblem(f"--{what} must be a whole number from 1 (leave it out for no limit)")
        if cfg is not None:
            servers = cfg.routable
            unknown = [s for s in self.servers if s not in servers]
            if unknown:
                raise KeyProblem(f"no server named {', '.join(unknown)}; servers: {', '.join(servers)}")
            known_roles = {s.role for s in servers.values()}
            unknown = [r for r in self.roles if r not in known_roles]
            if unknown:
                raise KeyProblem(f"no server has role {', '.join(unknown)}; roles here: {', '.join(sorted(known_roles))}")
            names = {n for name, s in servers.items() for n in (name, s.alias, s.model) if n}
            unknown = [m for m in self.models if m not in names]
            if unknown:
                raise KeyProblem(f"no model {', '.join(unknown)} in the config; GET /v1/models lists them")
        for item in (*self.models, *self.servers, *self.roles):
            if not item or len(item) > 200 or any(c in item for c in ",\r\n\x00"):
                raise KeyProblem(f"'{item}' is not a model, server or role name")
        return parse_expiry(self.expires) if self.expires else None


def parse_expiry(text: str) -> float:
    when = timestamp_of(text)
    if when is None:
        raise KeyProblem(f"--expires '{text}' is not a date: use 2027-01-31 or 2027-01-31T18:00")
    if when <= time.time():
        raise KeyProblem(f"--expires {text} is in the past")
    return when


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, new: NewKey, cfg: Config | None = None) -> tuple[Key, str]:
        """The new key's record and the key itself (shown once, stored only as its hash)."""
        expires = new.check(cfg)
        if any(k.name == new.name and k.state == "active" for k in self.list()):
            raise KeyProblem(f"an active key is named '{new.name}' already; revoke it first or choose another name")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = Key(id="key_" + secrets.token_hex(6), name=new.name, prefix=secret[:PREFIX_SHOWN],
                  models=tuple(new.models), servers=tuple(new.servers), roles=tuple(new.roles), admin=new.admin,
                  rpm=new.rpm, tpm=new.tpm, concurrency=new.concurrency, created=time.time(), expires=expires)
        self.db.execute(
            "INSERT INTO podllama_keys (id, name, hash, prefix, models, servers, roles, admin, rpm, tpm, concurrency,"
            " created, expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key.id, key.name, digest(secret), key.prefix, json.dumps(new.models), json.dumps(new.servers),
             json.dumps(new.roles), int(key.admin), key.rpm, key.tpm, key.concurrency, key.created, key.expires))
        return key, secret

    def list(self) -> list[Key]:
        return [Key.of_row(r) for r in self.db.query(f"SELECT {COLUMNS} FROM podllama_keys ORDER BY created")]

    def by_hash(self) -> dict[str, Key]:
        """Every usable key by the hash of the key (what the gateway looks requests up in)."""
        now = time.time()
        rows = self.db.query(f"SELECT hash, {COLUMNS} FROM podllama_keys WHERE revoked IS NULL")
        keys = {r[0]: Key.of_row(r[1:]) for r in rows}
        return {h: k for h, k in keys.items() if k.usable(now)}

    def any_made(self) -> bool:
        """Whether any key was ever made here (revoked and expired ones count: revoking the last key must not
        open the gateway)."""
        return bool(self.db.query("SELECT 1 FROM podllama_keys LIMIT 1"))

    def revoke(self, which: str) -> Key:
        """Revoke the key with id or name WHICH (an active one)."""
        matches = [k for k in self.list() if k.state == "active" and which in (k.id, k.name)]
        if not matches:
            raise KeyProblem(f"no active key with id or name '{which}'; `podllama keys list` shows them")
        revoked = replace(matches[0], revoked=time.time())
        self.db.execute("UPDATE podllama_keys SET revoked = ? WHERE id = ?", (revoked.revoked, revoked.id))
        return revoked
