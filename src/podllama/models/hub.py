"""Hugging Face downloads into the model store.

A reference names a model the way llama.cpp's `-hf` does: `org/repo:QUANT` (the GGUF whose name carries the
quant tag; default Q4_K_M, then Q8_0, then the first GGUF), `org/repo/path/file.gguf`, or `org/repo`. All
shards of a split GGUF come along, and the multimodal projector (mmproj) of a vision or audio repo unless
told otherwise. The other server kinds' models are named by file (`org/repo/path/FILE`, see MODEL_FILES): a
whisper.cpp `.bin`, a stable-diffusion `.safetensors`, a piper `.onnx` voice (with the `.onnx.json` it needs).
`huggingface_hub` speaks the hub's API (endpoint, token, repo metadata, errors); the bytes
are fetched here, resumably, into the store's staging area, and a file takes its real name only after its
size and sha256 match what the hub says it is.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from .. import validate
from ..config import PROJECTOR_ROLES, ServerSection
from ..units import human
from ..validate import MODEL_FILES
from .store import Manifest, Store, StoredFile, StoreError, safe_name

DEFAULT_TAGS = ("Q4_K_M", "Q8_0")
# the files a reference may name besides GGUF, each with the companions that must come along (suffixes added)
NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.I)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.I)


class PullError(Exception):
    """A download that cannot be done; says why and what to do."""


class PullCancelled(PullError):
    pass


class HubUnreachable(PullError):
    """The hub did not answer at all (offline, no name resolution, refused)."""

    def __init__(self, where: str, cause: Exception) -> None:
        self.short = f"cannot reach {where} ({type(cause).__name__}: {cause})"
        super().__init__(f"{self.short}; offline? Models already in the store keep working; set HF_ENDPOINT for a "
                         "mirror")


@dataclass
class Ref:
    repo: str
    tag: str | None = None
    file: str | None = None

    @property
    def id(self) -> str:
        return f"{self.repo}/{self.file}" if self.file else f"{self.repo}:{(self.tag or 'default').upper()}"


def parse_ref(text: str) -> Ref:
    """'org/repo:Q4_K_M' | 'org/repo' | 'org/repo/dir/file.gguf' (an 'hf://' prefix is allowed)."""
    try:
        repo, tag, file = validate.hf_reference(text)
    except ValueError as e:
        raise PullError(str(e)) from None
    if file is not None:
        safe_name(file)
    return Ref(repo, tag, file)


# -- choosing files, as llama.cpp's -hf does ------------------------------------------------------------------
def split_info(path: str) -> tuple[str, str, int, int]:
    """(prefix, tag, index, count) of a GGUF path: model-Q4_K_M-00001-of-00003.gguf → (model-Q4_K_M, Q4_K_M, 1, 3)."""
    prefix = path.removesuffix(".gguf")
    index = count = 1
    m = _SPLIT.match(prefix)
    if m:
        prefix, index, count = m.group(1), int(m.group(2)), int(m.group(3))
    t = _TAG.search(prefix)
    return prefix, (t.group(1).upper() if t else ""), index, count


def quant_bits(path: str) -> int:
    digits = re.search(r"\d+", split_info(path)[1])
    return int(digits.group()) if digits else 0


def is_model(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return path.endswith(".gguf") and not any(k in name for k in NOT_MODELS)


def best_model(files: list[str], tag: str | None) -> str | None:
    for t in ([tag] if tag else list(DEFAULT_TAGS)):
        pattern = re.compile(re.escape(t) + r"[.-]", re.I)
        for f in files:
            if is_model(f) and pattern.search(f) and split_info(f)[2] == 1:
                return f
    if not tag:
        return next((f for f in files if is_model(f) and split_info(f)[2] == 1), None)
    return None


def shards_of(files: list[str], first: str) -> list[str]:
    prefix, _, _, count = split_info(first)
    if count <= 1:
        return [first]
    return sorted(f for f in files if split_info(f)[0] == prefix and split_info(f)[3] == count)


def best_mmproj(files: list[str], model: str) -> str | None:
    """The projector beside the model: deepest shared directory, then the closest quantization."""
    model_dir = model.split("/")[:-1]
    bits = quant_bits(model)
    best, best_key = None, None
    for f in files:
        if not f.endswith(".gguf") or "mmproj" not in f:
            continue
        sib_dir = f.split("/")[:-1]
        if sib_dir != model_dir[: len(sib_dir)]:
            continue
        key = (len(sib_dir), -abs(quant_bits(f) - bits))
        if best_key is None or key > best_key:
            best, best_key = f, key
    return best


def select(files: list[str], ref: Ref, mmproj: bool = True) -> tuple[list[str], str | None]:
    """(model files — the first shard first —, mmproj) for REF among the repo's FILES."""
    if ref.file:
        if ref.file not in files:
            raise PullError(f"{ref.repo} has no file {ref.file}; its GGUF files: {', '.join(_ggufs(files)) or 'none'}")
        first = ref.file
        if not first.endswith(".gguf"):
            suffix = next(s for s in MODEL_FILES if first.endswith(s))
            missing = [first + c for c in MODEL_FILES[suffix] if first + c not in files]
            if missing:
                raise PullError(f"{ref.repo} has {first} but not {', '.join(missing)}, which it needs beside it")
            return [first] + [first + c for c in MODEL_FILES[suffix]], None
    else:
        best = best_model(files, ref.tag)
        if best is None:
            wanted = f"no GGUF with the quant tag {ref.tag}" if ref.tag else "no GGUF model file"
            raise PullError(f"{ref.repo} has {wanted}; its GGUF files: {', '.join(_ggufs(files)) or 'none'}")
        first = best
    return shards_of(files, first), (best_mmproj(files, first) if mmproj else None)


def _ggufs(files: list[str]) -> list[str]:
    return [f for f in files if f.endswith(".gguf")]


# -- talking to the hub -------------------------------------------------------------------------------------
def endpoint(configured: str | None = None) -> str:
    """The hub: [hub] endpoint, else $HF_ENDPOINT (mirrors), else huggingface.co."""
    return (configured or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def token(token_file: Path | None = None) -> str | None:
    """HF_TOKEN from the environment, else from the configured file. Never printed."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"].strip()
    if token_file and token_file.is_file():
        return token_file.read_text().strip() or None
    return None


def _explain(e: Exception, repo: str, revision: str | None, where: str) -> PullError:
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return PullError(f"{repo} is gated: accept its terms at {where}/{repo} and set HF_TOKEN (a read token) "
                         "in the environment or [hub] token_file")
    if isinstance(e, errors.RevisionNotFoundError):
        return PullError(f"{repo} has no revision '{revision}'")
    if isinstance(e, errors.RepositoryNotFoundError):
        return PullError(f"{repo} not found at {where} (a private repo needs HF_TOKEN); check the name")
    if isinstance(e, errors.HfHubHTTPError):
        return PullError(f"{where} answered: {e}")
    return HubUnreachable(where, e)


@dataclass
class Remote:
    path: str
    size: int | None
    sha256: str | None
    blob_id: str | None  # git object id (small files stored without LFS)
    kind: str


def pull(store: Store, text: str, revision: str | None = None, mmproj: bool = True, hf_token: str | None = None,
         hub: str | None = None, progress: Callable[[str, int, int], None] | None = None,
         cancel: threading.Event | None = None, say: Callable[[str], None] = lambda m: None,
         retry_delay: float | None = None) -> Manifest:
    """Download REF into STORE (resuming what an earlier attempt left) and record its manifest."""
    from huggingface_hub import HfApi

    ref = parse_ref(text)
    if revision is not None:
        try:
            validate.revision(revision)
        except ValueError as e:
            raise PullError(str(e)) from None
    base = endpoint(hub)
    api = HfApi(endpoint=base, token=hf_token or False)
    try:
        info = api.model_info(ref.repo, revision=revision, files_metadata=True)
    except Exception as e:  # every way the hub can fail, explained
        raise _explain(e, ref.repo, revision, base) from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    for name in siblings:  # names come from the network: the same rules as user input
        if name.endswith((*MODEL_FILES, ".json")):
            try:
                safe_name(name)
            except StoreError as e:
                raise PullError(f"{ref.repo} lists a file podllama will not write: {e}") from None
    files, projector = select(sorted(siblings), ref, mmproj)
    kinds = ["model"] + ["shard" if f.endswith(".gguf") else "companion" for f in files[1:]]
    remotes = [_remote(siblings[f], k) for f, k in zip(files, kinds, strict=True)]
    if projector:
        remotes.append(_remote(siblings[projector], "mmproj"))
    commit = info.sha or revision or "main"
    say(f"{ref.repo} at {commit[:12]}: {', '.join(r.path for r in remotes)}")
    prefix = ref.repo
    _check_space(store, [(f"{prefix}/{r.path}", r) for r in remotes])
    staged: dict[str, Path] = {}
    stored = []
    for r in remotes:
        rel = f"{prefix}/{r.path}"
        final = store.path(rel)
        if final.is_file() and r.sha256 and final.stat().st_size == r.size and _matches(final, r):
            staged[rel] = final  # already here, checked
        else:
            staged[rel] = _download(store, base, ref.repo, commit, r, rel, hf_token, progress, cancel, say,
                                    RETRY_DELAY if retry_delay is None else retry_delay)
        stored.append(StoredFile(rel, staged[rel].stat().st_size, _sha256(staged[rel]), r.kind))
    m = Manifest(id=ref.id if ref.file or ref.tag else f"{ref.repo}:{split_info(files[0])[1] or 'default'}",
                 source="hf", files=stored, repo=ref.repo, revision=commit, tag=ref.tag, origin=base)
    try:
        return store.commit(m, staged)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise PullError(f"the model store {store.root} is full ({e.strerror}); its files are in place but not "
                            "recorded yet: free some space and run the same pull again") from None
        raise


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _check_space(store: Store, files: list[tuple[str, Remote]]) -> None:
    """Refuse at once a pull the store's disk cannot hold (what is already staged or in place counts)."""
    need = 0
    for rel, r in files:
        final, part = store.path(rel), store.partial(rel)
        if r.size is None or (final.is_file() and final.stat().st_size == r.size):
            continue
        need += r.size - (part.stat().st_size if part.is_file() and part.stat().st_size <= r.size else 0)
    where = store.root if store.root.exists() else store.root.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise PullError(f"not enough space in the model store {store.root}: the download needs {human(need)} more, "
                        f"{human(free)} is free; free some space (`podllama models rm MODEL`) or move models_dir to a "
                        "larger disk")




def _remote(sibling: Any, kind: str) -> Remote:
    lfs = sibling.lfs
    return Remote(sibling.rfilename, (lfs.size if lfs else sibling.size), (lfs.sha256 if lfs else None),
                  sibling.blob_id, kind)


def _sha256(path: Path) -> str:
    from .store import sha256_of

    return sha256_of(path)


def _matches(path: Path, r: Remote) -> bool:
    if r.sha256:
        return _sha256(path) == r.sha256
    if r.blob_id:  # git's object id: sha1 of "blob <size>\0" + content
        h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest() == r.blob_id
    return True


RETRIES = 5  # attempts at one file before a pull gives up (each resumes where the last one stopped)
RETRY_DELAY = 1.0  # seconds before the second attempt, doubling, at most 16


def _download(store: Store, base: str, repo: str, commit: str, r: Remote, rel: str, hf_token: str | None,
              progress: Callable[[str, int, int], None] | None, cancel: threading.Event | None,
              say: Callable[[str], None] = lambda m: None, retry_delay: float = RETRY_DELAY) -> Path:
    """One file into staging: resumed from what an earlier attempt left, retried (with backoff) when the
    connection breaks or the hub answers 5xx, checked (size, sha256) before it is handed back."""
    part = store.partial(rel)
    part.parent.mkdir(parents=True, exist_ok=True)
    delay = retry_delay
    for attempt in range(1, RETRIES + 1):
        try:
            _fetch(part, base, repo, commit, r, hf_token, progress, cancel)
            break
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            part.unlink(missing_ok=True)  # it cannot be finished here: its space goes back
            raise PullError(f"{repo}/{r.path}: the model store {store.root} filled up ({e.strerror}) during the "
                            "download; what was downloaded was removed. Free some space (`podllama models rm "
                            "MODEL`), or move models_dir to a larger disk, and pull again") from None
        except _Retryable as e:
            if attempt == RETRIES:
                raise PullError(f"{repo}/{r.path}: {e}, {RETRIES} times; run the same pull again to resume it "
                                f"({part.stat().st_size if part.exists() else 0} bytes are kept)") from None
            say(f"{r.path}: {e}; trying again in {delay:.0f}s (attempt {attempt + 1} of {RETRIES}), resuming")
            if cancel is not None and cancel.wait(delay):
                raise PullCancelled(f"download of {r.path} cancelled; `podllama pull` again resumes it") from None
            if cancel is None:
                threading.Event().wait(delay)
            delay = min(delay * 2, 16)
    size = part.stat().st_size
    if r.size is not None and size != r.size:
        raise PullError(f"{repo}/{r.path}: got {size} of {r.size} bytes; run the same pull again to resume it")
    if not _matches(part, r):
        part.unlink()
        raise PullError(f"{repo}/{r.path}: its sha256 does not match the hub's; the download was damaged and has "
                        "been discarded, run the pull again")
    return part


class _Retryable(Exception):
    """A download attempt that broke off, or a hub answer worth trying again (5xx)."""


def _fetch(part: Path, base: str, repo: str, commit: str, r: Remote, hf_token: str | None,
           progress: Callable[[str, int, int], None] | None, cancel: threading.Event | None) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    url = hf_hub_url(repo, r.path, revision=commit, endpoint=base)
    headers = build_hf_headers(token=hf_token or False, library_name="podllama")
    have = part.stat().st_size if part.exists() else 0
    if r.size is not None and have > r.size:
        part.unlink()
        have = 0
    if have:
        headers["Range"] = f"bytes={have}-"
    timeout = httpx.Timeout(30.0, read=120.0)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client, \
                client.stream("GET", url, headers=headers) as resp:
            if resp.status_code == 416 and r.size is not None and have == r.size:
                return  # the staged file is already complete
            if resp.status_code >= 500:
                raise _Retryable(f"the hub answered {resp.status_code}")
            if resp.status_code not in (200, 206):
                if resp.status_code in (401, 403):
                    raise PullError(f"{repo}/{r.path}: {resp.status_code} from the hub; a gated or private repo "
                                    "needs HF_TOKEN")
                raise PullError(f"{repo}/{r.path}: the hub answered {resp.status_code}")
            mode = "ab" if resp.status_code == 206 else "wb"
            done = have if mode == "ab" else 0
            total = r.size or int(resp.headers.get("content-length", 0)) + done
            with part.open(mode) as out:
                for chunk in resp.iter_bytes():  # as it arrives: a dropped connection keeps what came
                    if cancel is not None and cancel.is_set():
                        raise PullCancelled(f"download of {r.path} cancelled; `podllama pull` again resumes it")
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(r.path, done, total)
    except httpx.HTTPError as e:
        raise _Retryable(f"the download broke off ({type(e).__name__})") from None
    if r.size is not None and part.stat().st_size < r.size:
        raise _Retryable(f"the hub sent {part.stat().st_size} of {r.size} bytes")


def resolve(store: Store, text: str) -> Manifest | None:
    """The stored model a reference means: by file, by quant tag, or (no tag) any pull of that repo."""
    ref = parse_ref(text)
    if ref.file:
        return store.manifest(ref.id)
    if ref.tag:
        return store.manifest(ref.id)
    return next((m for m in store.manifests() if m.repo == ref.repo), None)


class ServerFiles(NamedTuple):
    """The files in the store a server runs: its model (the first shard), projector and draft model."""

    model: str
    mmproj: str | None = None
    draft: str | None = None


def stored(store: Store, ref: str) -> str | None:
    """The file in STORE a model setting names: a local file as it is, an hf:// reference's model once pulled."""
    if not ref.startswith("hf://"):
        return ref
    m = resolve(store, ref)
    return m.model if m is not None else None


def server_files(store: Store, server: ServerSection) -> ServerFiles | None:
    """The files (in STORE) that SERVER (a config's server section) runs: its hub model once pulled, else its
    fallback where that file is there; None when neither is. The one answer to "which model does this server
    run", for `podllama status`, the dashboard and the model listing alike. A draft model not pulled yet is
    None (Stack.model_files names it)."""
    draft = stored(store, server.draft_model) if server.draft_model else None
    if not server.model.startswith("hf://"):
        return ServerFiles(server.model, server.mmproj, draft)
    m = resolve(store, server.model)
    if m is None:
        if server.fallback and (store.root / server.fallback).is_file():
            return ServerFiles(server.fallback, server.mmproj, draft)
        return None
    return ServerFiles(m.model, server.mmproj or (m.mmproj if server.role in PROJECTOR_ROLES else None), draft)


def listing(store: Store, servers: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model in the store (and GGUF files placed by hand), with the servers that run it (a server whose
    hub model is not pulled runs its fallback: that file is the one it uses)."""
    used = {name: {f for f in server_files(store, s) or () if f} for name, s in servers.items()}

    def users(paths: set[str]) -> list[str]:
        return [name for name, files in used.items() if files & paths]

    rows = [m.to_dict() | {"used_by": users({f.path for f in m.files})} for m in store.manifests()]
    for rel in store.unmanaged():
        rows.append({"id": rel, "size": store.path(rel).stat().st_size, "source": "placed by hand", "revision": None,
                     "files": [], "model": rel, "used_by": users({rel})})
    return rows
