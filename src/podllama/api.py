"""The gateway, from the host: the CLI (and scripts) call a running stack's gateway — its management API, and
chat for `podllama run`/`chat` — with the stack's admin key, read from its credentials (the gateway takes the
admin key as an inference key too), so nobody has to copy a key around."""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Iterator
from typing import Any

import httpx

from .access import tls
from .access.credentials import Credentials
from .config import Config

# podllama's management API lives under this prefix; /api is Ollama's API (gateway/ollama.py)
ADMIN_PREFIX = "/admin"


class ApiError(Exception):
    """The gateway answered with an error, or could not be reached; the message says which."""


class GatewayAPI:
    def __init__(self, cfg: Config, timeout: float = 60) -> None:
        self.url = cfg.gateway.url
        material = tls.of(cfg)
        self.verify: ssl.SSLContext | bool = material.client_context() if material is not None else True
        key = os.environ.get("PODLLAMA_ADMIN_KEY") or Credentials(cfg.state_path).admin_key()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = timeout

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = httpx.request(method, f"{self.url}{path}", headers=self.headers, timeout=self.timeout,
                              verify=self.verify, **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(f"the gateway at {self.url} cannot be reached ({type(e).__name__}); is the stack "
                           "started (`podllama start`)?") from None
        if r.status_code >= 400:
            raise ApiError(f"the gateway answered {r.status_code} to {method} {path}: {_message(r)}")
        return r.json()

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        """A management API call: PATH below ADMIN_PREFIX."""
        return self.call(method, ADMIN_PREFIX + path, **kwargs)

    def reload(self) -> dict[str, Any]:
        """Make the gateway read services.toml and the keys again; returns the version it now runs."""
        result: dict[str, Any] = self.admin("POST", "/reload")
        return result

    def chat(self, messages: list[dict[str, str]], model: str | None = None, max_tokens: int | None = None,
             temperature: float | None = None) -> Iterator[str]:
        """Stream a chat completion through the gateway: the answer's text, piece by piece."""
        body: dict[str, Any] = {"messages": messages, "stream": True}
        for key, value in (("model", model), ("max_tokens", max_tokens), ("temperature", temperature)):
            if value is not None:
                body[key] = value
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, headers=self.headers,
                              timeout=httpx.Timeout(self.timeout, read=600), verify=self.verify) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ApiError(f"the gateway answered {r.status_code}: {_message(r)}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise ApiError(f"the answer broke off: {event['error'].get('message')}")
                    for choice in event.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield piece
        except httpx.HTTPError as e:
            raise ApiError(f"the gateway at {self.url} cannot be reached ({type(e).__name__}); is the stack "
                           "started (`podllama start`)?") from None


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:300]
