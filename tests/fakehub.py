"""A local stand-in for the Hugging Face hub (which these machines cannot reach): it serves repos built by the
tests through the hub's real HTTP API — model info with file metadata (sizes, sha256), `resolve` downloads with
ETag / X-Repo-Commit / X-Linked-Size headers and Range requests, and the error codes huggingface_hub turns into
its exceptions. Faults can be switched on per file: a connection that drops midway, bytes that are damaged."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    gated_token: str | None = None  # a token the repo needs
    listed: list[str] = field(default_factory=list)  # extra names listed (hostile ones) without content


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.drop_after: dict[str, int] = {}  # path → bytes sent before the connection drops (once)
        self.always_drop: dict[str, int] = {}  # path → bytes sent before the connection drops, every time
        self.corrupt: set[str] = set()  # paths served with damaged bytes
        self.slow: dict[str, float] = {}  # path → seconds to wait between 64 KiB pieces
        self.halfway: dict[str, Callable[[], object]] = {}  # path → what happens once half of it was sent
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, range header)
        self.server: http.server.ThreadingHTTPServer | None = None

    def add(self, repo: str, files: dict[str, bytes], gated_token: str | None = None, listed: list[str] = ()) -> str:
        commit = hashlib.sha1((repo + "".join(sorted(files))).encode()).hexdigest()
        self.repos[repo] = Repo(files, commit, gated_token, list(listed))
        return commit

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _error(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _repo(self, name: str) -> Repo | None:
                repo = hub.repos.get(name)
                if repo is None:
                    self._error(401, "RepoNotFound", "Repository Not Found")
                    return None
                if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
                    self._error(401, "GatedRepo", "Access to this repo is restricted. You must have access to it and be "
                                "authenticated.")
                    return None
                return repo

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head: bool = False):
                path = unquote(urlparse(self.path).path)
                hub.log.append(("HEAD" if head else "GET", path, self.headers.get("Range")))
                m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$", path)
                if m:
                    return self._info(m.group(1), m.group(2))
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if m:
                    return self._file(m.group(1), m.group(2), m.group(3), head)
                self._error(404, "EntryNotFound", "not found")

            def _info(self, name: str, revision: str | None) -> None:
                repo = self._repo(name)
                if repo is None:
                    return
                if revision not in (None, "main", repo.commit):
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                siblings = []
                for fname, data in repo.files.items():
                    sha = hashlib.sha256(data).hexdigest()
                    siblings.append({"rfilename": fname, "size": len(data), "blobId": hashlib.sha1(data).hexdigest(),
                                     "lfs": {"size": len(data), "sha256": sha, "pointerSize": 130}})
                for fname in repo.listed:
                    siblings.append({"rfilename": fname, "size": 10, "blobId": "0" * 40,
                                     "lfs": {"size": 10, "sha256": "0" * 64, "pointerSize": 130}})
                body = json.dumps({"id": name, "modelId": name, "sha": repo.commit, "private": False,
                                   "gated": bool(repo.gated_token), "siblings": siblings}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, name: str, revision: str, fname: str, head: bool) -> None:
                repo = self._repo(name)
                if repo is None:
                    return
                if fname not in repo.files:
                    return self._error(404, "EntryNotFound", f"{fname} does not exist")
                data = repo.files[fname]
                sha = hashlib.sha256(data).hexdigest()
                if fname in hub.corrupt:
                    data = bytes(b ^ 0xFF if i % 4096 == 7 else b for i, b in enumerate(data))
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                self.send_response(206 if rng else 200)
                for k, v in (("ETag", f'"{sha}"'), ("X-Linked-Etag", f'"{sha}"'), ("X-Repo-Commit", repo.commit),
                             ("X-Linked-Size", str(len(data))), ("Accept-Ranges", "bytes"),
                             ("Content-Length", str(len(body))), ("Content-Type", "application/octet-stream")):
                    self.send_header(k, v)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                cut = hub.drop_after.pop(fname, None) or hub.always_drop.get(fname)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops midway
                    self.close_connection = True
                    return
                meanwhile = hub.halfway.get(fname)
                if meanwhile is not None:  # something happens to the client's machine midway (its disk fills up)
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    time.sleep(0.2)
                    meanwhile()
                    body = body[len(body) // 2:]
                delay = hub.slow.get(fname)
                if delay:
                    for i in range(0, len(body), 65536):
                        self.wfile.write(body[i:i + 65536])
                        self.wfile.flush()
                        time.sleep(delay)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
