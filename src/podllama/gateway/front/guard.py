"""Who may talk to the gateway: checked on every request before anything reads its body.

1. **Host** (DNS rebinding): the `Host` header must name the bound address, a loopback name, or a host in
   `[gateway] allowed_hosts`; else 421 on every route. A page on `evil.example` whose name an attacker
   re-points at 127.0.0.1 sends `Host: evil.example`, so it never gets an answer.
2. **CORS**: the gateway owns it. Preflights are answered here from `[gateway] cors_origins` (default: none);
   upstream `Access-Control-*` headers are dropped by the proxy.
3. **Origin** (CSRF): a state change (any method but GET/HEAD/OPTIONS) that a browser sends from an origin that
   is neither the gateway's own nor allowed gets 403 — even a "simple" cross-site POST that needs no preflight.
4. **Keys**: /admin needs an admin key, inference routes an inference key (when any is set); 401 before the
   body is read. A dashboard login (an HttpOnly, SameSite=Strict cookie) stands for the admin key that opened
   it; the Origin check above keeps other origins on the same site from using it to change anything. Who the
   key belongs to (a Caller) goes with the request, in `scope["state"]["caller"]`.
5. **Bodies** of the gateway's own routes (/admin, /ui …) are read here, after the checks above and only for a
   route that exists and takes one, capped at API_MAX_BODY (PUBLIC_MAX_BODY on routes that need no key: 413);
   a JSON body is checked by jsonbody (elements, depth: 413/400) before FastAPI parses it. A request whose body
   is not read is answered with `Connection: close`. Proxied routes receive theirs in the proxy, capped at
   `max_body_mb`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from enum import Enum
from typing import Any

from ...api import ADMIN_PREFIX
from ...config import GatewaySection
from . import body as bodies
from . import jsonbody
from .auth import ANONYMOUS, Caller, Keys, Sessions
from .client import UpstreamError
from .errors import Receive, Send
from .errors import send_error as _send_error

API_MAX_BODY = 1 << 20
PUBLIC_MAX_BODY = 16 * 1024  # a dashboard login's body; nothing public takes more
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})
CORS_HEADERS = b"authorization, content-type, x-api-key, x-conversation-id, anthropic-version"
EXPOSED = b"x-podllama-server, retry-after"


class Access(Enum):
    PUBLIC = "public"
    INFERENCE = "inference key"
    ADMIN = "admin key"


ACCESS = {"public": Access.PUBLIC, "inference": Access.INFERENCE, "admin": Access.ADMIN}  # the route table's words


# answered by the gateway, need an inference key
INFERENCE_OWN = frozenset({"/v1/models", "/models", "/models/load", "/models/unload", "/metrics"})


def access_of_own(path: str) -> Access:
    """Who may call a route the gateway answers itself."""
    if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
        return Access.ADMIN
    return Access.INFERENCE if path in INFERENCE_OWN else Access.PUBLIC


def host_name(value: bytes) -> str:
    """The host part of a Host header: 'example.lan:8080' → 'example.lan', '[::1]:80' → '::1'."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    def __init__(self, gateway: GatewaySection, keys: Keys, bound: str | None = None) -> None:
        self.sessions = Sessions()  # dashboard logins
        self.configure(gateway, keys, bound)

    def configure(self, gateway: GatewaySection, keys: Keys, bound: str | None = None) -> None:
        """BOUND: the address the gateway listens on (default: [gateway] host)."""
        self.keys = keys
        bound = (bound if bound is not None else gateway.host).strip("[]").lower()
        self.any_host = "*" in gateway.allowed_hosts
        self.hosts = set(LOOPBACK_NAMES) | set(gateway.allowed_hosts) | ({bound} - WILDCARDS)
        self.any_ip = bound in WILDCARDS  # listening everywhere: any address of this machine is its own
        self.any_origin = "*" in gateway.cors_origins
        self.origins = {o.encode() for o in gateway.cors_origins}

    # -- the checks -----------------------------------------------------------------------------------------
    def host_ok(self, headers: list[tuple[bytes, bytes]]) -> bool:
        if self.any_host:
            return True
        host = next((v for k, v in headers if k == b"host"), None)
        if host is None:
            return True  # HTTP/1.0 without Host: not a browser
        name = host_name(host)
        return name in self.hosts or (self.any_ip and _is_ip(name))

    def cross_origin(self, headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bool]:
        """(Origin, allowed): the request's Origin when it is not the gateway's own, and whether it may call."""
        origin = host = None
        for k, v in headers:
            if k == b"origin":
                origin = v
            elif k == b"host":
                host = v
        if origin is None or (host is not None and origin.lower() in (b"http://" + host.lower(),
                                                                      b"https://" + host.lower())):
            return None, True
        return origin, self.any_origin or origin.lower().rstrip(b"/") in self.origins

    def caller(self, access: Access, headers: list[tuple[bytes, bytes]]) -> Caller | None:
        """Who the request comes from, when it may have ACCESS; None: it may not. A key in the headers first,
        else a dashboard login's cookie (an admin's)."""
        if access is Access.PUBLIC:  # anyone; a key, when one is sent, says what the answer may name
            return self.keys.identify(headers, admin=False) or ANONYMOUS
        return self.keys.identify(headers, admin=access is Access.ADMIN) or self.sessions.caller(headers, self.keys)

    # -- the ASGI step ---------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send, access: Access, own: bool,
                       takes_body: bool = True) -> tuple[Receive, Send] | None:
        """Check a request. OWN: the gateway answers it itself (its body is read here, when TAKES_BODY: a route
        of the gateway's own takes one). Returns the (receive, send) to go on with, or None when it was answered
        here."""
        headers = scope["headers"]
        method = scope["method"]
        if not self.host_ok(headers):
            await send_error(send, 421, "this gateway does not answer to that Host; add the name to [gateway] "
                                        "allowed_hosts if it is yours")
            return None
        origin, origin_ok = self.cross_origin(headers)
        if method == "OPTIONS" and origin is not None and any(k == b"access-control-request-method"
                                                              for k, _ in headers):
            await self._preflight(send, origin, origin_ok)
            return None
        if origin is not None and not origin_ok and method not in SAFE_METHODS:
            await send_error(send, 403, f"requests from the web origin {origin.decode('latin-1')!r} are not "
                                        "allowed; add it to [gateway] cors_origins if you trust it")
            return None
        caller = self.caller(access, headers)
        if caller is None:
            await send_error(send, 401, "Invalid admin key" if access is Access.ADMIN else "Invalid API Key",
                             headers=[(b"www-authenticate", b"Bearer")])
            return None
        scope.setdefault("state", {})["caller"] = caller  # for the proxy (scope, limits, the log) and /admin
        if origin is not None and origin_ok:
            send = _with_cors(send, origin)
        if own and takes_body:
            limit = PUBLIC_MAX_BODY if access is Access.PUBLIC else API_MAX_BODY
            replay = await self._read(scope, receive, send, limit)
            if replay is None:
                return None
            receive = replay
        elif own and bodies.has_body(scope["headers"]):
            send = _closing(send)  # never read: the connection ends with the answer
        return receive, send

    async def _preflight(self, send: Send, origin: bytes, ok: bool) -> None:
        if not ok:
            await send_error(send, 403, f"the web origin {origin.decode('latin-1')!r} is not allowed; add it to "
                                        "[gateway] cors_origins if you trust it")
            return
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin), (b"vary", b"origin"),
            (b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE, OPTIONS"),
            (b"access-control-allow-headers", CORS_HEADERS), (b"access-control-max-age", b"600")]})
        await send({"type": "http.response.body", "body": b""})

    async def _read(self, scope: dict[str, Any], receive: Receive, send: Send, limit: int) -> Receive | None:
        """The body of a request the gateway answers itself, read now within LIMIT, checked when it is JSON,
        then replayed."""
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            await send_error(send, 413, bodies.too_large(limit, "the management API's limit"))
            return None
        try:
            data = await bodies.read_all(receive, limit, "the management API's limit")
        except UpstreamError as e:
            if e.status != 499:
                await send_error(send, e.status, str(e))
            return None
        ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        if data and b"json" in ctype:
            try:
                jsonbody.loads(data)
            except jsonbody.JsonProblem as e:
                await send_error(send, e.status, str(e))
                return None
        return bodies.replay(data, receive)


async def send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A refusal ends the connection: whatever body the client still meant to send is never read."""
    await _send_error(send, status, message, headers=[*(headers or []), (b"connection", b"close")])


def _closing(send: Send) -> Send:
    async def closing_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
        await send(message)

    return closing_send


def _with_cors(send: Send, origin: bytes) -> Send:
    async def cors_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"access-control-allow-origin", origin),
                                  (b"vary", b"origin"), (b"access-control-expose-headers", EXPOSED)]
        await send(message)

    return cors_send


def caller_of(scope: Mapping[str, Any]) -> Caller:
    """Who the guard let this request in as (ANONYMOUS where no key was needed)."""
    return scope.get("state", {}).get("caller", ANONYMOUS)  # type: ignore[no-any-return]
