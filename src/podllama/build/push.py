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
from pathlib import Path
from typing import Any

from .. import validate
from ..atomic import atomic_write
from ..config.kinds import Kind
from ..engine import CliEngine
from .images import recorded_cpu_target, tag_for

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
             "variant": variant, "llama_commit" if kind.llama else "source": commit,
             "cpu_target": recorded_cpu_target(engine, image), "image_id": engine.image_id(image),
             "pushed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    record(lock, tags[0], entry)
    return entry


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
