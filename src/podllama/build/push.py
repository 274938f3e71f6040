"""Images for other machines: `podllama build --push REGISTRY/NAME` pushes a built image under its variant and
llama.cpp commit, and records what the registry stored in a lock file beside services.toml.

    REGISTRY/NAME:<variant>-<commit12>   one build of one commit (never moved)
    REGISTRY/NAME:<variant>              the newest pushed build of that variant

`images.lock` (JSON) maps each pushed commit tag to its digest, so a machine pulls exactly what was built
(`REGISTRY/NAME@sha256:…`), with the kind, variant, commit and CPU target it was built for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import validate
from ..atomic import atomic_write
from ..config.kinds import Kind
from ..engine import CliEngine
from . import pinned, source
from .images import promote, recorded_cpu_target, tag_for

LOCK = "images.lock"


class PushError(Exception):
    pass


def repository(value: str) -> str:
    """REGISTRY/NAME, without a tag (the tags are made here)."""
    try:
        return validate.image_name(value)
    except ValueError as e:
        raise PushError(f"--push {value!r}: {e}") from None


def push(engine: CliEngine, image: str, repo: str, variant: str, commit: str, kind: Kind, lock: Path,
         tls_verify: bool = True, progress: Any = print) -> dict[str, Any]:
    """Tag IMAGE (a built, smoke-tested image) for REPO, push both tags, record the digest in LOCK. Returns the
    lock's entry. Nothing is recorded unless both pushes succeeded."""
    repo = repository(repo)
    tags = [tag_for(variant, commit, repo), tag_for(variant, repo=repo)]
    digests = []
    for ref in tags:
        engine.tag(image, ref)
        progress(f"pushing {ref}")
        digests.append(engine.push(ref, tls_verify=tls_verify))
    if len(set(digests)) != 1:
        raise PushError(f"the registry stored {tags[0]} and {tags[1]} under different digests ({', '.join(digests)})")
    entry = {"ref": f"{repo}@{digests[0]}", "digest": digests[0], "tags": tags, "kind": kind.name,
             "tls_verify": tls_verify,
             "variant": variant, "llama_commit" if kind.llama else "source": commit,
             "cpu_target": recorded_cpu_target(engine, image), "image_id": engine.image_id(image),
             "pushed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    record(lock, tags[0], entry)
    return entry


def locked(lock: Path, kind: Kind, variant: str, commit: str) -> dict[str, Any] | None:
    """The entry of LOCK for KIND's VARIANT image of COMMIT (a llama.cpp commit, or a pinned source's id), the
    newest pushed if several; None when the lock names none."""
    key = "llama_commit" if kind.llama else "source"
    found = [e for e in read(lock)["images"].values() if isinstance(e, dict) and e.get("kind") == kind.name
             and e.get("variant") == variant and e.get(key) == commit and isinstance(e.get("ref"), str)]
    return max(found, key=lambda e: str(e.get("pushed", "")), default=None)


def pull(engine: CliEngine, entry: dict[str, Any], kind: Kind, variant: str, commit: str, repo: str) -> str:
    """The image ENTRY names, pulled by its digest and checked (its labels must say KIND, VARIANT and COMMIT: a
    registry is not trusted to hold what the lock says), then tagged as if built here (REPO is llama-server's
    repository). Returns its id."""
    try:
        ref = validate.image(entry["ref"])
    except ValueError as e:
        raise PushError(f"images.lock: {e}") from None
    if "@sha256:" not in ref:
        raise PushError(f"images.lock: {ref} is not a reference by digest (REGISTRY/NAME@sha256:…); build and "
                        "push it again with `podllama build --push`")
    ok, why = engine.pull(ref, timeout=1800, tls_verify=bool(entry.get("tls_verify", True)))
    if not ok:
        raise PushError(f"pulling {ref} failed: {why.splitlines()[-1] if why else 'no reason given'}")
    labels = engine.image_labels(ref)
    said = {"variant": labels.get("podllama.variant"),
            "commit": labels.get("podllama.llama-commit" if kind.llama else "podllama.source-id"),
            "kind": labels.get("podllama.server-kind", "llama" if labels.get("podllama.llama-commit") else None)}
    wanted = {"variant": variant, "commit": commit, "kind": kind.name}
    wrong = [f"{k} {said[k]!r} (wanted {wanted[k]!r})" for k in wanted if said[k] != wanted[k]]
    if wrong:
        engine.untag(ref)
        raise PushError(f"{ref} is not the image images.lock says: its labels give {', '.join(wrong)}; nothing "
                        "was tagged")
    image_id = engine.image_id(ref)
    if image_id is None:
        raise PushError(f"{ref} was pulled but the engine does not show it")
    promote(engine, image_id, variant, commit, kind.repository(repo))
    return image_id


def from_lock(engine: CliEngine, cfg: Any, kind: Kind, variant: str, say: Callable[[str], object] = print) -> bool:
    """A missing image pulled where images.lock beside CFG's services.toml names one of the commit this checkout
    would build, as `[build] from` allows. True when pulled; False: compile it. With from = "pull", no image to
    pull (or a pull that fails) is an error."""
    how = cfg.build.from_
    if how == "compile":
        return False
    commit = source_commit(kind) or ""
    entry = locked(cfg.root / LOCK, kind, variant, commit) if commit else None
    try:
        if entry is None:
            raise PushError(f"images.lock names no {variant} {kind.program} image of {(commit or 'unknown')[:12]}; "
                            f"push one with `podllama build --variant {variant} --push REGISTRY/NAME`, or set "
                            "[build] from = \"auto\" to compile it here")
        pull(engine, entry, kind, variant, commit, cfg.build.repository)
    except PushError as e:
        if how == "pull":
            raise
        if entry is not None:
            say(f"{e}; compiling instead")
        return False
    say(f"pulled {entry['ref']} (pushed {entry.get('pushed', '?')}, CPU target {entry.get('cpu_target', '?')}) "
        "instead of compiling")
    return True


def source_commit(kind: Kind) -> str | None:
    """What this checkout builds KIND's image from: llama.cpp's commit (the submodule's, else the one the project
    pins when it is not checked out), or a pinned source's id."""
    root = source.project_root()
    if kind.llama:
        st = source.status(root)
        return st.commit or st.pinned
    return pinned.source_id(pinned.pin_of(kind.name, root), root)


def read(lock: Path) -> dict[str, Any]:
    try:
        data = json.loads(lock.read_text())
    except FileNotFoundError:
        return {"images": {}}
    except ValueError as e:
        raise PushError(f"{lock} is not valid JSON ({e}); fix or remove it") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise PushError(f"{lock} holds no \"images\" table; fix or remove it")
    return data


def record(lock: Path, tag: str, entry: dict[str, Any]) -> None:
    data = read(lock)
    data["images"][tag] = entry
    data["images"] = dict(sorted(data["images"].items()))
    atomic_write(lock, json.dumps(data, indent=2) + "\n")
