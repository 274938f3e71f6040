"""Gateway keys: inference keys for the llama-server routes, admin keys for /api.

Inference keys come from $PODLLAMA_API_KEYS (comma-separated), [gateway] api_keys_file, and what
`podllama start` was given (the stack's credentials, `api_keys`); without any, inference is open to whoever
reaches the port. Admin keys come from $PODLLAMA_ADMIN_KEY, [gateway] admin_key_file and the stack's own
`admin.key`, which always exists: the management API is never open. Credentials are read from
`Authorization: Bearer <key>` or `X-Api-Key: <key>`, compared in constant time against every key, and never
logged or returned.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..credentials import Credentials


def _read_keys(path: str | None, base: Path) -> list[str]:
    if not path:
        return []
    p = Path(path) if Path(path).is_absolute() else base / path
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the key file {p}: {e.strerror}; fix [gateway] in the config") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def key_files(cfg: Config) -> list[Path]:
    """The key files the config names (watched for changes)."""
    return [p if p.is_absolute() else cfg.root / p
            for p in (Path(f) for f in (cfg.gateway.api_keys_file, cfg.gateway.admin_key_file) if f)]


@dataclass
class Keys:
    inference: list[bytes]
    admin: list[bytes]
    public_bind: bool  # the gateway is published on a non-loopback address

    @classmethod
    def load(cls, cfg: Config) -> Keys:
        creds = Credentials(cfg.state_path)
        inference = [k for k in os.environ.get("PODLLAMA_API_KEYS", "").split(",") if k.strip()]
        inference += _read_keys(cfg.gateway.api_keys_file, cfg.root) + creds.inference_keys()
        admin = [os.environ["PODLLAMA_ADMIN_KEY"]] if os.environ.get("PODLLAMA_ADMIN_KEY") else []
        admin += _read_keys(cfg.gateway.admin_key_file, cfg.root)
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

    def inference_ok(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """An inference key, or the admin key (an admin may do everything); open when no inference key is set."""
        if not self.inference:
            return True
        given = self.credential(headers)
        return self._matches(given, self.inference) | self._matches(given, self.admin)

    def admin_ok(self, headers: list[tuple[bytes, bytes]]) -> bool:
        return bool(self.admin) and self._matches(self.credential(headers), self.admin)


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
