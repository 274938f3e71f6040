"""The model store: one directory, mounted read-only at /models in every server.

Layout:
    <store>/<org>/<repo>/<file>.gguf     downloaded from Hugging Face (`podllama pull`)
    <store>/<name>.gguf                  placed by hand or `podllama models import`
    <store>/.manifests/<id>.json         one manifest per model: source, revision, files, sizes, sha256
    <store>/.partial/…                   downloads in progress (resumed from here; never used by a server)

A file only ever appears under its real name complete and checked. Every name — from the user or from the
hub — is confined to the store: no absolute paths, no '..', no NUL or control characters, no hidden
top-level names, no symlinks that lead out.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..atomic import atomic_write, commit_file

MANIFESTS, PARTIAL = ".manifests", ".partial"
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class StoreError(Exception):
    pass


class ModelNotFound(StoreError):
    def __init__(self, model_id: str) -> None:
        super().__init__(f"no model '{model_id}' in the store; `podllama models list` shows them")


def safe_name(name: str) -> PurePosixPath:
    """NAME as a relative path inside the store, or StoreError saying why it cannot be one."""
    if not name or _BAD_CHARS.search(name):
        raise StoreError(f"{name!r} is not a usable file name (empty, control characters, NUL or backslashes)")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", ".", "") for part in name.split("/")):
        raise StoreError(f"{name!r} leaves the model store (absolute path or '..'); names are relative to it")
    if p.parts[0].startswith("."):
        raise StoreError(f"{name!r} starts with a hidden directory; those belong to podllama")
    return p


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class StoredFile:
    path: str  # relative to the store
    size: int
    sha256: str
    kind: str = "model"  # model | shard | mmproj | companion (a piper voice's .onnx.json)


@dataclass
class Manifest:
    id: str  # org/repo:TAG, org/repo/file.gguf, or local/NAME
    source: str  # hf | import
    files: list[StoredFile]
    repo: str | None = None
    revision: str | None = None  # the commit the download resolved to
    tag: str | None = None
    origin: str | None = None  # hub endpoint, or the imported file's path
    created: float = field(default_factory=time.time)

    @property
    def model(self) -> str:
        return next(f.path for f in self.files if f.kind == "model")

    @property
    def mmproj(self) -> str | None:
        return next((f.path for f in self.files if f.kind == "mmproj"), None)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"model": self.model, "mmproj": self.mmproj, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        known = {k: d[k] for k in ("id", "source", "repo", "revision", "tag", "origin", "created") if k in d}
        return cls(files=[StoredFile(**f) for f in d["files"]], **known)


def manifest_file_name(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", model_id.replace("/", "--").replace(":", "@")) + ".json"


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- paths --------------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """The absolute path of NAME, checked to stay inside the store: no directory on the way is a symbolic
        link (a file written through one would land outside), and the file itself is no link leading out."""
        rel = safe_name(name)
        p = self.root / rel
        here = self.root
        for part in rel.parts[:-1]:
            here = here / part
            if here.is_symlink():
                raise StoreError(f"{name!r}: {here} is a symbolic link; directories in the model store cannot be "
                                 "links (a file written through it would land outside the store); remove the link")
        if p.exists() and not p.resolve().is_relative_to(self.root.resolve()):
            raise StoreError(f"{name!r} is a link that leads out of the model store ({p.resolve()}); remove it")
        return p

    def partial(self, name: str) -> Path:
        return self.root / PARTIAL / safe_name(name)

    # -- manifests ----------------------------------------------------------------------------------------
    def manifests(self) -> list[Manifest]:
        d = self.root / MANIFESTS
        out = []
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                out.append(Manifest.from_dict(json.loads(f.read_text())))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def manifest(self, model_id: str) -> Manifest | None:
        f = self.root / MANIFESTS / manifest_file_name(model_id)
        return Manifest.from_dict(json.loads(f.read_text())) if f.is_file() else None

    def save(self, m: Manifest) -> None:
        d = self.root / MANIFESTS
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / manifest_file_name(m.id), json.dumps(asdict(m), indent=2))

    def find(self, ref: str) -> Manifest | None:
        """A manifest by id ('org/repo:Q4_K_M', 'local/x'), or the one holding the file REF."""
        ref = ref.removeprefix("hf://")
        m = self.manifest(ref)
        if m is not None:
            return m
        for m in self.manifests():
            if any(f.path == ref for f in m.files):
                return m
        return None

    # -- putting files in ---------------------------------------------------------------------------------
    def commit(self, m: Manifest, staged: dict[str, Path]) -> Manifest:
        """Move checked files from staging to their real names, then write the manifest (last)."""
        for f in m.files:
            final = self.path(f.path)
            final.parent.mkdir(parents=True, exist_ok=True)
            if staged[f.path] != final:
                commit_file(staged[f.path], final)
        self.save(m)
        return m

    def import_file(self, source: Path, name: str | None = None) -> Manifest:
        """Copy a local GGUF into the store (checked, then renamed into place) and record it."""
        source = Path(source)
        if not source.is_file():
            raise StoreError(f"{source} is not a file")
        with source.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise StoreError(f"{source} is not a GGUF file (no GGUF magic at its start)")
        rel = name or source.name
        if not rel.endswith(".gguf"):
            rel += ".gguf"
        final = self.path(rel)
        staged = self.partial(rel + ".import")
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staged)
        m = Manifest(id=f"local/{rel.removesuffix('.gguf')}", source="import", origin=str(source.resolve()),
                     files=[StoredFile(rel, staged.stat().st_size, sha256_of(staged))])
        if final.exists():
            staged.unlink()
            raise StoreError(f"{rel} already exists in the store; pass another --name or remove it first")
        return self.commit(m, {rel: staged})

    # -- taking out, checking -----------------------------------------------------------------------------
    def remove(self, model_id: str) -> list[str]:
        m = self.manifest(model_id)
        if m is None:
            raise ModelNotFound(model_id)
        shared = {f.path for other in self.manifests() if other.id != m.id for f in other.files}
        removed = []
        for f in m.files:
            if f.path not in shared:
                self.path(f.path).unlink(missing_ok=True)
                removed.append(f.path)
        (self.root / MANIFESTS / manifest_file_name(m.id)).unlink()
        return removed

    def verify(self, model_id: str | None = None) -> dict[str, list[str]]:
        """Every byte of every file (or of one model) against its manifest: {model id: [problems]}."""
        targets = [self.manifest(model_id)] if model_id else self.manifests()
        if model_id and targets[0] is None:
            raise ModelNotFound(model_id)
        report = {}
        for m in targets:
            problems = []
            for f in m.files:  # type: ignore[union-attr]
                p = self.path(f.path)
                if not p.is_file():
                    problems.append(f"{f.path}: missing")
                elif p.stat().st_size != f.size:
                    problems.append(f"{f.path}: {p.stat().st_size} bytes, expected {f.size}")
                elif sha256_of(p) != f.sha256:
                    problems.append(f"{f.path}: sha256 differs from the manifest (the file changed or is damaged)")
            report[m.id] = problems  # type: ignore[union-attr]
        return report

    def usage(self) -> dict[str, Any]:
        total = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) if self.root.exists() else 0
        partial = sum(p.stat().st_size for p in (self.root / PARTIAL).rglob("*") if p.is_file()) \
            if (self.root / PARTIAL).exists() else 0
        disk = shutil.disk_usage(self.root if self.root.exists() else self.root.parent)
        return {"path": str(self.root), "bytes": total, "partial_bytes": partial, "models": len(self.manifests()),
                "disk_free_bytes": disk.free, "disk_total_bytes": disk.total}

    def unmanaged(self) -> list[str]:
        """GGUF files in the store that no manifest knows (placed by hand)."""
        known = {f.path for m in self.manifests() for f in m.files}
        out = []
        for p in sorted(self.root.rglob("*.gguf")) if self.root.exists() else []:
            rel = p.relative_to(self.root).as_posix()
            if not rel.startswith((MANIFESTS, PARTIAL)) and rel not in known:
                out.append(rel)
        return out
