"""Ollama's API on the gateway's root URL, so Ollama clients work with `http://host:port` unchanged.

Each request is translated into the OpenAI-compatible route llama-server answers and sent through the same
proxy as any other request — the same routing by model, on-demand loading, waiting through restarts, keys,
scopes, limits and request log. The answer is translated back; streams become NDJSON lines, one JSON object
per line, the last with `"done": true`.

    /api/chat        → /v1/chat/completions
    /api/generate    → /v1/chat/completions (the model's template), or /v1/completions with "raw": true
    /api/embed       → /v1/embeddings (/api/embeddings, the older shape, too)
    /api/tags, /api/show, /api/ps, /api/version: answered from the config and the model files

Ollama's model-management routes (pull, push, create, copy, delete, blobs) are answered 501 naming podllama's
own command. Every other /api path is 404, naming /admin: podllama's management API lives there, not here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException as StarletteHTTPException

from ...api import ADMIN_PREFIX
from ...models.gguf_meta import Metadata
from ..front import body as bodies
from ..front import jsonbody
from ..front.client import UpstreamError
from ..front.errors import Receive, Send, upstream_message
from ..front.guard import caller_of
from ..routing.quota import OverLimit

if TYPE_CHECKING:
    from ..app import Gateway

PREFIX = "/api"
VERSION = "0.12.0"  # the Ollama API version whose shapes this follows (clients check it is recent enough)
ROLES = ("chat", "vision", "audio", "infill", "embedding")  # what Ollama clients can use; image/speech are not

# Ollama's options → the names llama-server reads in an OpenAI-compatible body. Others (num_ctx, num_gpu,
# num_thread …) are settings of the server process, fixed at its start: services.toml's args set them.
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "typical_p": "typical_p", "seed": "seed", "num_predict": "max_tokens", "stop": "stop",
           "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
           "mirostat": "mirostat", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta"}
NOT_HERE = {"pull": "`podllama pull REPO:QUANT` or POST /admin/models/pull",
            "push": "`podllama build --push` for images; models are pulled from Hugging Face",
            "create": "a [servers.NAME] section in services.toml (POST /admin/servers)",
            "copy": "an alias in services.toml ([servers.NAME] alias)",
            "delete": "`podllama models rm` or DELETE /admin/models/ID",
            "blobs": "`podllama models import FILE`"}
IMAGE_TYPES = {"iVBORw0KGgo": "image/png", "/9j/": "image/jpeg", "R0lGOD": "image/gif", "UklGR": "image/webp"}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    purpose: str
    upstream: str | None = None  # the llama-server route it becomes
    streams: bool = False


ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/version", "Ollama: the API version this gateway follows"),
    Route("GET", "/api/tags", "Ollama: the models (chat and embedding servers) with their GGUF details"),
    Route("POST", "/api/show", "Ollama: one model's details, GGUF metadata, template and capabilities"),
    Route("GET", "/api/ps", "Ollama: the models whose servers are running now"),
    Route("POST", "/api/chat", "Ollama chat (NDJSON stream unless \"stream\": false)", "/v1/chat/completions", True),
    Route("POST", "/api/generate", "Ollama generate: a prompt with the model's template, or raw (NDJSON stream "
          "unless \"stream\": false)", "/v1/chat/completions", True),
    Route("POST", "/api/embed", "Ollama embeddings of one input or many", "/v1/embeddings"),
    Route("POST", "/api/embeddings", "Ollama embeddings, the older shape ({prompt} → {embedding})", "/v1/embeddings"),
)


class Problem(Exception):
    """A request answered with an Ollama error: {"error": MESSAGE} and STATUS."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# -- requests: Ollama → OpenAI ---------------------------------------------------------------------------------
def options(req: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    opts = req.get("options") or {}
    if not isinstance(opts, dict):
        raise Problem(400, "options must be an object")
    for name, value in opts.items():
        if name in OPTIONS and value is not None:
            if name == "num_predict" and isinstance(value, int) and value < 0:
                continue  # -1 (no limit) and -2 (fill the context): llama-server's default
            out[OPTIONS[name]] = value
    fmt = req.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise Problem(400, "format must be \"json\" or a JSON schema object")
    return out


def image_url(data: str) -> dict[str, Any]:
    if not isinstance(data, str):
        raise Problem(400, "images must be base64 strings")
    mime = next((t for prefix, t in IMAGE_TYPES.items() if data.startswith(prefix)), "image/jpeg")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def message(m: Any) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise Problem(400, "each message needs a role and content")
    content = m.get("content") or ""
    if not isinstance(content, str):
        raise Problem(400, "a message's content must be a string (images go in \"images\")")
    out: dict[str, Any] = {"role": m["role"], "content": content}
    if m.get("images"):
        out["content"] = [{"type": "text", "text": content}, *(image_url(i) for i in m["images"])]
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": {
            "name": c["function"]["name"], "arguments": json.dumps(c["function"].get("arguments") or {})}}
            for i, c in enumerate(m["tool_calls"])]
    if m.get("tool_name"):
        out["name"] = m["tool_name"]
    if m.get("thinking") and m["role"] == "assistant":
        out["reasoning_content"] = m["thinking"]
    return out


SLIM = "podllama.slim"  # the request's thinned body, in its scope's state, when it was big (jsonbody.Slim)


def chat_body(req: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    messages = req.get("messages")
    if not isinstance(messages, list):
        raise Problem(400, "messages must be a list")
    out = {"model": model, "messages": [message(m) for m in messages], "stream": stream, **options(req)}
    if req.get("tools"):
        out["tools"] = req["tools"]
    if req.get("think") is False:
        out["chat_template_kwargs"] = {"enable_thinking": False}
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def generate_body(req: dict[str, Any], model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """(upstream path, body): raw prompts as a completion, others as one user turn with the model's template."""
    prompt = req.get("prompt") or ""
    if not isinstance(prompt, str):
        raise Problem(400, "prompt must be a string")
    if req.get("suffix"):
        raise Problem(400, "suffix (fill-in-the-middle) is not translated; POST /infill with input_prefix and "
                           "input_suffix to a server with an infill model")
    if req.get("raw"):
        out = {"model": model, "prompt": prompt, "stream": stream, **options(req)}
        return "/v1/completions", out | ({"stream_options": {"include_usage": True}} if stream else {})
    turns: list[dict[str, Any]] = [{"role": "system", "content": req["system"]}] if req.get("system") else []
    turns.append({"role": "user", "content": prompt, "images": req.get("images") or []})
    return "/v1/chat/completions", chat_body(req | {"messages": turns}, model, stream)


def embed_inputs(req: dict[str, Any], legacy: bool) -> list[str]:
    value = req.get("prompt") if legacy else req.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise Problem(400, "prompt must be a string" if legacy else "input must be a string or a list of strings")
    return inputs


# -- answers: OpenAI → Ollama ----------------------------------------------------------------------------------
def done_reason(finish: str | None) -> str:
    return "length" if finish == "length" else "stop"


def durations(data: dict[str, Any], started: float) -> dict[str, int]:
    """Ollama's counts and nanosecond durations from llama-server's timings (else its usage)."""
    t = data.get("timings") or {}
    usage = data.get("usage") or {}
    return {"total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": int(t.get("prompt_n", usage.get("prompt_tokens", 0)) or 0),
            "prompt_eval_duration": int(float(t.get("prompt_ms", 0) or 0) * 1e6),
            "eval_count": int(t.get("predicted_n", usage.get("completion_tokens", 0)) or 0),
            "eval_duration": int(float(t.get("predicted_ms", 0) or 0) * 1e6)}


def vectors(data: dict[str, Any]) -> list[list[float]]:
    """The embeddings of an OpenAI answer, in the order of the inputs."""
    try:
        return [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])]
    except (KeyError, TypeError):
        raise Problem(502, "the server's answer holds no embeddings") from None


def tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in calls:
        fn = c.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = {"_raw": fn.get("arguments")}
        out.append({"function": {"name": fn.get("name", ""), "arguments": args}})
    return out


class Translation:
    """An OpenAI answer (whole, or as stream events) becoming Ollama's: chat messages or generate responses."""

    def __init__(self, model: str, generate: bool, started: float) -> None:
        self.model, self.generate, self.started = model, generate, started
        self.finish: str | None = None
        self.calls: dict[int, dict[str, Any]] = {}  # streamed tool calls, by index, pieces joined
        self.last: dict[str, Any] = {}  # the last event (timings, usage)

    def _line(self, text: str, thinking: str | None = None, calls: list[dict[str, Any]] | None = None,
              done: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": now()}
        if self.generate:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        else:
            msg: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                msg["thinking"] = thinking
            if calls:
                msg["tool_calls"] = calls
            out["message"] = msg
        out["done"] = done
        return out

    def whole(self, data: dict[str, Any]) -> dict[str, Any]:
        choice = (data.get("choices") or [{}])[0]
        msg = choice.get("message") or {}
        text = choice.get("text") if "text" in choice else msg.get("content")
        out = self._line(text or "", msg.get("reasoning_content"), tool_calls(msg.get("tool_calls") or []), True)
        return out | {"done_reason": done_reason(choice.get("finish_reason"))} | durations(data, self.started)

    def event(self, data: dict[str, Any]) -> dict[str, Any] | None:
        """One stream event → a line to send now (None: nothing to say yet)."""
        self.last = data
        choices = data.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        self.finish = choice.get("finish_reason") or self.finish
        delta = choice.get("delta") or {}
        for c in delta.get("tool_calls") or []:
            have = self.calls.setdefault(int(c.get("index", 0)), {"function": {"name": "", "arguments": ""}})
            fn = c.get("function") or {}
            have["function"]["name"] += fn.get("name") or ""
            have["function"]["arguments"] += fn.get("arguments") or ""
        text = choice.get("text") if "text" in choice else delta.get("content")
        thinking = delta.get("reasoning_content")
        if not text and not thinking:
            return None
        return self._line(text or "", thinking)

    def waiting(self) -> dict[str, Any]:
        """A line that says nothing yet, while the server loads (Ollama's clients take an empty chunk as a live
        stream; they have no comment lines)."""
        return self._line("")

    def end(self) -> list[dict[str, Any]]:
        """The last lines: gathered tool calls, then the done line with the counts."""
        lines = []
        if self.calls:
            lines.append(self._line("", calls=tool_calls([self.calls[i] for i in sorted(self.calls)])))
        done = self._line("", done=True) | {"done_reason": done_reason(self.finish)}
        return [*lines, done | durations(self.last, self.started)]


# -- the ASGI side ---------------------------------------------------------------------------------------------
async def send_json(send: Send, status: int, data: Any) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Capture:
    """The `send` the proxy answers into: a whole answer kept, or stream events handed on as they come (ON_EVENT),
    and the comment lines the gateway sends while the server loads (ON_COMMENT)."""

    def __init__(self, on_event: Callable[[dict[str, Any]], Any] | None = None,
                 on_comment: Callable[[], Any] | None = None) -> None:
        self.status = 0
        self.body = bytearray()
        self.on_event, self.on_comment = on_event, on_comment
        self._pending = b""

    def problem(self) -> Problem | None:
        """The error the proxy or the server answered (None: a success)."""
        if 0 < self.status < 400:
            return None
        return Problem(self.status or 502, upstream_message(self.status, bytes(self.body)))

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            return
        chunk = message.get("body", b"")
        if self.on_event is None or self.status >= 400:
            self.body += chunk
            return
        self._pending += chunk
        while b"\n\n" in self._pending:
            block, self._pending = self._pending.split(b"\n\n", 1)
            if block.startswith(b":") and self.on_comment is not None:
                await self.on_comment()
            for line in block.split(b"\n"):
                if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                    try:
                        event = json.loads(line[6:])
                    except ValueError:
                        continue
                    await self.on_event(event)


class Ollama:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.handlers = {("GET", "/api/version"): self.version, ("HEAD", "/api/version"): self.version,
                         ("GET", "/api/tags"): self.tags, ("HEAD", "/api/tags"): self.tags,
                         ("POST", "/api/show"): self.show, ("GET", "/api/ps"): self.ps,
                         ("POST", "/api/chat"): self.chat, ("POST", "/api/generate"): self.generate,
                         ("POST", "/api/embed"): self.embed, ("POST", "/api/embeddings"): self.embeddings}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path, method = scope["path"].rstrip("/"), scope["method"]
        try:
            handler = self.handlers.get((method, path))
            if handler is None:
                raise self._unknown(method, path)
            req = await self._body(scope, receive) if method == "POST" else {}
            await handler(scope, receive, send, req)
        except Problem as e:
            await send_json(send, e.status, {"error": str(e)})
        finally:
            slim = scope.get("state", {}).pop(SLIM, None)
            if slim is not None:
                slim.drop()

    def _unknown(self, method: str, path: str) -> Problem:
        name = path.removeprefix(PREFIX + "/").split("/")[0]
        if name in NOT_HERE:
            return Problem(501, f"{path} is not served by podllama's Ollama API: use {NOT_HERE[name]}")
        if any(r.path == path for r in ROUTES):
            return Problem(405, f"{method} is not allowed on {path}")
        return Problem(404, f"no endpoint {method} {path}: /api/ is Ollama's API here (GET /api/tags, POST "
                            f"/api/chat …); podllama's management API is under {ADMIN_PREFIX}/ "
                            f"(e.g. {ADMIN_PREFIX}{path.removeprefix(PREFIX)}); GET /help lists every endpoint")

    async def _body(self, scope: dict[str, Any], receive: Receive) -> dict[str, Any]:
        refusal = bodies.refused_by_head(scope["headers"], self.gw.proxy.max_body)
        if refusal is not None:
            raise Problem(*refusal)
        try:
            spool = await bodies.receive_whole(receive, self.gw.proxy.max_body)
        except UpstreamError as e:
            raise Problem(e.status, str(e)) from None
        try:
            if spool.in_memory:
                data = jsonbody.loads(spool.data() or b"{}")
            else:  # parsed in the worker process; its long strings (images) stay in a file (jsonbody.Slim)
                slim = await jsonbody.offload(jsonbody.slim_file, spool.path)
                scope.setdefault("state", {})[SLIM] = slim
                data = slim.value
        except jsonbody.JsonProblem as e:
            raise Problem(e.status, str(e)) from None
        finally:
            spool.close()
        if not isinstance(data, dict):
            raise Problem(400, "the body must be a JSON object")
        return data

    # -- models ----------------------------------------------------------------------------------------------
    def _servers(self, scope: dict[str, Any]) -> dict[str, Any]:
        """The servers an Ollama client can use, that this caller may use: model id → server name."""
        return {s.alias or name: name for name, s in self.gw.usable(caller_of(scope)).items() if s.role in ROLES}

    def _server(self, scope: dict[str, Any], model: Any) -> tuple[str, str]:
        """(model id, server) for the model an Ollama request names ('NAME' or 'NAME:latest')."""
        if not isinstance(model, str) or not model:
            raise Problem(400, "model is required")
        reg = self.gw.registry
        server = reg.server_for_model(model) or reg.server_for_model(model.removesuffix(":latest"))
        if server is None:
            raise Problem(404, f"model '{model}' not found; GET /api/tags lists them")
        section = reg.servers[server]
        if why := caller_of(scope).refusal(server, section):
            raise Problem(403, why)
        return section.alias or server, server

    def _details(self, server: str) -> tuple[dict[str, Any], Metadata | None]:
        meta = self.gw.stack.model_metadata(server)
        v = meta.values if meta is not None else {}
        arch = meta.architecture if meta is not None else None
        return {"parent_model": "", "format": "gguf", "family": arch or "", "families": [arch] if arch else None,
                "parameter_size": str(v.get("general.size_label") or ""),
                "quantization_level": quantization(v.get("general.file_type"))}, meta

    def _entry(self, model: str, server: str) -> dict[str, Any]:
        details, meta = self._details(server)
        path = self.gw.registry.servers[server].origin
        size = meta.size if meta is not None else 0
        return {"name": model, "model": model, "modified_at": now(), "size": size,
                "digest": hashlib.sha256(f"{server}\0{path}\0{size}".encode()).hexdigest(), "details": details}

    async def version(self, scope: dict[str, Any], receive: Receive, send: Send, req: dict[str, Any]) -> None:
        await send_json(send, 200, {"version": VERSION})

    async def tags(self, scope: dict[str, Any], receive: Receive, send: Send, req: dict[str, Any]) -> None:
        servers = self._servers(scope)
        models = await asyncio.to_thread(lambda: [self._entry(m, s) for m, s in servers.items()])
        await send_json(send, 200, {"models": models})

    async def ps(self, scope: dict[str, Any], receive: Receive, send: Send, req: dict[str, Any]) -> None:
        running = {m: s for m, s in self._servers(scope).items() if self.gw.model_state(s) == "loaded"}
        entries = await asyncio.to_thread(lambda: [self._entry(m, s) for m, s in running.items()])
        never = "2318-01-01T00:00:00Z"  # servers that run until stopped; Ollama's "kept forever"
        await send_json(send, 200, {"models": [e | {"expires_at": never, "size_vram": 0} for e in entries]})

    async def show(self, scope: dict[str, Any], receive: Receive, send: Send, req: dict[str, Any]) -> None:
        model, server = self._server(scope, req.get("model") or req.get("name"))
        section = self.gw.registry.servers[server]
        details, meta = await asyncio.to_thread(self._details, server)
        info = {k: v for k, v in (meta.values if meta is not None else {}).items()
                if not k.startswith("tokenizer.") and isinstance(v, (str, int, float, bool))}
        caps = {"embedding": ["embedding"], "infill": ["completion", "insert"],
                "vision": ["completion", "vision"], "audio": ["completion", "audio"]}.get(section.role, ["completion"])
        template = meta.chat_template if meta is not None else None
        if template and "tools" in template and "embedding" not in caps:
            caps = [*caps, "tools"]
        await send_json(send, 200, {
            "modelfile": f"# served by podllama: [servers.{server}]\nFROM {section.origin}\n",
            "parameters": " ".join(section.args), "template": template or "", "details": details,
            "model_info": info, "capabilities": caps, "modified_at": now()})

    # -- inference -------------------------------------------------------------------------------------------
    async def chat(self, scope: dict[str, Any], receive: Receive, send: Send, req: dict[str, Any]) -> None:
        model, server = self._server(scope, req.get("model"))
        if not req.get("messages"):
            return await self._load_only(scope, send, model, server, req, generate=False)
        stream = req.get("stream", True) is not False
        await self._infer(scope, receive, send, "/v1/chat/completions", chat_body(req, model, stream),
                          Translation(model, False, time.monotonic()), stream)

    async def generate(self, scope: dict[str, Any], receive: Receive, send: Send, req: dict[str, Any]) -> None:
        model, server = self._server(scope, req.get("model"))
        if not req.get("prompt") and not req.get("images"):
            return await self._load_only(scope, send, model, server, req, generate=True)
        stream = req.get("stream", True) is not False
        path, body = generate_body(req, model, stream)
        await self._infer(scope, receive, send, path, body, Translation(model, True, time.monotonic()), stream)

    async def embed(self, scope: dict[str, Any], receive: Receive, send: Send, req: dict[str, Any]) -> None:
        started = time.monotonic()
        model, _ = self._server(scope, req.get("model"))
        body = {"model": model, "input": embed_inputs(req, legacy=False), "encoding_format": "float"}
        data = await self._whole(scope, receive, "/v1/embeddings", body)
        usage = data.get("usage") or {}
        await send_json(send, 200, {
            "model": model, "embeddings": vectors(data),
            "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": int(usage.get("prompt_tokens", 0))})

    async def embeddings(self, scope: dict[str, Any], receive: Receive, send: Send, req: dict[str, Any]) -> None:
        model, _ = self._server(scope, req.get("model"))
        body = {"model": model, "input": embed_inputs(req, legacy=True), "encoding_format": "float"}
        data = await self._whole(scope, receive, "/v1/embeddings", body)
        await send_json(send, 200, {"embedding": vectors(data)[0]})

    async def _load_only(self, scope: dict[str, Any], send: Send, model: str, server: str, req: dict[str, Any],
                         generate: bool) -> None:
        """An empty prompt loads the model (keep_alive 0: unloads it), as Ollama does: within the key's limits."""
        unload = req.get("keep_alive") in (0, "0", "0s")
        caller = caller_of(scope)
        if self.gw.loader.manages(server):
            try:
                await (self.gw.unload(server, caller) if unload else self.gw.load(server, caller))
            except StarletteHTTPException as e:
                raise Problem(e.status_code, str(e.detail)) from None
        else:
            try:
                with self.gw.proxy.limited(caller):
                    pass  # counted as a request, as Ollama's load is one
            except OverLimit as e:
                raise Problem(429, str(e)) from None
        line = Translation(model, generate, time.monotonic())._line("", done=True)
        await send_json(send, 200, line | {"done_reason": "unload" if unload else "load"})

    def _inner(self, scope: dict[str, Any], path: str, length: int) -> dict[str, Any]:
        keep = [(k, v) for k, v in scope["headers"]
                if k not in (b"content-length", b"content-type", b"transfer-encoding", b"accept-encoding")]
        return dict(scope, path=path, raw_path=path.encode(), query_string=b"", method="POST",
                    headers=[*keep, (b"content-type", b"application/json"),
                             (b"content-length", str(length).encode())])

    async def _call(self, scope: dict[str, Any], receive: Receive, path: str, body: dict[str, Any],
                    capture: Capture) -> None:
        """BODY to llama-server's PATH through the proxy (routing, limits, the log); the answer into CAPTURE."""
        data = json.dumps(body).encode()
        ep = self.gw.table.match("POST", path)
        assert ep is not None
        slim: jsonbody.Slim | None = scope.get("state", {}).get(SLIM)
        if slim is None:
            # the body, then the client's own receive: its disconnect ends the upstream request
            return await self.gw.proxy.endpoint(self._inner(scope, path, len(data)), bodies.replay(data, receive),
                                                capture, ep)
        length, pieces = slim.splice(data)  # the long strings back, from their file, a piece at a time
        await self.gw.proxy.endpoint(self._inner(scope, path, length), bodies.replay_pieces(pieces, receive),
                                     capture, ep)

    async def _whole(self, scope: dict[str, Any], receive: Receive, path: str, body: dict[str, Any]) -> dict[str, Any]:
        capture = Capture()
        await self._call(scope, receive, path, body, capture)
        if problem := capture.problem():
            raise problem
        try:
            data = json.loads(capture.body)
        except ValueError:
            raise Problem(502, "the server's answer was not JSON") from None
        return data if isinstance(data, dict) else {}

    async def _infer(self, scope: dict[str, Any], receive: Receive, send: Send, path: str, body: dict[str, Any],
                     t: Translation, stream: bool) -> None:
        if not stream:
            return await send_json(send, 200, t.whole(await self._whole(scope, receive, path, body)))
        started = failed = False

        async def line(data: dict[str, Any]) -> None:
            nonlocal started
            if not started:
                started = True
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache")]})
            await send({"type": "http.response.body", "body": json.dumps(data).encode() + b"\n", "more_body": True})

        async def on_event(event: dict[str, Any]) -> None:
            nonlocal failed
            if "error" in event:  # broke off mid-stream, or refused after the wait: Ollama's way of saying so
                failed = True
                await line({"error": upstream_message(500, json.dumps(event).encode())})
                return
            if (out := t.event(event)) is not None:
                await line(out)

        async def on_comment() -> None:
            await line(t.waiting())

        capture = Capture(on_event, on_comment)
        await self._call(scope, receive, path, body, capture)
        if problem := capture.problem():
            if not started:
                raise problem
            await line({"error": str(problem)})
        elif not failed:
            for out in t.end():
                await line(out)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
              18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
              25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
              32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4"}


def quantization(file_type: Any) -> str:
    """GGUF's general.file_type (llama.cpp's LLAMA_FTYPE) as the name Ollama shows."""
    return FILE_TYPES.get(file_type, "") if isinstance(file_type, int) else ""


__all__ = ["ROUTES", "Ollama", "Problem", "Translation"]
