"""A container engine inside the test process, for the fast tier (the supervisor and the on-demand loader
without Podman). It stands at podllama's engine boundary: the Stack, the Supervisor and the gateway call it
exactly as they call Podman. Each "container" it runs is an HTTP server on a loopback address of its own
(127.x.y.z, port 8080, as a server container's address on the stack's network) that speaks the part of
llama-server's protocol podllama relies on: /health (503 while loading, then 200), chat and completion
answers (streamed as server-sent events when asked), /slots with save and restore, and the API key.

What a server's next container does is scripted per server (`Script`): how long it loads, whether it exits
while loading, how much memory it holds. A running container can be crashed, wedged (it runs, /health answers
an error) or removed behind podllama's back. The engine records every call, and the most on-demand servers
that ever ran at once.
"""

from __future__ import annotations

import builtins
import hashlib
import http.server
import itertools
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from podllama.config.kinds import KINDS
from podllama.engine import CliEngine, ContainerInfo, ContainerSpec, EngineError

# the llama-server flags the tests' configs use, as its --help prints them
HELP = """----- common params -----
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
-np,   --parallel N                     number of server slots (default: -1, -1 = auto)
-m,    --model FNAME                    model path to load
--metrics                               enable prometheus compatible metrics endpoint (default: disabled)
--slot-save-path PATH                   path to save slot kv cache (default: disabled)
--spec-draft-model, -md, --model-draft FNAME
                                        draft model for speculative decoding (default: unused)
--spec-draft-n-max N                    number of tokens to draft for speculative decoding (default: 3)
--spec-draft-ngl, -ngld, --gpu-layers-draft, --n-gpu-layers-draft N
                                        max. number of draft model layers to store in VRAM
--spec-type none,draft-simple,draft-eagle3,draft-mtp,ngram-simple,ngram-mod
                                        comma-separated list of types of speculative decoding to use (default:
                                        none)
--spec-ngram-mod-n-match N              ngram-mod lookup length (default: 24)
"""
MiB = 2**20
_addresses = itertools.count(2)


@dataclass
class Script:
    """What the next container of a server does."""

    load_seconds: float = 0.0  # /health answers 503 this long after a start
    exit_while_loading: int | None = None  # exits with this code before it ever answers 200
    memory: int | None = None  # resident memory, as engine.memory() reports it (None: 100 MiB)
    gpu_memory: int | None = None  # what the GPU's driver says the process holds (None: it says nothing)
    tokens_per_second: float = 200.0  # how fast a streamed answer comes
    context: int | None = None  # the context per slot it reports, as llama-server's --fit chose it (else its args')
    logs: list[str] = field(default_factory=lambda: ["main: model loaded", "main: server is listening"])
    # a build that answers differently (the update's conformance check): "embeddings" moves every vector,
    # "rerank" reverses the order, "tools" answers with text instead of a tool call, "json" with text that is
    # not JSON, "stream" ends a stream without [DONE], "text" answers other words
    regression: str | None = None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, container: FakeContainer) -> None:
        self.container = container
        self.sockets: set[socket.socket] = set()
        super().__init__((container.ip, 8080), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.sockets.add(request)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away (the gateway's pooled connections, a closed container)

    def close_all(self) -> None:
        """As a process that dies: the listening socket and every open connection closed."""
        self.shutdown()
        self.server_close()
        for s in list(self.sockets):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        c = self.server.container
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        path, _, query = self.path.partition("?")
        c.requests.append((self.command, self.path))
        if path == "/health":
            if c.health is not None:
                return self._send(c.health, {"error": {"code": c.health, "message": "broken"}})
            if c.loaded():
                return self._send(200, {"status": "ok"})
            return self._send(503, {"error": {"code": 503, "message": "Loading model"}})
        if self.headers.get("authorization") != f"Bearer {c.engine.server_key}":
            return self._send(401, {"error": {"code": 401, "message": "Invalid API Key"}})
        if not c.loaded():
            return self._send(503, {"error": {"code": 503, "message": "Loading model"}})
        if path == "/props":  # as llama-server: the context a slot holds, and how many slots
            args = c.spec.args
            n_ctx = int(args[args.index("--ctx-size") + 1]) if "--ctx-size" in args else 4096
            slots = int(args[args.index("--parallel") + 1]) if "--parallel" in args else -1
            per_slot = n_ctx if slots < 0 else n_ctx // slots  # no --parallel: 4 slots sharing one pool
            per_slot = c.script.context or per_slot
            return self._send(200, {"default_generation_settings": {"n_ctx": per_slot},
                                    "total_slots": slots if slots > 0 else 4})
        if path == "/slots" and self.command == "GET":
            return self._send(200, [{"id": i, "n_prompt_tokens": n} for i, n in enumerate(c.slots)])
        if path.startswith("/slots/"):
            slot, action = int(path.rsplit("/", 1)[1]), query.removeprefix("action=")
            where = next((m.source for m in c.spec.mounts if m.target == "/slots" and not m.read_only), None)
            if where is None or "/" in body.get("filename", "/"):
                return self._send(400, {"error": {"code": 400, "message": "slot save path not set, or bad name"}})
            file = Path(where) / body["filename"]
            if action == "save":  # the file holds the slot's token count, standing for its KV cache
                file.write_text(str(c.slots[slot]))
                return self._send(200, {"id_slot": slot, "n_saved": c.slots[slot]})
            if action == "restore" and file.is_file():
                c.slots[slot] = int(file.read_text())
                return self._send(200, {"id_slot": slot, "n_restored": c.slots[slot]})
            return self._send(400, {"error": {"code": 400, "message": "slot file not found"}})
        n = int(body.get("max_tokens") or body.get("n_predict") or 4)
        c.slots[0] = len(json.dumps(body))  # "prompt tokens" held in the first slot
        regression = c.script.regression
        if path.endswith("/embeddings"):  # a vector per input that follows its text (moved by a regression)
            texts = body.get("input") if isinstance(body.get("input"), list) else [body.get("input", "")]
            vectors = [[b / 255 - (0.5 if regression == "embeddings" and i % 2 else 0)
                        for i, b in enumerate(hashlib.sha256(str(t).encode()).digest()[:8])] for t in texts]
            return self._send(200, {"object": "list", "data": [{"index": i, "embedding": v}
                                                               for i, v in enumerate(vectors)]})
        if path.endswith("/rerank"):  # the longer document ranks higher (the shorter, after a regression)
            docs = body.get("documents", [])
            sign = -1 if regression == "rerank" else 1
            return self._send(200, {"results": [{"index": i, "relevance_score": sign * len(d)}
                                                for i, d in enumerate(docs)]})
        content = ("other words " if regression == "text" else "hi ") * n
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if body.get("tools") and regression != "tools":
            name = body["tools"][0]["function"]["name"]
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": name, "arguments": '{"city": "Paris"}'}}]}
        elif body.get("response_format"):
            message["content"] = "{answer: yes" if regression == "json" else '{"answer": "yes"}'
        timings = {"predicted_n": n, "predicted_per_second": c.script.tokens_per_second}
        if not body.get("stream"):
            return self._send(200, {"object": "chat.completion", "model": c.spec.labels.get("podllama.server"),
                                    "choices": [{"index": 0, "message": message}], "timings": timings,
                                    "usage": {"prompt_tokens": 5, "completion_tokens": n}})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        events = [{"content": "hi", "index": i, "stop": i == n - 1} for i in range(n)]
        if path.endswith("/chat/completions"):  # OpenAI's chunks, ended by [DONE] (not after a regression)
            events = [{"choices": [{"index": 0, "delta": {"content": "hi "}}]} for _ in range(n)]
            events[-1]["timings"] = timings
        for i, e in enumerate(events + (["[DONE]"] if path.endswith("/chat/completions") and regression != "stream"
                                         else [])):
            event = f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            if i < n:
                time.sleep(1 / c.script.tokens_per_second)
        self.wfile.write(b"0\r\n\r\n")


class FakeContainer:
    def __init__(self, engine: FakeEngine, spec: ContainerSpec, script: Script) -> None:
        self.engine, self.spec, self.script = engine, spec, script
        self.id = os.urandom(16).hex()
        n = next(_addresses)
        self.ip = f"127.{(os.getpid() % 200) + 20}.{n // 250}.{n % 250 + 2}"
        self.state = "created"
        self.exit_code: int | None = None
        self.started_at: str | None = None
        self.finished_at: str | None = None
        self.started = 0.0
        self.health: int | None = None  # /health answers this status, whatever else
        self.log = list(script.logs)
        self.slots = [0, 0]
        self.requests: list[tuple[str, str]] = []
        self._server: _Server | None = None
        self._timer: threading.Timer | None = None

    def loaded(self) -> bool:
        return time.monotonic() - self.started >= self.script.load_seconds

    def start(self) -> None:
        if self.state == "running":
            return
        self.state, self.exit_code, self.health = "running", None, None
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC).isoformat()
        self._server = _Server(self)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        if self.script.exit_while_loading is not None:
            self._timer = threading.Timer(min(0.2, self.script.load_seconds / 2), self.exit,
                                          (self.script.exit_while_loading,))
            self._timer.start()

    def exit(self, code: int) -> None:
        if self.state != "running":
            return
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close_all()
            self._server = None
        self.state, self.exit_code = "exited", code
        self.finished_at = datetime.now(UTC).isoformat()

    def info(self) -> ContainerInfo:
        return ContainerInfo(id=self.id, name=self.spec.name, image=self.spec.image, image_id=self.engine.IMAGE_ID,
                             state=self.state, exit_code=self.exit_code, started_at=self.started_at,
                             finished_at=self.finished_at, labels=dict(self.spec.labels),
                             ip=self.ip if self.state == "running" else None, ports={}, pid=None)


class FakeEngine(CliEngine):
    name = "fake"
    # an image's id follows its content: here, the --help it carries (podllama caches flags by image id)
    IMAGE_ID = "sha256:" + hashlib.sha256(HELP.encode()).hexdigest()

    def __init__(self, server_key: str = "") -> None:
        super().__init__()
        self.server_key = server_key
        self.containers: dict[str, FakeContainer] = {}
        self.scripts: dict[str, Script] = {}  # server name → what its next container does
        self.calls: list[tuple[str, str]] = []
        self.down: str | None = None  # the engine's API gone: every call fails with this
        self.on_demand: set[str] = set()  # the servers most_on_demand counts (the test says which)
        self.most_on_demand = 0  # the most of them that ever ran at once
        self.tags: dict[str, str] = {}  # image references that point elsewhere than IMAGE_ID (a new build)
        self._lock = threading.Lock()

    # -- the engine's side --------------------------------------------------------------------------------
    def _call(self, what: str, name: str = "") -> None:
        if self.down:
            raise EngineError(self.down)
        self.calls.append((what, name))

    def _get(self, name: str) -> FakeContainer:
        c = self.containers.get(name)
        if c is None:
            raise EngineError(f"no container with name or ID \"{name}\" found: no such container")
        return c

    def available(self) -> bool:
        return self.down is None

    def image_id(self, ref: str) -> str | None:
        self._call("image_id", ref)
        return self.tags.get(ref, ref if ref.startswith("sha256:") else self.IMAGE_ID)

    def tag(self, image: str, ref: str) -> None:
        self.tags[ref] = self.image_id(image) or image

    def untag(self, ref: str) -> None:
        self.tags.pop(ref, None)

    def image_exists(self, ref: str) -> bool:
        return True

    def image_labels(self, ref: str) -> dict[str, str]:
        return {"podllama.llama-commit": "0" * 40}

    def run_once(self, spec: ContainerSpec, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if spec.args == [KINDS["llama"].help_file]:
            return subprocess.CompletedProcess([], 0, HELP, "")
        return subprocess.CompletedProcess([], 1, "", "not scripted")

    def run(self, spec: ContainerSpec) -> str:
        self._call("run", spec.name)
        with self._lock:
            if spec.name in self.containers:
                raise EngineError(f"the container name \"{spec.name}\" is already in use")
            server = spec.labels.get("podllama.server", "")
            # a script for the server on this image (a candidate build) first, then the server's own
            script = self.scripts.get(f"{server}@{spec.image}") or self.scripts.get(server, Script())
            c = FakeContainer(self, spec, script)
            self.containers[spec.name] = c
        self._start(c)
        return c.id

    def _start(self, c: FakeContainer) -> None:
        c.start()
        with self._lock:
            on_demand = [x for x in self.containers.values() if x.state == "running"
                         and x.spec.labels.get("podllama.server", "") in self.on_demand]
            self.most_on_demand = max(self.most_on_demand, len(on_demand))

    def start(self, name: str) -> None:
        self._call("start", name)
        self._start(self._get(name))

    def stop(self, name: str, timeout: int = 10) -> None:
        self._call("stop", name)
        self._get(name).exit(0)

    def kill(self, name: str, signal: str = "KILL") -> None:
        self._call("kill", name)
        self._get(name).exit(137)

    def remove(self, name: str, force: bool = True) -> None:
        self._call("remove", name)
        c = self.containers.pop(name, None)
        if c is not None:
            c.exit(137)

    def inspect(self, name: str) -> ContainerInfo | None:
        self._call("inspect", name)
        c = self.containers.get(name)
        return c.info() if c else None

    def list(self, labels: dict[str, str]) -> builtins.list[ContainerInfo]:
        self._call("list")
        return [c.info() for c in list(self.containers.values())
                if all(c.spec.labels.get(k) == v for k, v in labels.items())]

    def logs(self, name: str, tail: int | None = None, follow: bool = False) -> Iterator[str]:
        c = self._get(name)
        lines = c.log[-tail:] if tail else c.log
        return iter(line + "\n" for line in lines)

    def memory(self, name: str) -> int | None:
        c = self.containers.get(name)
        return (c.script.memory or 100 * MiB) if c is not None and c.state == "running" else None

    def gpu_memory(self, name: str, backend: str) -> int | None:
        c = self.containers.get(name)
        return c.script.gpu_memory if c is not None and c.state == "running" else None

    def exec(self, name: str, argv: builtins.list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 7, "000", "")  # curl: no answer (the address was probed first)

    def network_exists(self, name: str) -> bool:
        return True

    def create_network(self, name: str, labels: dict[str, str], internal: bool = False) -> None:
        pass

    def remove_network(self, name: str) -> None:
        pass

    # -- what a test does to it ---------------------------------------------------------------------------
    def crash(self, name: str, code: int = 139) -> None:
        self._get(name).exit(code)

    def break_health(self, name: str, status: int = 500) -> None:
        """The process runs and listens, and /health answers STATUS from now on (as a wedged server)."""
        self._get(name).health = status

    def running(self, label: str = "podllama.server") -> set[str]:
        return {c.spec.labels.get(label, "") for c in self.containers.values() if c.state == "running"}

    def close(self) -> None:
        for c in list(self.containers.values()):
            c.exit(0)
