"""Gateway keys: inference keys for the llama-server routes, admin keys for /admin.

Inference keys come from $PODLLAMA_API_KEYS (comma-separated), [gateway] api_keys_file, what `podllama start`
was given (the stack's credentials, `api_keys`) and the database (`podllama keys create`, with scopes and
limits; keys.py); without any, inference is open to whoever reaches the port. Admin keys come from
$PODLLAMA_ADMIN_KEY, [gateway] admin_key_file, the stack's own `admin.key`, which always exists (the
management API is never open), and database keys made with --admin. Credentials are read from
`Authorization: Bearer <key>` or `X-Api-Key: <key>`; the listed keys are compared in constant time against
every one, a database key is looked up by its SHA-256; none is ever logged or returned.

What a request is let in as is a Caller: who (a key's id and name, for the request log and the limits) and
what it may reach (a database key's scope).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...access.credentials import Credentials
from ...access.keys import Key, digest
from ...config import Config, ServerSection


def _read_keys(cfg: Config, path: str | None) -> list[str]:
    if not path:
        return []
    p = cfg.named_file(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the key file {p}: {e.strerror}; fix [gateway] in the config") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def key_files(cfg: Config) -> list[Path]:
    """The key files the config names (watched for changes)."""
    named = (cfg.gateway.api_keys_file, cfg.gateway.admin_key_file, *(r.api_key_file for r in cfg.remotes.values()))
    return [cfg.named_file(f) for f in named if f]


@dataclass(frozen=True)
class Caller:
    """Who a request came from: ID and NAME name the key ("" when no key is needed), KEY is a database key
    (its scope and limits), None for the listed keys, which may use everything."""

    id: str
    name: str
    admin: bool = False
    key: Key | None = None

    def refusal(self, server: str, section: ServerSection) -> str | None:
        """Why this caller may not use SERVER, or None when it may."""
        key = self.key
        if key is None:
            return None
        public = section.alias or server
        if key.servers and server not in key.servers:
            return f"key '{key.name}' may not use server '{server}'; it may use {', '.join(key.servers)}"
        if key.roles and section.role not in key.roles:
            return f"key '{key.name}' may not use role '{section.role}'; it may use {', '.join(key.roles)}"
        if key.models and not {public, server, section.model} & set(key.models):
            return f"key '{key.name}' may not use model '{public}'; it may use {', '.join(key.models)}"
        return None


ANONYMOUS = Caller("", "")
ADMIN = Caller("admin", "admin", admin=True)


@dataclass
class Keys:
    inference: list[bytes]
    admin: list[bytes]
    public_bind: bool  # the gateway is published on a non-loopback address
    # database keys by the hash of the key; None until the database has been read (until then, no one gets in
    # without a listed key: a database that cannot be reached never opens the gateway)
    stored: dict[str, Key] | None = field(default=None)
    made: bool = False  # a key was ever made in the database: inference stays closed, even once all are revoked

    @classmethod
    def load(cls, cfg: Config) -> Keys:
        creds = Credentials(cfg.state_path)
        inference = [k for k in os.environ.get("PODLLAMA_API_KEYS", "").split(",") if k.strip()]
        inference += _read_keys(cfg, cfg.gateway.api_keys_file) + creds.inference_keys()
        admin = [os.environ["PODLLAMA_ADMIN_KEY"]] if os.environ.get("PODLLAMA_ADMIN_KEY") else []
        admin += _read_keys(cfg, cfg.gateway.admin_key_file)
        admin += [k for k in [creds.admin_key()] if k]
        host = os.environ.get("PODLLAMA_PUBLISHED_HOST") or cfg.gateway.host
        return cls([k.strip().encode() for k in inference], [k.strip().encode() for k in admin], not _loopback(host))

    @staticmethod
    def credential(headers: list[tuple[bytes, bytes]]) -> bytes | None:
        auth = api_key = None
        for name, value in headers:
            if name == b"authorization":
                auth = value
            elif name == b"x-api-key":
                api_key = value
        if auth:
            return auth[7:].strip() if auth[:7].lower() == b"bearer " else auth.strip()
        return api_key.strip() if api_key else None

    @staticmethod
    def _matches(given: bytes | None, keys: list[bytes]) -> bool:
        ok = False
        for key in keys:  # every key is compared: the time taken does not tell which one matched
            ok |= hmac.compare_digest(given or b"", key)
        return ok

    @property
    def any_inference(self) -> bool:
        """Inference needs a key (some key is set, or the database is not read yet)."""
        return bool(self.inference) or self.stored is None or self.made

    def identify(self, headers: list[tuple[bytes, bytes]], admin: bool) -> Caller | None:
        """The caller these headers prove, for the admin API (ADMIN) or for inference; None: not allowed."""
        return self.caller_of(self.credential(headers), admin)

    def caller_of(self, given: bytes | None, admin: bool) -> Caller | None:
        """The caller key GIVEN (None: no key sent) proves, for the admin API (ADMIN) or for inference."""
        if given is not None and self.admin and self._matches(given, self.admin):
            return ADMIN
        stored = self.stored.get(digest(given)) if given is not None and self.stored else None
        if stored is not None and stored.usable():
            if admin and not stored.admin:
                return None
            return Caller(stored.id, stored.name, stored.admin, stored)
        if admin:
            return None
        if not self.any_inference:
            return ANONYMOUS
        if given is not None and self._matches(given, self.inference):
            return Caller("listed-" + digest(given)[:8], "listed key")
        return None


SESSION_COOKIE = "podllama_session"
SESSION_TTL = 12 * 3600


class Sessions:
    """Dashboard logins: a random token in an HttpOnly, SameSite=Strict cookie, standing for the admin key that
    logged in, for SESSION_TTL seconds or until logout. A session is as good as its key and no better: the key
    is checked again on every use, so revoking, expiring or removing it ends its sessions at once. Kept in the
    gateway's memory: a gateway restart logs everyone out."""

    def __init__(self) -> None:
        self.live: dict[str, tuple[bytes, float]] = {}

    def open(self, key: bytes) -> str:
        now = time.time()
        self.live = {t: v for t, v in self.live.items() if v[1] > now}
        token = secrets.token_urlsafe(32)
        self.live[token] = (key, now + SESSION_TTL)
        return token

    def caller(self, headers: list[tuple[bytes, bytes]], keys: Keys) -> Caller | None:
        token = cookie(headers, SESSION_COOKIE)
        found = self.live.get(token) if token else None
        if found is None or found[1] <= time.time():
            return None
        caller = keys.caller_of(found[0], admin=True)
        if caller is None:  # its key is gone: so is the session
            self.live.pop(token or "", None)
        return caller

    def close(self, headers: list[tuple[bytes, bytes]]) -> None:
        token = cookie(headers, SESSION_COOKIE)
        if token:
            self.live.pop(token, None)


def cookie(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    for k, v in headers:
        if k == b"cookie":
            for part in v.decode("latin-1").split(";"):
                key, _, value = part.strip().partition("=")
                if key == name and value:
                    return value
    return None


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
