"""The hot path: an llama-server request in, the right server chosen, bytes streamed both ways.

A raw ASGI handler (no framework on this path), reached after the guard let the request in: classify the path
with the route table, choose the server (capability → roles, then the request's model, then the role's
default; image/audio parts → a vision/audio server), pick the least busy healthy replica, forward, and stream
the answer back chunk by chunk. A client that goes away closes the upstream connection at once, in every phase.

A request body is received whole (memory, then a temporary file: body.Spool) before a server is chosen or a
connection to it taken, so a client that sends slowly holds nothing but its own connection; the answer is read
from the server as fast as it comes into a bounded buffer per client (outbox.Outbox), so a client that reads
slowly never holds a server either.

What goes upstream is rebuilt, never copied blindly: the target from the *decoded* path, re-encoded (a
`%0D%0A` in a URL cannot become a line break in the request line), the query string as it came (checked),
the client's headers that llama-server reads (an allowlist: FORWARDED), plus the stack's server key and the
client's address as the gateway saw it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, quote

from ...access import samples
from ...access.credentials import bearer
from ...config import NAME_RE, PROJECTOR_ROLES, GatewaySection
from ...engine.health import LOADING
from ...validate import CONTROL
from ..front import body as bodies
from ..front.auth import Caller
from ..front.client import BrokenOff, Client, ClientGone, ConnectFailed, Response, UpstreamError
from ..front.errors import Receive, Send, error_body, send_error
from ..front.guard import caller_of
from ..front.outbox import Outbox
from .choice import Chooser
from .flight import Flight, Outcome, unless_gone, watch
from .heartbeat import Heartbeat, wants_stream
from .metrics import Metrics
from .ondemand import Loader, Refused
from .quota import OverLimit, Quota, Use
from .requestlog import RequestLog, Row
from .routes import CAPABILITY_ROLES, ENDPOINTS, REPLAYED, Endpoint, RouteTable
from .servers import Replica
from .tally import ANY, Tally
from .upstreams import Registry

log = logging.getLogger("podllama.gateway")

# the request headers a server is sent (any other — cookies, credentials, Proxy-*, X-Forwarded-*, hop-by-hop,
# Accept-Encoding: answers come uncompressed so their tokens can be read — stays at the gateway)
FORWARDED = frozenset({b"content-type", b"accept", b"accept-language", b"user-agent", b"x-conversation-id",
                       b"anthropic-version", b"anthropic-beta", b"x-request-id", b"if-none-match",
                       b"if-modified-since", b"cache-control", b"x-tool-cwd", b"x-tool-runtime", b"x-resp-type"})
FORWARDED_PREFIXES = (b"x-llama-server-proxy-header-",)  # the web UI's MCP proxy passes these on (/cors-proxy)
RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date", b"trailer",
                           b"upgrade", b"proxy-authenticate"})
_QUERY_OK = re.compile(rb"^[\x21-\x7e]*$")
PATH_SAFE = "/:@!$&'()*+,;=~"
LOG_BODY = 64 * 1024  # bytes of each body the request log keeps, with [gateway] log_bodies
CLOSE = [(b"connection", b"close")]  # on a refusal before the body was read: it never will be
ANSWERS = {ep.name: ep.answer for ep in ENDPOINTS}  # endpoint → the shape of its answer (where its tokens are)


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


def _pieces(spool: bodies.Spool) -> AsyncIterator[bytes]:
    """A body in a file, a piece at a time, the event loop free between pieces (a server that takes everything
    at once never makes the upload wait, so the wait is made here)."""
    async def pieces() -> AsyncIterator[bytes]:
        for piece in spool.pieces():
            yield piece
            await asyncio.sleep(0)

    return pieces()


class Proxy:
    def __init__(self, registry: Registry, metrics: Metrics, gateway: GatewaySection, server_key: str | None,
                 loader: Loader | None = None, log: RequestLog | None = None,
                 on_trouble: Callable[[str], object] = lambda server: None) -> None:
        """LOADER loads on-demand servers (gateway/ondemand.py); LOG is the request log (gateway/requestlog.py);
        ON_TROUBLE hears of a server that seems to have died."""
        self.registry, self.metrics = registry, metrics
        self.loader, self.log, self.on_trouble = loader, log, on_trouble
        self.table = RouteTable.build()  # the gateway classifies requests by it too
        self.client = Client()
        self.client.tls = registry.tls  # remote https:// servers, kept current by the registry
        self.chooser = Chooser(registry)
        self.quota = Quota()  # per-key limits (gateway/quota.py)
        self.configure(gateway, server_key)

    def configure(self, gw: GatewaySection, server_key: str | None) -> None:
        c = self.client
        c.connect_timeout, c.first_byte_timeout, c.idle_timeout = gw.connect_timeout, gw.first_byte_timeout, gw.idle_timeout
        c.queue_timeout = gw.queue_timeout
        self.max_body = int(gw.max_body_mb * 2**20)
        self.max_images, self.max_image_side = gw.max_images, gw.max_image_side
        self.load_timeout = gw.load_timeout
        self.progress_interval = gw.progress_interval
        self.upstream_auth = bearer(server_key)
        self.log_bodies = LOG_BODY if gw.log_bodies else 0
        self.answer_buffer = int(gw.answer_buffer_mb * 2**20)

    # -- entry points -------------------------------------------------------------------------------------
    async def endpoint(self, scope: dict[str, Any], receive: Receive, send: Send, ep: Endpoint) -> None:
        """A route of the table."""
        target = target_of(scope["path"], scope["query_string"])
        if target is None:
            return await self._refuse(scope, send, ep.name, None, 400,
                                      "the request path or query holds control characters or spaces")
        query = parse_qs(scope["query_string"].decode("latin-1")) if scope["query_string"] else {}
        ok, spool, data = await self._receive(scope, receive, send, ep.name)
        if not ok:
            return
        beat = None
        if ep.streams and self.progress_interval and wants_stream(data):
            send = beat = Heartbeat(send, self.progress_interval, lambda: "waiting for a server", ep.answer)
        try:
            ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            body = spool.data() if spool is not None and spool.in_memory else b""
            caller = caller_of(scope)
            if ep.scope == "server":
                server, why = self.chooser.server_scoped(ep, query, caller, data)
            else:
                model = next(iter(query.get("model", [])), None)
                media = None
                if spool is not None and ep.image_limits and (problem_text := await bodies.image_problem_of(
                        ctype, spool, self.max_images, self.max_image_side)):
                    return await self._refuse(scope, send, ep.name, None, 400, problem_text, spool=spool)
                # the model a body names decides; a large body (in a file) is read back only when several
                # servers could take it and only the body can tell which
                if spool is not None and ep.body_model and model is None and (
                        spool.in_memory or len(self.registry.servers_with_role(ep.roles)) > 1):
                    if not body or b'"model"' in body or b'name="model"' in body or (
                            ep.multimodal and self.registry.servers_with_role(PROJECTOR_ROLES)):
                        model, media = await bodies.inspect_spool(ctype, spool, ep.multimodal, data)
                server, why = self.chooser.choose(ep, model, media)
            if server is None:
                return await self._refuse(scope, send, ep.name, None, why[0], why[1], why[2] or None, spool=spool)
            if beat is not None:
                handle = self.registry[server]
                beat.stage = lambda: f"waiting for server '{server}': {handle.describe()}"
            await self.forward(scope, receive, send, server, ep.name, target, spool)
        finally:
            if beat is not None:
                beat.stop()
            if spool is not None:
                spool.close()

    async def passthrough(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """/servers/{name}/{path}: anything, to one server."""
        rest = scope["path"][len("/servers/"):]
        name, _, path = rest.partition("/")
        segments = path.split("/")
        target = target_of("/" + path, scope["query_string"])
        if not NAME_RE.match(name) or ".." in segments or "." in segments or "\\" in path or target is None:
            return await self._refuse(scope, send, "passthrough", None, 400, "the path is not /servers/NAME/PATH "
                                      "with a plain server name and path (no '..', control characters or spaces)")
        if name not in self.registry.servers:
            caller = caller_of(scope)
            return await self._refuse(scope, send, "passthrough", None, 404,
                                      f"no server named '{name}'; servers: {self.chooser.listed(caller)}")
        server = self.registry.servers[name]
        if not server.kind.llama and path != "health":
            # the other programs have routes no one should reach (whisper-server's POST /load opens any path):
            # only those of the route table for its role
            ep = self.table.match(scope["method"], "/" + path)
            if ep is None or ep.scope != "model" or server.role not in ep.roles:
                return await self._refuse(scope, send, "passthrough", name, 404,
                                          f"server '{name}' runs {server.kind.program}: through /servers/{name}/ only "
                                          f"/health and the routes of role '{server.role}' in /help")
        ok, spool, _ = await self._receive(scope, receive, send, "passthrough")
        if not ok:
            return
        try:
            await self.forward(scope, receive, send, name, "passthrough", target, spool)
        finally:
            if spool is not None:
                spool.close()

    async def ui(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """llama.cpp's web UI, from the default chat server: `/` and its static files. Sent upstream without the
        stack's server key, so llama-server itself lets through only what it serves to anyone (the UI's files);
        where the image has no UI, `/` leads to /help."""
        server = self.registry.default(CAPABILITY_ROLES["generate"])
        replica = self.registry[server].pick() if server else None
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

    # -- request body -------------------------------------------------------------------------------------
    async def _receive(self, scope: dict[str, Any], receive: Receive, send: Send, endpoint: str
                       ) -> tuple[bool, bodies.Spool | None, Any]:
        """(True, the whole body, its JSON value when it was cheap to read) before anything else — (True, None,
        None) when the request has none; (False, None, None) when the client left or an error was answered: too
        large or compressed (by its head, before a byte is read), too slow (server.py), JSON nested deeper than
        the gateway lets through."""
        if not bodies.has_body(scope["headers"]):
            return True, None, None
        refusal = bodies.refused_by_head(scope["headers"], self.max_body)
        if refusal is not None:
            await self._refuse(scope, send, endpoint, None, *refusal, None, CLOSE)
            return False, None, None
        try:
            spool = await bodies.receive_whole(receive, self.max_body)
        except UpstreamError as e:
            if e.status != 499:
                await self._refuse(scope, send, endpoint, None, e.status, str(e))
            else:  # the client left before its body was whole: nothing to answer, a line all the same
                self._log(scope, endpoint, None, 499, time.time(), None)
            return False, None, None
        ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        data, problem = bodies.read_json(spool.data()) if spool.in_memory and b"json" in ctype else (None, None)
        if problem is not None:
            await self._refuse(scope, send, endpoint, None, problem.status, str(problem), spool=spool)
            spool.close()
            return False, None, None
        return True, spool, data

    # -- forwarding ---------------------------------------------------------------------------------------
    def _upstream_headers(self, scope: dict[str, Any], server: str) -> list[tuple[bytes, bytes]]:
        """The client's headers as they go to SERVER: those of FORWARDED, the client's address as the gateway saw
        it, and the server's own key (the stack's server key, or a remote server's)."""
        out = [(k, v) for k, v in scope["headers"] if k in FORWARDED or k.startswith(FORWARDED_PREFIXES)]
        client = scope.get("client")
        if client:
            out.append((b"x-forwarded-for", client[0].encode()))
        remote = self.registry.auth_of(server)
        return out + (self.upstream_auth if remote is None else remote)

    async def forward(self, scope: dict[str, Any], receive: Receive, send: Send, server: str, endpoint: str,
                      target: bytes, spool: bodies.Spool | None) -> None:
        """To SERVER, if the caller's key may use it and is within its limits; an on-demand server is loaded
        first, and counted busy until the answer is complete. SPOOL: the request's body, received whole."""
        caller = caller_of(scope)
        section = self.registry.servers.get(server)
        why = caller.refusal(server, section) if section is not None else None
        if why is not None:
            return await self._refuse(scope, send, endpoint, server, 403, why, spool=spool)
        try:
            with self.limited(caller) as use:
                await self._load_and_forward(scope, receive, send, server, endpoint, target, spool, caller, use)
        except OverLimit as e:
            return await self._refuse(scope, send, endpoint, server, 429, str(e), None,
                                      [(b"retry-after", str(e.retry_after).encode())], spool)

    @contextlib.contextmanager
    def limited(self, caller: Caller) -> Iterator[Use | None]:
        """A request of CALLER's within its key's limits (rpm, tpm, concurrency), counted until the block ends;
        OverLimit when it is not. Every route that reaches a server goes through here."""
        if caller.key is None:
            yield None
            return
        use = self.quota.admit(caller.key)
        try:
            yield use
        finally:
            self.quota.done(caller.key, use)

    async def _load_and_forward(self, scope: dict[str, Any], receive: Receive, send: Send, server: str,
                                endpoint: str, target: bytes, spool: bodies.Spool | None, caller: Caller,
                                use: Use | None) -> None:
        loader = self.loader
        if loader is None or not loader.manages(server):
            return await self._forward(scope, receive, send, server, endpoint, target, spool, caller, use)
        flight = Flight()
        acquired = False

        async def acquire() -> None:
            nonlocal acquired
            await loader.acquire(server)
            acquired = True

        try:
            await unless_gone(acquire(), receive, flight)
        except Refused as e:
            self.metrics.error(endpoint, server, "unavailable")
            return await self._refuse(scope, send, endpoint, server, e.status, str(e), None,
                                      [(b"retry-after", str(e.retry_after).encode())], spool)
        except TimeoutError:
            self.metrics.error(endpoint, server, "unavailable")
            return await self._refuse(scope, send, endpoint, server, 503, f"server '{server}' is still loading after "
                                      f"{self.load_timeout:.0f}s ([gateway] load_timeout); try again shortly", None,
                                      [(b"retry-after", b"5")], spool)
        if not acquired:  # the client went away while it loaded
            return
        try:
            await self._forward(scope, receive, send, server, endpoint, target, spool, caller, use)
        finally:
            loader.release(server)

    async def _forward(self, scope: dict[str, Any], receive: Receive, send: Send, server: str, endpoint: str,
                       target: bytes, spool: bodies.Spool | None, caller: Caller, use: Use | None) -> None:
        """Forward and account: a replica, the exchange (attempt), the answer (stream), then the request's
        metrics, tokens, limits and log line, whatever happened."""
        started, at = time.perf_counter(), time.time()
        flight = Flight(scope.get("extensions", {}).get("podllama.abort"))
        tally = Tally(self.log_bodies, ANSWERS.get(endpoint, ANY))
        replica = await self._replica(server, receive, flight)
        if replica is None:
            if flight.disconnected:
                return
            self.metrics.error(endpoint, server, "unavailable")
            return await self._refuse(scope, send, endpoint, server, 503, *self._unavailable(server), spool)
        conv = next((v for k, v in scope["headers"] if k == b"x-conversation-id"), None)
        if conv and not self.chooser.claim(conv.decode(errors="replace"), server, caller):
            self.metrics.error(endpoint, server, "refused")
            return await self._refuse(scope, send, endpoint, server, 409, "that X-Conversation-Id belongs to another "
                                      "key; choose a new one", spool=spool)
        key = (endpoint, server)
        self.metrics.in_flight[key] += 1
        outcome = Outcome()
        watcher = asyncio.ensure_future(watch(receive, flight))
        try:
            response, replica = await self._attempt(scope, send, server, endpoint, target, spool, flight, replica,
                                                    outcome)
            if response is not None:
                outcome.ttfb = time.perf_counter() - started
                await self._stream(send, server, endpoint, replica, response, flight, tally, outcome)
        finally:
            flight.finished = True
            replica.in_flight -= 1
            self.metrics.in_flight[key] -= 1
            watcher.cancel()
            latency = time.perf_counter() - started
            self.metrics.done(endpoint, server, outcome.status, latency, outcome.ttfb)
            prompt, completion = tally.tokens()
            if use is not None:
                use.tokens = (prompt or 0) + (completion or 0)
            self.metrics.usage(caller.name, self._model(server), prompt, completion)
            self._log(scope, endpoint, server, outcome.status, at, spool, prompt, completion, latency, outcome.ttfb,
                      tally, replica)

    async def _attempt(self, scope: dict[str, Any], send: Send, server: str, endpoint: str, target: bytes,
                       spool: bodies.Spool | None, flight: Flight, replica: Replica, outcome: Outcome
                       ) -> tuple[Response | None, Replica]:
        """The exchange up to the answer's head: once, and once more (on another replica, or on this server when
        it is back) when not a byte of an answer came. (None, …) when it was answered here or the client left."""
        headers = self._upstream_headers(scope, server)
        body = spool.data() if spool is not None and spool.in_memory else b""
        for attempt in (1, 2):
            replica.in_flight += 1
            try:
                stream = None if spool is None or spool.in_memory else _pieces(spool)
                response = await self.client.request(
                    replica.host, replica.port, scope["method"], target, headers, body, stream,
                    on_start=lambda r: setattr(flight, "response", r), limit=self.registry.http_threads(server),
                    length=spool.size if spool is not None and stream is not None else None)
                return response, replica
            except asyncio.CancelledError:
                if flight.disconnected:  # the client went away while the request was queued
                    outcome.status = 499
                    return None, replica
                raise
            except UpstreamError as e:
                if flight.disconnected or isinstance(e, ClientGone):
                    outcome.status = 499
                    return None, replica
                if isinstance(e, (ConnectFailed, BrokenOff)):
                    self.registry.mark_down(replica)
                    self.on_trouble(server)
                    if attempt == 1:
                        flight.response = None  # the client going away now cancels the wait
                        try:
                            other = await self._replica(server, None, flight)
                        except asyncio.CancelledError:
                            if flight.disconnected:
                                outcome.status = 499
                                return None, replica
                            raise
                        if other is not None:
                            replica.in_flight -= 1
                            replica = other
                            continue
                        if flight.disconnected:
                            outcome.status = 499
                            return None, replica
                        outcome.status = 503
                        self.metrics.error(endpoint, server, "unavailable")
                        await send_error(send, 503, *self._unavailable(server, f"{e}; "))
                        return None, replica
                outcome.status = e.status
                self.metrics.error(endpoint, server, e.kind)
                log.warning("%s (%s): %s", server, replica.container, e)
                await send_error(send, e.status, f"server '{server}': {e}", None,
                                 [(b"retry-after", b"5")] if e.status == 503 else [])
                return None, replica
        raise AssertionError("unreachable")

    async def _stream(self, send: Send, server: str, endpoint: str, replica: Replica, response: Response,
                      flight: Flight, tally: Tally, outcome: Outcome) -> None:
        """The answer, from the server as fast as it comes, to the client through its outbox."""
        outcome.status = response.status
        out_headers = [(k, v) for k, v in response.headers
                       if k not in RESPONSE_DROP and not k.startswith(b"access-control-")]
        out_headers.append((b"x-podllama-server", server.encode()))
        tally.begin(response.headers)
        if tally.sse and not any(k == b"x-accel-buffering" for k, _ in out_headers):
            out_headers.append((b"x-accel-buffering", b"no"))
        await send({"type": "http.response.start", "status": response.status, "headers": out_headers})
        outbox = flight.outbox = Outbox(send, self.answer_buffer)

        def sink(chunk: bytes) -> bool:  # straight from the network callback into the client's outbox
            tally.feed(chunk)
            return outbox.put(chunk)

        try:
            await response.stream_to(sink, self.client.idle_timeout)
        except UpstreamError as e:
            if flight.disconnected or isinstance(e, ClientGone):
                outcome.status = 499
                flight.close_client()  # too far behind: the client goes too
                return
            self.metrics.error(endpoint, server, "broken_stream")
            log.warning("%s: %s broke off mid-response: %s", server, replica.container, e)
            if not tally.sse:
                raise  # the client sees the connection drop mid-body, not a complete-looking answer
            # never a silent truncation: the stream ends with an error event
            outbox.put(b"data: " + error_body(502, f"server '{server}' broke off: {e}", "server_error") + b"\n\n")
        await outbox.flush()
        if outbox.closed:
            outcome.status = 499
            return
        flight.finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _model(self, server: str) -> str:
        section = self.registry.servers.get(server)
        return (section.alias if section is not None else None) or server

    async def _refuse(self, scope: dict[str, Any], send: Send, endpoint: str, server: str | None, status: int,
                      message: str, etype: str | None = None, headers: list[tuple[bytes, bytes]] | None = None,
                      spool: bodies.Spool | None = None) -> None:
        """An answer of the gateway's own where a server's would have been: sent, and logged like any other (a
        refusal counts in a key's usage as what it is)."""
        self._log(scope, endpoint, server, status, time.time(), spool)
        await send_error(send, status, message, etype, headers or [])

    def _log(self, scope: dict[str, Any], endpoint: str, server: str | None, status: int, at: float,
             spool: bodies.Spool | None, prompt: int | None = None, completion: int | None = None,
             latency: float = 0.0, ttfb: float | None = None, tally: Tally | None = None,
             replica: Replica | None = None) -> None:
        if self.log is None:
            return
        path = REPLAYED.get(endpoint)
        if status == 200 and path and server and spool is not None and spool.size <= samples.MAX_BODY:
            self.log.sample(server, endpoint, path, spool.data)  # read only if the reservoir draws it
        if not self.log.enabled:
            return
        caller = caller_of(scope)
        keep = self.log_bodies
        body = spool.head(keep) if keep and spool is not None else b""
        self.log.add(Row(at, caller.id or None, scope["method"], endpoint, server,
                         self._model(server) if server else None, status, prompt, completion, latency, ttfb,
                         spool.size if spool else 0, tally.size if tally else 0,
                         body.decode(errors="replace") if body else None,
                         tally.kept.decode(errors="replace") if keep and tally and tally.kept else None,
                         *(replica.lineage if replica is not None else ())))

    def _unavailable(self, server: str, before: str = "") -> tuple[str, None, list[tuple[bytes, bytes]]]:
        """Why SERVER cannot answer now: the message, and when to try again."""
        h = self.registry[server]
        loading = h.health() == LOADING
        if loading:
            what = f"is still loading after {self.load_timeout:.0f}s ([gateway] load_timeout)"
        elif h.coming():
            what = f"did not come back within {self.load_timeout:.0f}s ([gateway] load_timeout)"
        else:
            what = f"is {h.expected() or 'not running'}"
        return (f"server '{server}': {before}it {what}; try again shortly (`podllama status` tells more)", None,
                [(b"retry-after", b"5" if loading else b"10")])

    async def _replica(self, server: str, receive: Receive | None, flight: Flight) -> Replica | None:
        """A healthy replica of SERVER; while it loads or comes back after a restart, waited for up to
        load_timeout (and given up when the client goes, watched through RECEIVE where the body has been read
        already; without RECEIVE the request's own watcher cancels the wait)."""
        h = self.registry[server]
        replica = h.pick()
        if replica is None and not h.coming():
            await self.registry.refresh_soon()
            replica = h.pick()
        if replica is not None or not h.coming() or not self.load_timeout:
            return replica
        return await unless_gone(self.registry.wait_ready(server, self.load_timeout), receive, flight)

    async def close(self) -> None:
        self.client.close()
