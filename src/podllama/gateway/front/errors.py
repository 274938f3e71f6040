"""Errors the gateway answers itself, in the OpenAI (and llama-server) error shape."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 409: "conflict_error",
         412: "precondition_failed",
         413: "invalid_request_error", 421: "misdirected_request", 422: "invalid_request_error",
         429: "rate_limit_error", 431: "invalid_request_error", 501: "not_supported_error",
         503: "unavailable_error", 504: "timeout_error"}


def error_type(status: int) -> str:
    return TYPES.get(status, "server_error")


def error_body(status: int, message: str, kind: str | None = None) -> bytes:
    return json.dumps({"error": {"code": status, "message": message, "type": kind or error_type(status)}}).encode()


async def send_error(send: Send, status: int, message: str, kind: str | None = None,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = error_body(status, message, kind)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def upstream_message(status: int, body: bytes) -> str:
    """The message of an error answer BODY (OpenAI's shape, or a bare string), else its first bytes."""
    try:
        err = json.loads(body)["error"]
        return str(err.get("message") if isinstance(err, dict) else err)
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:300].decode("utf-8", "replace") or f"the server answered {status}"
