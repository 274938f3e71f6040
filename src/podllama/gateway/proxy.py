"""The hot path: an llama-server request in, the right server chosen, bytes streamed both ways.

A raw ASGI handler (no framework on this path), reached after the guard let the request in: classify the path
with the route table, choose the server (capability → roles, then the request's model, then the role's
default; image/audio parts → a vision/audio server), pick the least busy healthy replica, forward, and stream
the answer back chunk by chunk. A client that goes away closes the upstream connection at once, in every phase.

What goes upstream is rebuilt, never copied blindly: the target from the *decoded* path, re-encoded (a
`%0D%0A` in a URL cannot become a line break in the request line), the query string as it came (checked),
the client's headers minus hop-by-hop ones and the client's credentials, plus the stack's server key.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote

from ..config import NAME_RE, PROJECTOR_ROLES, GatewaySection
from ..credentials import bearer
from ..health import LOADING
from ..validate import CONTROL
from . import body as bodies
from .auth import ANONYMOUS, Caller
from .client import BrokenOff, Client, ClientGone, ConnectFailed, Response, UpstreamError
from .errors import Receive, Send, error_body, send_error
from .metrics import Metrics
from .ondemand import Loader, Refused
from .quota import OverLimit, Quota, Use
from .requestlog import RequestLog, Row
from .routes import CAPABILITY_ROLES, ENDPOINTS, Endpoint, RouteTable
from .tally import Tally
from .upstreams import Registry, Replica

log = logging.getLogger("podllama.gateway")

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect"})
NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"x-api-key", b"origin"}  # the gateway's credentials stay here
RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date", b"trailer",
                           b"upgrade", b"proxy-authenticate"})
SMALL_BODY = bodies.EXACT_LIMIT  # bodies up to this size are read before forwarding (sent with a content-length)
_QUERY_OK = re.compile(rb"^[\x21-\x7e]*$")
PATH_SAFE = "/:@!$&'()*+,;=~"
LOG_BODY = 64 * 1024  # bytes of each body the request log keeps, with [gateway] log_bodies
T = TypeVar("T")


def target_of(path: str, query: bytes) -> bytes | None:
    """The request target sent upstream: PATH (decoded) re-encoded, plus QUERY as it came. None when the path
    holds control characters or the query anything but visible ASCII."""
    if CONTROL.search(path) or not _QUERY_OK.match(query):  # a space is fine: it is re-encoded
        return None
    target = quote(path, safe=PATH_SAFE).encode()
    return target + b"?" + query if query else target


async def _redirect(send: Send, location: str) -> None:
    await send({"type": "http.response.start", "status": 307,
                "headers": [(b"location", location.encode()), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def drive(coro: Any, resume: Callable[[], object]) -> bool:
    """Run an ASGI send() to completion right now if it does not have to wait (it waits only when the client
    reads slower than the server writes); else finish it when it can, then call RESUME. True: done now."""
    try:
        future = coro.send(None)
    except StopIteration:
        return True
    def later(_: object) -> None:
        if drive(coro, resume):
            resume()

    future.add_done_callback(later)
    return False


class Flight:
    """One request on its way: what the disconnect watcher needs to cancel it."""

    __slots__ = ("response", "finished", "disconnected", "task", "uploaded")

    def __init__(self) -> None:
        self.response: Response | None = None
        self.finished = False
        self.disconnected = False
        self.task = asyncio.current_task()
        self.uploaded = 0  # bytes of a streamed request body sent upstream


class Proxy:
    def __init__(self, registry: Registry, metrics: Metrics, gateway: GatewaySection, server_key: str | None) -> None:
        self.registry, self.metrics = registry, metrics
        self.table = RouteTable.build()  # the gateway classifies requests by it too
        self.client = Client()
        self.conversations: OrderedDict[str, str] = OrderedDict()  # X-Conversation-Id → server
        self.on_trouble: Callable[[str], object] = lambda server: None  # a server seems to have died
        self.loader: Loader | None = None  # loads on-demand servers (gateway/ondemand.py)
        self.quota = Quota()  # per-key limits (gateway/quota.py)
        self.log: RequestLog | None = None  # the request log (gateway/requestlog.py)
        self.configure(gateway, server_key)

    def configure(self, gw: GatewaySection, server_key: str | None) -> None:
        c = self.client
        c.connect_timeout, c.first_byte_timeout, c.idle_timeout = gw.connect_timeout, gw.first_byte_timeout, gw.idle_timeout
        c.queue_timeout = gw.queue_timeout
        self.max_body = int(gw.max_body_mb * 2**20)
        self.max_images, self.max_image_side = gw.max_images, gw.max_image_side
        self.load_timeout = gw.load_timeout
        self.upstream_auth = bearer(server_key)
        self.log_bodies = LOG_BODY if gw.log_bodies else 0

    # -- entry points -------------------------------------------------------------------------------------
    async def endpoint(self, scope: dict[str, Any], receive: Receive, send: Send, ep: Endpoint) -> None:
        """A route of the table."""
        target = target_of(scope["path"], scope["query_string"])
        if target is None:
            return await send_error(send, 400, "the request path or query holds control characters or spaces")
        query = parse_qs(scope["query_string"].decode("latin-1")) if scope["query_string"] else {}
        body, streamed = b"", True
        if ep.scope == "server":
            server, why = self._server_scoped(ep, query)
        else:
            model = next(iter(query.get("model", [])), None)
            media = None
            choosing = ep.body_model and model is None and (
                self._small_body(scope) or len(self.registry.servers_with_role(ep.roles)) > 1)
            if scope["method"] == "POST" and (choosing or ep.image_limits):
                # read it: the model it names decides, and a model of another role is refused
                data = await self._read_body(receive, send)
                if data is None:
                    return
                body, streamed = data, False
                ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
                if ep.image_limits and (problem := bodies.image_problem(ctype, body, self.max_images,
                                                                        self.max_image_side)):
                    return await send_error(send, 400, problem)
                if choosing and (b'"model"' in body or b'name="model"' in body or (
                        ep.multimodal and self.registry.servers_with_role(PROJECTOR_ROLES))):
                    model, media = bodies.inspect(ctype, body, ep.multimodal)
            server, why = self._choose(ep, model, media)
        if server is None:
            return await send_error(send, why[0], why[1], why[2] or None)
        await self.forward(scope, receive, send, server, ep.name, target, body, streamed)

    async def passthrough(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """/servers/{name}/{path}: anything, to one server."""
        rest = scope["path"][len("/servers/"):]
        name, _, path = rest.partition("/")
        segments = path.split("/")
        target = target_of("/" + path, scope["query_string"])
        if not NAME_RE.match(name) or ".." in segments or "." in segments or "\\" in path or target is None:
            return await send_error(send, 400, "the path is not /servers/NAME/PATH with a plain server name and path "
                                               "(no '..', control characters or spaces)")
        if name not in self.registry.servers:
            return await send_error(send, 404, f"no server named '{name}'; servers: {', '.join(self.registry.servers)}")
        server = self.registry.servers[name]
        if not server.kind.llama and path != "health":
            # the other programs have routes no one should reach (whisper-server's POST /load opens any path):
            # only those of the route table for its role
            ep = self.table.match(scope["method"], "/" + path)
            if ep is None or ep.scope != "model" or server.role not in ep.roles:
                return await send_error(send, 404, f"server '{name}' runs {server.kind.program}: through "
                                                   f"/servers/{name}/ only /health and the routes of role "
                                                   f"'{server.role}' in /help")
        await self.forward(scope, receive, send, name, "passthrough", target, b"", True)

    async def ui(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """llama.cpp's web UI, from the default chat server: `/` and its static files. Sent upstream without the
        stack's server key, so llama-server itself lets through only what it serves to anyone (the UI's files);
        where the image has no UI, `/` leads to /help."""
        server = self.registry.default(CAPABILITY_ROLES["generate"])
        replica = self.registry.pick(server) if server else None
        target = target_of(scope["path"], scope["query_string"])
        if replica is None or target is None:
            return await _redirect(send, "/help")
        headers = [(k, v) for k, v in scope["headers"] if k in (b"accept", b"accept-encoding", b"if-none-match",
                                                                 b"if-modified-since", b"user-agent")]
        try:
            response = await self.client.request(replica.host, replica.port, scope["method"], target, headers,
                                                 limit=self.registry.http_threads(server or ""))
            body = await response.read(self.client.idle_timeout)
        except UpstreamError as e:
            return await send_error(send, e.status, f"the web UI of server '{server}': {e}")
        if scope["path"] == "/" and response.status == 404:
            return await _redirect(send, "/help")  # an image built without the UI
        out = [(k, v) for k, v in response.headers if k not in RESPONSE_DROP and k != b"content-length"
               and not k.startswith(b"access-control-")]
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [*out, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})

    # -- choosing a server --------------------------------------------------------------------------------
    def _server_scoped(self, ep: Endpoint, query: dict[str, list[str]]) -> tuple[str | None, tuple[int, str, str]]:
        if ep.name == "stream.follow" and query.get("conv_id"):
            known = self.conversations.get(query["conv_id"][0])
            if known:
                return known, (0, "", "")
        name = next(iter(query.get("server", [])), None)
        if name is not None and name not in self.registry.servers:
            return None, (404, f"no server named '{name}'; servers: {', '.join(self.registry.servers)}", "")
        model = next(iter(query.get("model", [])), None)
        if name is None and model is not None:
            name = self.registry.server_for_model(model)
            if name is None:
                return None, (404, f"model '{model}' not found; GET /v1/models lists them", "")
        if name is not None:
            section = self.registry.servers[name]
            if section.role not in ep.roles:
                return None, (400, f"server '{name}' runs {section.kind.program}, which has no {ep.paths[0]}", "")
            return name, (0, "", "")
        server = self.registry.default(CAPABILITY_ROLES["server"])
        return server, (503, "no servers are configured", "")

    def _choose(self, ep: Endpoint, model: str | None, media: str | None) -> tuple[str | None, tuple[int, str, str]]:
        reg = self.registry
        roles = ep.roles
        if media and reg.servers_with_role((media,)):
            roles = (media,)  # image or audio parts: only a server that can see or hear them
        if model:
            server = reg.server_for_model(model)
            if server is not None:
                role = reg.servers[server].role
                if role in roles:
                    return server, (0, "", "")
                serves = sorted({p for e in ENDPOINTS if role in e.roles and e.scope == "model" for p in e.paths[:1]})
                return None, (400, f"model '{model}' is served by server '{server}' (role {role}), which cannot "
                              f"answer {ep.paths[0]}; it serves {', '.join(serves)}", "")
        server = reg.default(roles)
        if server is None:
            needed = " or ".join(f"'{r}'" for r in roles)
            return None, (501, f"no server here answers {ep.paths[0]}: it needs a server with role {needed}; add one "
                          "to services.toml", "not_supported_error")
        return server, (0, "", "")

    # -- request body -------------------------------------------------------------------------------------
    @staticmethod
    def _small_body(scope: dict[str, Any]) -> bool:
        """A body small enough to read before choosing (JSON requests); big uploads stream through unread,
        unless several servers could take them and only the body can tell which."""
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        return length is not None and length.isdigit() and int(length) <= SMALL_BODY

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None when the client left or an error was answered (too large, too slow)."""
        try:
            return await bodies.read_all(receive, self.max_body)
        except UpstreamError as e:
            if e.status != 499:
                await send_error(send, e.status, str(e))
            return None

    # -- forwarding ---------------------------------------------------------------------------------------
    def _upstream_headers(self, scope: dict[str, Any], server: str) -> list[tuple[bytes, bytes]]:
        """The client's headers as they go to SERVER: hop-by-hop and credentials dropped, the server's own key
        (the stack's server key, or a remote server's) added."""
        headers = scope["headers"]
        named = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
        drop = NOT_FORWARDED | named if named else NOT_FORWARDED
        out = [(k, v) for k, v in headers if k not in drop]
        client = scope.get("client")
        if client:
            out.append((b"x-forwarded-for", client[0].encode()))
        remote = self.registry.auth_of(server)
        return out + (self.upstream_auth if remote is None else remote)

    async def forward(self, scope: dict[str, Any], receive: Receive, send: Send, server: str, endpoint: str,
                      target: bytes, body: bytes, streamed: bool) -> None:
        """To SERVER, if the caller's key may use it and is within its limits; an on-demand server is loaded
        first, and counted busy until the answer is complete."""
        caller: Caller = scope.get("state", {}).get("caller", ANONYMOUS)
        section = self.registry.servers.get(server)
        why = caller.refusal(server, section) if section is not None else None
        if why is not None:
            self._log(scope, caller, server, self._model(server), endpoint, 403, time.time(), body)
            return await send_error(send, 403, why)
        use = None
        if caller.key is not None:
            try:
                use = self.quota.admit(caller.key)
            except OverLimit as e:
                self._log(scope, caller, server, self._model(server), endpoint, 429, time.time(), body)
                return await send_error(send, 429, str(e), None, [(b"retry-after", str(e.retry_after).encode())])
        try:
            await self._load_and_forward(scope, receive, send, server, endpoint, target, body, streamed, caller, use)
        finally:
            if caller.key is not None:
                self.quota.done(caller.key, use)

    async def _load_and_forward(self, scope: dict[str, Any], receive: Receive, send: Send, server: str,
                                endpoint: str, target: bytes, body: bytes, streamed: bool, caller: Caller,
                                use: Use | None) -> None:
        loader = self.loader
        if loader is None or not loader.manages(server):
            return await self._forward(scope, receive, send, server, endpoint, target, body, streamed, caller, use)
        flight = Flight()
        acquired = False

        async def acquire() -> None:
            nonlocal acquired
            await loader.acquire(server)
            acquired = True

        try:
            await self._unless_gone(acquire(), None if streamed else receive, flight)
        except Refused as e:
            self.metrics.error(endpoint, server, "unavailable")
            return await send_error(send, e.status, str(e), None, [(b"retry-after", str(e.retry_after).encode())])
        except TimeoutError:
            self.metrics.error(endpoint, server, "unavailable")
            return await send_error(send, 503, f"server '{server}' is still loading after {self.load_timeout:.0f}s "
                                    "([gateway] load_timeout); try again shortly", None, [(b"retry-after", b"5")])
        if not acquired:  # the client went away while it loaded
            return
        try:
            await self._forward(scope, receive, send, server, endpoint, target, body, streamed, caller, use)
        finally:
            loader.release(server)

    async def _forward(self, scope: dict[str, Any], receive: Receive, send: Send, server: str, endpoint: str,
                       target: bytes, body: bytes, streamed: bool, caller: Caller, use: Use | None) -> None:
        started = time.perf_counter()
        at = time.time()
        flight = Flight()
        tally = Tally(self.log_bodies)
        is_sse = False
        if streamed:
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            chunked = any(k == b"transfer-encoding" for k, _ in scope["headers"])
            if length is None and not chunked:
                streamed = False  # no body (GET, DELETE …)
            elif length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await send_error(send, 413, bodies.too_large(self.max_body, "[gateway] max_body_mb"))
            elif length is not None and int(length) <= SMALL_BODY:  # small: read now, forward with a content-length
                data = await self._read_body(receive, send)
                if data is None:
                    return
                body, streamed = data, False
        replica = await self._replica(server, None if streamed else receive, flight)
        if replica is None:
            if flight.disconnected:
                return
            self.metrics.error(endpoint, server, "unavailable")
            return await self._unavailable(send, server)
        conv = next((v for k, v in scope["headers"] if k == b"x-conversation-id"), None)
        if conv:
            self._remember(conv.decode(errors="replace"), server)
        headers = self._upstream_headers(scope, server)
        key = (endpoint, server)
        self.metrics.in_flight[key] += 1
        status, ttfb = 502, None
        watcher: asyncio.Task[None] | None = None
        try:
            if not streamed:
                watcher = asyncio.ensure_future(self._watch(receive, flight))
            for attempt in (1, 2):
                replica.in_flight += 1
                try:
                    response = await self.client.request(
                        replica.host, replica.port, scope["method"], target, headers, body,
                        self._upload(receive, flight) if streamed else None,
                        on_start=lambda r: setattr(flight, "response", r), limit=self.registry.http_threads(server))
                    break
                except asyncio.CancelledError:
                    if flight.disconnected:  # the client went away while the request was queued
                        status = 499
                        return
                    raise
                except UpstreamError as e:
                    if flight.disconnected or isinstance(e, ClientGone):
                        status = 499
                        return
                    if isinstance(e, (ConnectFailed, BrokenOff)):
                        self.registry.mark_down(replica)
                        self.on_trouble(server)
                        if attempt == 1 and not streamed:
                            # not a byte of an answer came: once more, on another replica or on this server
                            # when it is back (waited for as a loading one)
                            flight.response = None  # the client going away now cancels the wait
                            try:
                                other = await self._replica(server, None, flight)
                            except asyncio.CancelledError:
                                if flight.disconnected:
                                    status = 499
                                    return
                                raise
                            if other is not None:
                                replica.in_flight -= 1
                                replica = other
                                continue
                            if flight.disconnected:
                                status = 499
                                return
                            if watcher is None:
                                watcher = asyncio.ensure_future(self._watch(receive, flight))
                            status = 503
                            self.metrics.error(endpoint, server, "unavailable")
                            return await self._unavailable(send, server, f"{e}; ")
                    if watcher is None:
                        watcher = asyncio.ensure_future(self._watch(receive, flight))
                    status = e.status
                    self.metrics.error(endpoint, server, e.kind)
                    log.warning("%s (%s): %s", server, replica.container, e)
                    return await send_error(send, status, f"server '{server}': {e}", None,
                                            [(b"retry-after", b"5")] if status == 503 else [])
            if watcher is None:
                watcher = asyncio.ensure_future(self._watch(receive, flight))
            status = response.status
            ttfb = time.perf_counter() - started
            out_headers = [(k, v) for k, v in response.headers
                           if k not in RESPONSE_DROP and not k.startswith(b"access-control-")]
            out_headers.append((b"x-podllama-server", server.encode()))
            is_sse = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in response.headers)
            if is_sse and not any(k == b"x-accel-buffering" for k, _ in out_headers):
                out_headers.append((b"x-accel-buffering", b"no"))
            await send({"type": "http.response.start", "status": status, "headers": out_headers})

            def sink(chunk: bytes) -> bool:  # straight from the network callback to the client
                tally.feed(chunk)
                return drive(send({"type": "http.response.body", "body": chunk, "more_body": True}), response.resume)

            try:
                await response.stream_to(sink, self.client.idle_timeout)
            except UpstreamError as e:
                if flight.disconnected:
                    status = 499
                    return
                self.metrics.error(endpoint, server, "broken_stream")
                log.warning("%s: %s broke off mid-response: %s", server, replica.container, e)
                if is_sse:  # never a silent truncation: the stream ends with an error event
                    event = b"data: " + error_body(502, f"server '{server}' broke off: {e}", "server_error") + b"\n\n"
                    flight.finished = True
                    await send({"type": "http.response.body", "body": event, "more_body": False})
                    return
                raise  # the client sees the connection drop mid-body, not a complete-looking answer
            flight.finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            flight.finished = True
            replica.in_flight -= 1
            self.metrics.in_flight[key] -= 1
            if watcher is not None:
                watcher.cancel()
            latency = time.perf_counter() - started
            self.metrics.done(endpoint, server, status, latency, ttfb)
            prompt, completion = tally.tokens(is_sse)
            tokens = (prompt or 0) + (completion or 0)
            if use is not None:
                use.tokens = tokens
            model = self._model(server)
            self.metrics.usage(caller.name, model, prompt, completion)
            self._log(scope, caller, server, model, endpoint, status, at, body, prompt, completion, latency, ttfb,
                      len(body) + flight.uploaded, tally)

    def _model(self, server: str) -> str:
        section = self.registry.servers.get(server)
        return (section.alias if section is not None else None) or server

    def _log(self, scope: dict[str, Any], caller: Caller, server: str, model: str, endpoint: str, status: int,
             at: float, body: bytes, prompt: int | None = None, completion: int | None = None, latency: float = 0.0,
             ttfb: float | None = None, bytes_in: int = 0, tally: Tally | None = None) -> None:
        if self.log is None or not self.log.enabled:
            return
        keep = self.log_bodies
        self.log.add(Row(at, caller.id or None, scope["method"], endpoint, server, model, status,
                         prompt, completion, latency, ttfb, bytes_in, tally.size if tally else 0,
                         body[:keep].decode(errors="replace") if keep and body else None,
                         tally.kept.decode(errors="replace") if keep and tally and tally.kept else None))

    async def _upload(self, receive: Receive, flight: Flight) -> AsyncIterator[bytes]:
        try:
            async for chunk in bodies.pieces(receive, self.max_body):
                flight.uploaded += len(chunk)
                yield chunk
        except ClientGone:
            flight.disconnected = True
            raise

    async def _unavailable(self, send: Send, server: str, before: str = "") -> None:
        state = self.registry.state_of(server)
        if state == LOADING or self.registry.coming(server):
            what = f"did not come back within {self.load_timeout:.0f}s ([gateway] load_timeout)"
            if state == LOADING:
                what = f"is still loading after {self.load_timeout:.0f}s ([gateway] load_timeout)"
        else:
            what = f"is {self.registry.expected(server) or 'not running'}"
        await send_error(send, 503, f"server '{server}': {before}it {what}; try again shortly (`podllama status` "
                         "tells more)", None, [(b"retry-after", b"5" if state == LOADING else b"10")])

    async def _replica(self, server: str, receive: Receive | None, flight: Flight) -> Replica | None:
        """A healthy replica of SERVER; while it loads or comes back after a restart, waited for up to
        load_timeout (and given up when the client goes, watched through RECEIVE where the body has been read
        already; without RECEIVE the request's own watcher cancels the wait)."""
        replica = self.registry.pick(server)
        if replica is None and not self.registry.coming(server):
            await self.registry.refresh_soon()
            replica = self.registry.pick(server)
        if replica is not None or not self.registry.coming(server) or not self.load_timeout:
            return replica
        return await self._unless_gone(self.registry.wait_ready(server, self.load_timeout), receive, flight)

    async def _unless_gone(self, work: Awaitable[T], receive: Receive | None, flight: Flight) -> T | None:
        """WORK's result, or None once the client has gone (watched through RECEIVE where the body has been read
        already; without RECEIVE the request's own watcher cancels the task)."""
        if receive is None:
            return await work
        waiting = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._watch(receive, flight))
        try:
            await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the watcher cancels the request's task when the client goes
            if not flight.disconnected:
                raise
        finally:
            watcher.cancel()
            waiting.cancel()
        return None if flight.disconnected else waiting.result()

    async def _watch(self, receive: Receive, flight: Flight) -> None:
        """Waits for the client to go away; then closes the upstream connection (llama-server stops)."""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
        if not flight.finished:
            flight.disconnected = True
            if flight.response is not None:
                flight.response.close()  # llama-server sees the connection go and stops
            elif flight.task is not None:
                flight.task.cancel()  # still queued for a connection: stop waiting

    def _remember(self, conv: str, server: str) -> None:
        self.conversations[conv] = server
        self.conversations.move_to_end(conv)
        while len(self.conversations) > 10000:
            self.conversations.popitem(last=False)

    async def close(self) -> None:
        self.client.close()
