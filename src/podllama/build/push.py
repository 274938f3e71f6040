"""Images for other machines: `podllama build --push REGISTRY/NAME` pushes a built image under its variant and
llama.cpp commit, and records what the registry stored in a lock file beside services.toml.

    REGISTRY/NAME:<variant>-<commit12>   one build of one commit (never moved)
    REGISTRY/NAME:<variant>              the newest pushed build of that variant

`images.lock` (JSON) maps each pushed commit tag to its digest, so a machine pulls exactly what was built
(`REGISTRY/NAME@sha256:…`), with the kind, variant, commit and CPU target it was built for. The gateway's image
is pushed and pulled the same way (`build --kind gateway`): its "variant" is the engine it drives, its "commit"
the hash of podllama's own code it holds.
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
from .images import gateway_source_hash, gateway_tag, promote, recorded_cpu_target, tag_for, tag_gateway

LOCK = "images.lock"


class PushError(Exception):
    pass


def repository(value: str) -> str:
    """REGISTRY/NAME, without a tag (the tags are made here)."""
    try:
        return validate.image_name(value)
    except ValueError as e:
        raise PushError(f"--push {value!r}: {e}") from None


def commit_key(kind: str) -> str:
    """The lock's name for what an image was built from: llama.cpp's commit, or a source's id (a pinned source's,
    or the gateway's code)."""
    return "llama_commit" if kind == "llama" else "source"


def push(engine: CliEngine, image: str, repo: str, variant: str, commit: str, kind: str, lock: Path,
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
    entry = {"ref": f"{repo}@{digests[0]}", "digest": digests[0], "tags": tags, "kind": kind,
             "tls_verify": tls_verify, "variant": variant, commit_key(kind): commit,
             "cpu_target": recorded_cpu_target(engine, image), "image_id": engine.image_id(image),
             "pushed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    record(lock, tags[0], entry)
    return entry


def locked(lock: Path, kind: str, variant: str, commit: str) -> dict[str, Any] | None:
    """The entry of LOCK for KIND's VARIANT image of COMMIT (a llama.cpp commit, or a source's id), the newest
    pushed if several; None when the lock names none."""
    key = commit_key(kind)
    found = [e for e in read(lock)["images"].values() if isinstance(e, dict) and e.get("kind") == kind
             and e.get("variant") == variant and e.get(key) == commit and isinstance(e.get("ref"), str)]
    return max(found, key=lambda e: str(e.get("pushed", "")), default=None)


def identity(labels: dict[str, str]) -> dict[str, str | None]:
    """What an image's labels say it is: kind, variant, commit (as the lock names them)."""
    if labels.get("podllama.kind") == "gateway":
        return {"kind": "gateway", "variant": labels.get("podllama.engine"),
                "commit": labels.get("podllama.source-id")}
    llama = labels.get("podllama.llama-commit")
    return {"kind": labels.get("podllama.server-kind", "llama" if llama else None),
            "variant": labels.get("podllama.variant"), "commit": llama or labels.get("podllama.source-id")}


def pull(engine: CliEngine, entry: dict[str, Any], kind: str, variant: str, commit: str) -> str:
    """The image ENTRY names, pulled by its digest and checked: its labels must say KIND, VARIANT and COMMIT (a
    registry is not trusted to hold what the lock says). Returns its id; tagging it is the caller's."""
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
    said = identity(engine.image_labels(ref))
    wanted = {"variant": variant, "commit": commit, "kind": kind}
    wrong = [f"{k} {said[k]!r} (wanted {wanted[k]!r})" for k in wanted if said[k] != wanted[k]]
    if wrong:
        engine.untag(ref)
        raise PushError(f"{ref} is not the image images.lock says: its labels give {', '.join(wrong)}; nothing "
                        "was tagged")
    image_id = engine.image_id(ref)
    if image_id is None:
        raise PushError(f"{ref} was pulled but the engine does not show it")
    return image_id


def from_lock(engine: CliEngine, cfg: Any, kind: Kind, variant: str, say: Callable[[str], object] = print) -> bool:
    """A missing server image pulled where images.lock beside CFG's services.toml names one of the commit this
    checkout would build, as `[build] from` allows, and tagged as if built here. True when pulled; False: compile
    it. With from = "pull", no image to pull (or a pull that fails) is an error."""
    commit = source_commit(kind) or ""
    pulled = _pull_locked(engine, cfg, cfg.build.from_, kind.name, variant, commit, say,
                          what=f"{variant} {kind.program} image",
                          push_how=f"podllama build --variant {variant} --push REGISTRY/NAME",
                          otherwise=("compile it here", "compiling"))
    if pulled is not None:
        promote(engine, pulled, variant, commit, kind.repository(cfg.build.repository))
    return pulled is not None


def gateway_from_lock(engine: CliEngine, cfg: Any, root: Path, say: Callable[[str], object] = print,
                      source_id: str | None = None) -> str | None:
    """The gateway image of this podllama code pulled where images.lock names one for this engine, tagged as if
    built here. Returns its tag, or None: build it. `[build] from = "pull"` forbids compiling, and the gateway's
    image is not compiled: with no entry for it, it is built as with "auto"."""
    source_id, how = source_id or gateway_source_hash(root), cfg.build.from_
    if how == "pull" and locked(cfg.root / LOCK, "gateway", engine.name, source_id) is None:
        how = "auto"
    pulled = _pull_locked(engine, cfg, how, "gateway", engine.name, source_id, say,
                          what=f"gateway image for {engine.name}", otherwise=("build it here", "building"),
                          push_how=f"podllama build --kind gateway --engine {engine.name} --push REGISTRY/NAME")
    return tag_gateway(engine, pulled, gateway_tag(engine, root, source_id)) if pulled is not None else None


def gateway_image(engine: CliEngine, cfg: Any, root: Path, log_dir: Path, say: Callable[[str], None] = print,
                  on_line: Callable[[str], None] | None = None) -> str:
    """The gateway image of ROOT's podllama code for ENGINE: here already, pulled as images.lock names it, or
    built."""
    from .images import base_choice, build_gateway

    source_id = gateway_source_hash(root)  # a hash of every source file: once per call
    tag = gateway_tag(engine, root, source_id)
    if engine.image_exists(tag):
        return tag
    return gateway_from_lock(engine, cfg, root, say, source_id) or build_gateway(
        engine, root, base_choice(cfg), log_dir, progress=say, on_line=on_line, source_id=source_id)


def _pull_locked(engine: CliEngine, cfg: Any, how: str, kind: str, variant: str, commit: str,
                 say: Callable[[str], object], what: str, push_how: str, otherwise: tuple[str, str]) -> str | None:
    """`[build] from`'s policy (HOW), for any image the lock can name: the pulled image's id, or None to make it
    here (OTHERWISE: how that is said, "compile it here" and "compiling")."""
    if how == "compile":
        return None
    entry = locked(cfg.root / LOCK, kind, variant, commit) if commit else None
    try:
        if entry is None:
            raise PushError(f"images.lock names no {what} of {(commit or 'unknown')[:12]}; push one with "
                            f"`{push_how}`, or set [build] from = \"auto\" to {otherwise[0]}")
        image_id = pull(engine, entry, kind, variant, commit)
    except PushError as e:
        if how == "pull":
            raise
        if entry is not None:
            say(f"{e}; {otherwise[1]} instead")
        return None
    say(f"pulled {entry['ref']} (pushed {entry.get('pushed', '?')}"
        + (f", CPU target {entry['cpu_target']}" if entry.get("cpu_target") else "") + f") instead of {otherwise[1]}")
    return image_id


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
