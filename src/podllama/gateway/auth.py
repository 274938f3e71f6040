"""Gateway keys: inference keys for the llama-server routes, a separate admin key for /api.

Keys come from the environment ($PODLLAMA_API_KEYS, comma-separated; $PODLLAMA_ADMIN_KEY) or from files named
in [gateway] (one key per line, '#' comments). Credentials are read from `Authorization: Bearer <key>` or
`X-Api-Key: <key>`, compared in constant time against every key, and never logged or returned.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Config


def _read_keys(path: str | None, base: Path) -> list[str]:
    if not path:
        return []
    p = Path(path) if Path(path).is_absolute() else base / path
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the key file {p}: {e.strerror}; fix [gateway] in the config") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@dataclass
class Keys:
    inference: list[bytes]
    admin: list[bytes]
    public_bind: bool  # the gateway is published on a non-loopback address

    @classmethod
    def load(cls, cfg: Config) -> Keys:
        inference = [k for k in os.environ.get("PODLLAMA_API_KEYS", "").split(",") if k.strip()]
        inference += _read_keys(cfg.gateway.api_keys_file, cfg.root)
        admin = [os.environ["PODLLAMA_ADMIN_KEY"]] if os.environ.get("PODLLAMA_ADMIN_KEY") else []
        admin += _read_keys(cfg.gateway.admin_key_file, cfg.root)
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
        return not self.inference or self._matches(self.credential(headers), self.inference)

    def admin_ok(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Admin routes need the admin key; without one configured they are open on a loopback-only gateway
        and closed on a published one."""
        if not self.admin:
            return not self.public_bind
        return self._matches(self.credential(headers), self.admin)


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
