"""The hot path: an llama-server request in, the right server chosen, bytes streamed both ways.

A raw ASGI handler (no framework on this path): classify the path with the route table, check the key,
choose the server (capability → roles, then the request's model, then the role's default; image/audio parts →
a vision/audio server), pick the least busy healthy replica, forward, and stream the answer back chunk by
chunk. A client that goes away closes the upstream connection at once, in every phase.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qs

from ..config import NAME_RE, PROJECTOR_ROLES
from .auth import Keys
from .client import Client, Response, UpstreamError
from .metrics import Metrics
from .routes import CAPABILITY_ROLES, ENDPOINTS, Endpoint
from .upstreams import LOADING, Registry

log = logging.getLogger("podllama.gateway")

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
              b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect"}
NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"x-api-key"}  # the gateway's credentials stay here
RESPONSE_DROP = {b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date"}
SMALL_BODY = 1 << 20  # bodies up to this size are read before forwarding (and sent with a content-length)
MODEL_FIELD = re.compile(rb'name="model"\r\n(?:[^\r\n]*\r\n)*\r\n([^\r\n]*)\r\n')
_MEDIA = {"image_url": "vision", "input_image": "vision", "image": "vision", "input_audio": "audio", "audio": "audio",
          "input_video": "vision"}


def error_body(status: int, message: str, kind: str) -> bytes:
    """The OpenAI (and llama-server) error shape."""
    return json.dumps({"error": {"code": status, "message": message, "type": kind}}).encode()


async def send_error(send: Any, status: int, message: str, kind: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = error_body(status, message, kind)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def media_role(body: dict[str, Any]) -> str | None:
    """'vision' or 'audio' when a chat/responses/messages body carries image or audio parts."""
    found = None
    for message in body.get("messages") or (body.get("input") if isinstance(body.get("input"), list) else []) or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            role = _MEDIA.get(part.get("type")) if isinstance(part, dict) else None
            if role == "audio":
                return "audio"
            found = found or role
    return found


def drive(coro: Any, resume: Any) -> bool:
    """Run an ASGI send() to completion right now if it does not have to wait (it waits only when the client
    reads slower than the server writes); else finish it when it can, then call RESUME. True: done now."""
    try:
        future = coro.send(None)
    except StopIteration:
        return True
    future.add_done_callback(lambda _: drive(coro, resume) and resume())
    return False


class Flight:
    """One request on its way: what the disconnect watcher needs to cancel it."""

    __slots__ = ("response", "finished", "disconnected", "task")

    def __init__(self) -> None:
        self.response: Response | None = None
        self.finished = False
        self.disconnected = False
        self.task = asyncio.current_task()


class Proxy:
    def __init__(self, registry: Registry, keys: Keys, metrics: Metrics) -> None:
        self.registry, self.keys, self.metrics = registry, keys, metrics
        gw = registry.stack.cfg.gateway
        self.client = Client(gw.connect_timeout, gw.first_byte_timeout, gw.idle_timeout)
        self.max_body = int(gw.max_body_mb * 2**20)
        self.load_timeout = gw.load_timeout
        self.conversations: OrderedDict[str, str] = OrderedDict()  # X-Conversation-Id → server

    # -- entry points -------------------------------------------------------------------------------------
    async def endpoint(self, scope: dict[str, Any], receive: Any, send: Any, ep: Endpoint) -> None:
        """A route of the table."""
        if not self.keys.inference_ok(scope["headers"]):
            return await send_error(send, 401, "Invalid API Key", "authentication_error")
        query = parse_qs(scope["query_string"].decode("latin-1")) if scope["query_string"] else {}
        body, streamed = b"", True
        if ep.scope == "server":
            server, why = self._server_scoped(ep, query, scope)
        else:
            model = (query.get("model") or [None])[0]
            media = None
            if scope["method"] == "POST" and ep.body_model and model is None and (
                    self._small_body(scope) or len(self.registry.servers_with_role(ep.roles)) > 1):
                # read it (it is small): the model it names decides, and a model of another role is refused
                body = await self._read_body(scope, receive, send)
                if body is None:
                    return
                streamed = False
                if b'"model"' in body or b'name="model"' in body or (
                        ep.multimodal and self.registry.servers_with_role(PROJECTOR_ROLES)):
                    model, media = self._inspect(scope, body, ep)
            server, why = self._choose(ep, model, media)
        if server is None:
            return await send_error(send, why[0], why[1], why[2])
        await self.forward(scope, receive, send, server, ep.name, scope["raw_path"] or scope["path"].encode(),
                           body, streamed)

    async def passthrough(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """/servers/{name}/{path}: anything, to one server."""
        if not self.keys.inference_ok(scope["headers"]):
            return await send_error(send, 401, "Invalid API Key", "authentication_error")
        rest = scope["path"][len("/servers/"):]
        name, _, path = rest.partition("/")
        segments = path.split("/")
        if not NAME_RE.match(name) or ".." in segments or "." in segments or "\x00" in path or "\\" in path:
            return await send_error(send, 400, f"'{scope['path']}' is not /servers/NAME/PATH with a plain server name "
                                    "and path", "invalid_request_error")
        if name not in self.registry.servers:
            return await send_error(send, 404, f"no server named '{name}'; servers: "
                                    f"{', '.join(self.registry.servers)}", "not_found_error")
        target = ("/" + path).encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        await self.forward(scope, receive, send, name, "passthrough", target, b"", True)

    # -- choosing a server --------------------------------------------------------------------------------
    def _server_scoped(self, ep: Endpoint, query: dict[str, list[str]], scope: dict[str, Any]
                       ) -> tuple[str | None, tuple[int, str, str]]:
        if ep.name == "stream.follow" and query.get("conv_id"):
            known = self.conversations.get(query["conv_id"][0])
            if known:
                return known, (0, "", "")
        name = (query.get("server") or [None])[0]
        if name is not None:
            if name in self.registry.servers:
                return name, (0, "", "")
            return None, (404, f"no server named '{name}'; servers: {', '.join(self.registry.servers)}", "not_found_error")
        model = (query.get("model") or [None])[0]
        if model is not None:
            server = self.registry.server_for_model(model)
            if server is None:
                return None, (404, f"model '{model}' not found; GET /v1/models lists them", "not_found_error")
            return server, (0, "", "")
        server = self.registry.default(CAPABILITY_ROLES["server"])
        return server, (503, "no servers are configured", "unavailable_error")

    def _inspect(self, scope: dict[str, Any], body: bytes, ep: Endpoint) -> tuple[str | None, str | None]:
        ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        if ctype.startswith(b"multipart/form-data"):
            m = MODEL_FIELD.search(body)
            return (m.group(1).decode(errors="replace") if m else None), None
        try:
            data = json.loads(body)
        except ValueError:
            return None, None  # llama-server will say what is wrong with it
        if not isinstance(data, dict):
            return None, None
        model = data.get("model") if isinstance(data.get("model"), str) else None
        return model, media_role(data) if ep.multimodal else None

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
                              f"answer {ep.paths[0]}; it serves {', '.join(serves)}", "invalid_request_error")
        server = reg.default(roles)
        if server is None:
            needed = " or ".join(f"'{r}'" for r in roles)
            return None, (501, f"no server here answers {ep.paths[0]}: it needs a server with role {needed}; add one "
                          "to services.toml", "not_supported_error")
        return server, (0, "", "")

    # -- request body -------------------------------------------------------------------------------------
    def _small_body(self, scope: dict[str, Any]) -> bool:
        """A body small enough to read before choosing (JSON requests); big uploads stream through unread,
        unless several servers could take them and only the body can tell which."""
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        return length is not None and int(length) <= SMALL_BODY
    async def _read_body(self, scope: dict[str, Any], receive: Any, send: Any) -> bytes | None:
        parts, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await send_error(send, 413, f"request body over {self.max_body >> 20} MiB ([gateway] max_body_mb)",
                                 "invalid_request_error")
                return None
            parts.append(chunk)
            if not msg.get("more_body"):
                return b"".join(parts)

    async def _body_stream(self, receive: Any, flight: Flight):
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                flight.disconnected = True
                raise UpstreamError("the client went away while sending", "body")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise UpstreamError("request body too large", "too_large")
            yield chunk
            if not msg.get("more_body"):
                return

    # -- forwarding ---------------------------------------------------------------------------------------
    async def forward(self, scope: dict[str, Any], receive: Any, send: Any, server: str, endpoint: str,
                      target: bytes, body: bytes, streamed: bool) -> None:
        started = time.perf_counter()
        flight = Flight()
        headers = [(k, v) for k, v in scope["headers"] if k not in NOT_FORWARDED]
        if streamed:
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            chunked = any(k == b"transfer-encoding" for k, _ in scope["headers"])
            if length is None and not chunked:
                streamed = False  # no body (GET, DELETE …)
            elif length is not None and int(length) > self.max_body:
                return await send_error(send, 413, f"request body over {self.max_body >> 20} MiB "
                                        "([gateway] max_body_mb)", "invalid_request_error")
            elif length is not None and int(length) <= SMALL_BODY:  # small: read now, forward with a content-length
                data = await self._read_body(scope, receive, send)
                if data is None:
                    return
                body, streamed = data, False
        watcher: asyncio.Task[None] | None = None
        replica = self.registry.pick(server)
        if replica is None and self.registry.state_of(server) != LOADING:
            await self.registry.refresh_soon()
            replica = self.registry.pick(server)
        if replica is None:
            replica = await self._wait_for(server, None if streamed else receive, flight)
            if replica is None:
                if flight.disconnected:
                    return
                state = self.registry.state_of(server)
                self.metrics.error(endpoint, server, "unavailable")
                return await send_error(send, 503, f"server '{server}' is {'still loading' if state == LOADING else 'not running'}"
                                        f"; try again shortly (`podllama status` tells more)", "unavailable_error",
                                        [(b"retry-after", b"5" if state == LOADING else b"10")])
        conv = next((v for k, v in scope["headers"] if k == b"x-conversation-id"), None)
        if conv:
            self._remember(conv.decode(errors="replace"), server)
        client = scope.get("client")
        if client:
            headers.append((b"x-forwarded-for", client[0].encode()))
        key = (endpoint, server)
        self.metrics.in_flight[key] += 1
        status, ttfb = 502, None
        try:
            if not streamed:
                watcher = asyncio.ensure_future(self._watch(receive, flight))
            for attempt in (1, 2):
                replica.in_flight += 1
                try:
                    response = await self.client.request(
                        replica.host, replica.port, scope["method"], target, headers, body,
                        self._body_stream(receive, flight) if streamed else None,
                        on_start=lambda r: setattr(flight, "response", r), limit=self.registry.http_threads(server))
                    break
                except asyncio.CancelledError:
                    if flight.disconnected:  # the client went away while the request was queued
                        status = 499
                        return
                    raise
                except UpstreamError as e:
                    if flight.disconnected:
                        status = 499
                        return
                    if e.phase == "connect":
                        self.registry.mark_down(replica)
                        other = self.registry.pick(server)
                        if attempt == 1 and other is not None and not streamed:
                            replica.in_flight -= 1
                            replica = other  # nothing reached the dead one: another replica takes it
                            continue
                    if watcher is None:
                        watcher = asyncio.ensure_future(self._watch(receive, flight))
                    status = {"connect": 503, "too_large": 413}.get(e.phase) or (
                        504 if "timed out" in str(e) or "no data" in str(e) else 502)
                    self.metrics.error(endpoint, server, e.phase)
                    return await send_error(send, status, f"server '{server}' ({replica.container}): {e}",
                                            "unavailable_error" if status == 503 else "server_error",
                                            [(b"retry-after", b"5")] if status == 503 else [])
            if watcher is None:
                watcher = asyncio.ensure_future(self._watch(receive, flight))
            status = response.status
            ttfb = time.perf_counter() - started
            out_headers = [(k, v) for k, v in response.headers if k not in RESPONSE_DROP]
            out_headers.append((b"x-podllama-server", server.encode()))
            is_sse = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in response.headers)
            if is_sse and not any(k == b"x-accel-buffering" for k, _ in out_headers):
                out_headers.append((b"x-accel-buffering", b"no"))
            await send({"type": "http.response.start", "status": status, "headers": out_headers})

            def sink(chunk: bytes) -> bool:  # straight from the network callback to the client
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
            self.metrics.done(endpoint, server, status, time.perf_counter() - started, ttfb)

    async def _watch(self, receive: Any, flight: Flight) -> None:
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

    async def _wait_for(self, server: str, receive: Any, flight: Flight):
        """A healthy replica, waiting up to load_timeout while the server loads; gives up when the client goes
        (watched through RECEIVE, when the request body has been read already)."""
        if self.registry.state_of(server) != LOADING or not self.load_timeout:
            return None
        if receive is None:
            return await self.registry.wait_ready(server, self.load_timeout)
        waiting = asyncio.ensure_future(self.registry.wait_ready(server, self.load_timeout))
        watcher = asyncio.ensure_future(self._watch(receive, flight))
        try:
            await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if flight.disconnected:
            waiting.cancel()
            return None
        return waiting.result()

    def _remember(self, conv: str, server: str) -> None:
        self.conversations[conv] = server
        self.conversations.move_to_end(conv)
        while len(self.conversations) > 10000:
            self.conversations.popitem(last=False)

    async def close(self) -> None:
        self.client.close()
