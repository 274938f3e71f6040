"""The gateway's management API, from the host: the CLI (and scripts) call a running stack's gateway with the
stack's admin key, read from its credentials — nobody has to copy the key around."""

from __future__ import annotations

import os
from typing import Any

import httpx

from .credentials import Credentials
from .stack import Stack


class ApiError(Exception):
    """The gateway answered with an error, or could not be reached; the message says which."""


class GatewayAPI:
    def __init__(self, stack: Stack, timeout: float = 60) -> None:
        self.url = stack.gateway_url
        key = os.environ.get("PODLLAMA_ADMIN_KEY") or Credentials(stack.cfg.state_path).admin_key()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = timeout

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = httpx.request(method, f"{self.url}{path}", headers=self.headers, timeout=self.timeout, **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(f"the gateway at {self.url} cannot be reached ({type(e).__name__}); is the stack "
                           "started (`podllama start`)?") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            raise ApiError(f"the gateway answered {r.status_code} to {method} {path}: {message}")
        return r.json()

    def reload(self) -> dict[str, Any]:
        """Make the gateway read services.toml and the keys again; returns the version it now runs."""
        result: dict[str, Any] = self.call("POST", "/api/reload")
        return result
