"""Values that end up on a program's command line (git, podman, docker, llama-server), checked by type and
pattern before they get there. Every check refuses a leading '-' (it would be read as an option), control
characters and NUL; each raises ValueError naming the value and what it may look like.

Callers still pass `--` where the program supports it: these checks are the first wall, not the only one.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # control characters, NUL and DEL
_NUMBER = re.compile(r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$")

# git: commit ids, tags and branches (a subset of what `git check-ref-format` allows), and HEAD
_GIT_REF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]{0,199}$")
# git remotes: a URL of a transport that runs no local program, scp-like ssh, or a local path
_GIT_URL = re.compile(r"^(https?|ssh|git|file)://[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+$")
_GIT_SCP = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[A-Za-z0-9._~/-]+$")
_LOCAL_PATH = re.compile(r"^(/|\./|\.\./)[^\x00-\x1f\x7f]*$")

# container images: [registry[:port]/]path[:tag][@sha256:digest], as the OCI distribution spec spells them
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REGISTRY = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?/)?"
_IMAGE_NAME = re.compile(rf"^{_REGISTRY}{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_IMAGE = re.compile(rf"^{_REGISTRY}{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
                    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")

_DEVICE = re.compile(r"^(?:/dev/[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*|[A-Za-z0-9][A-Za-z0-9_.:-]{0,127})$")
_CUDA_ARCH = re.compile(r"^[0-9]{2,3}[a-z]?(?:-real|-virtual)?$")
_ROCM_TARGET = re.compile(r"^gfx[0-9a-f]{3,5}(?::[a-z]+[+-])*$")
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]{0,199}$")


def _plain(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if CONTROL.search(value):
        raise ValueError(f"{what} {value!r} holds control characters")
    if value.startswith("-"):
        raise ValueError(f"{what} {value!r} starts with '-', which a program would read as an option")
    return value


def git_ref(ref: str) -> str:
    """A commit id, tag, branch or HEAD."""
    _plain(ref, "git ref")
    if not _GIT_REF.match(ref) or ".." in ref or "@{" in ref or ref.endswith((".lock", "/", ".")) or "//" in ref:
        raise ValueError(f"git ref {ref!r} is not a commit id, tag or branch name (letters, digits, '.', '_', "
                         "'/', '+', '-'; no '..')")
    return ref


def git_remote(remote: str) -> str:
    """A remote to fetch from: an http(s)/ssh/git/file URL, user@host:path, or a local path (/… or ./…)."""
    _plain(remote, "git remote")
    if "::" in remote.split("://", 1)[0]:
        raise ValueError(f"git remote {remote!r} names a transport helper; give a URL or a path")
    if _GIT_URL.match(remote) or _GIT_SCP.match(remote) or _LOCAL_PATH.match(remote):
        return remote
    raise ValueError(f"git remote {remote!r} is not an https://, http://, ssh://, git:// or file:// URL, "
                     "user@host:path, or a path starting with / or ./")


def _matching(value: str, what: str, pattern: re.Pattern[str], like: str, dots: bool = True) -> str:
    _plain(value, what)
    if not pattern.match(value) or (not dots and ".." in value):
        raise ValueError(f"{what} {value!r} is not {like}")
    return value


def image(ref: str) -> str:
    """An image reference: [registry/]name[:tag][@sha256:…]."""
    return _matching(ref, "image", _IMAGE, "an image reference such as docker.io/library/debian:bookworm-slim")


def image_name(ref: str) -> str:
    """An image repository without a tag: [registry/]name."""
    return _matching(ref, "image repository", _IMAGE_NAME, "a name such as podllama/llama-server (no tag)")


def device(dev: str) -> str:
    """A GPU id: an index, a UUID, or a /dev path."""
    return _matching(dev, "device", _DEVICE, "a GPU index, id or /dev path", dots=False)


def cuda_architecture(arch: str) -> str:
    return _matching(arch, "CUDA architecture", _CUDA_ARCH, "like 86, 90a or 120-real")


def rocm_target(target: str) -> str:
    return _matching(target, "ROCm target", _ROCM_TARGET, "like gfx1100 or gfx90a:xnack-")


def revision(rev: str) -> str:
    """A Hugging Face revision: branch, tag or commit."""
    return _matching(rev, "revision", _REVISION, "a branch, tag or commit id", dots=False)


def arg_value(value: object, what: str) -> object:
    """A value for a llama-server flag: numbers (negative ones too) as they are; strings without NUL and not
    starting with '-' (newlines are fine: a chat template may hold them)."""
    if isinstance(value, bool) or not isinstance(value, str):
        return value
    if "\x00" in value:
        raise ValueError(f"{what} holds a NUL byte")
    if value.startswith("-") and not _NUMBER.match(value):
        raise ValueError(f"{what} = {value!r} starts with '-', which llama-server would read as another flag")
    return value


def text(value: str, what: str) -> str:
    """A name that becomes one command-line argument (an alias, a file name): no control characters, no
    leading '-'."""
    return _plain(value, what)


# -- database URLs --------------------------------------------------------------------------------------------
def database_url(url: str) -> str:
    """URL, if it names a database podllama can use; else ValueError naming the forms it takes."""
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        if not urlsplit(url).hostname and "host=" not in url:
            raise ValueError("a postgresql:// URL needs a host: postgresql://USER:PASSWORD@HOST:5432/DBNAME")
        return url
    if scheme == "sqlite" and url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return url
    raise ValueError(f"'{url_shown(url)}' is not a database URL podllama uses: postgresql://USER:PASSWORD@HOST/DB, or "
                     "sqlite:////ABSOLUTE/PATH.db (leave it out for the SQLite file in the state directory)")


def url_shown(url: str) -> str:
    """URL with its password left out, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


# -- Hugging Face model references -------------------------------------------------------------------------------
# the files podllama pulls as a model, by suffix (with the files that go with one: a Piper voice's .onnx.json)
MODEL_FILES: dict[str, tuple[str, ...]] = {".gguf": (), ".bin": (), ".safetensors": (), ".ckpt": (),
                                           ".onnx": (".json",)}
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_QUANT = re.compile(r"[A-Za-z0-9_]+")


def hf_reference(text: str) -> tuple[str, str | None, str | None]:
    """(repo, quant tag, file) of 'org/repo:Q4_K_M' | 'org/repo' | 'org/repo/dir/file.gguf' (an 'hf://' prefix is
    allowed); ValueError naming the forms it takes. The file's path is checked by the store when it is used."""
    text = text.strip().removeprefix("hf://")
    repo_part, _, tag = text.partition(":")
    parts = repo_part.split("/")
    if len(parts) < 2 or not all(_REPO_PART.fullmatch(p) for p in parts[:2]):
        raise ValueError(f"'{text}' is not a Hugging Face model reference; write ORG/REPO[:QUANT] or "
                         "ORG/REPO/FILE (e.g. ggml-org/gemma-3-270m-it-GGUF:Q8_0)")
    if tag and not _QUANT.fullmatch(tag):
        raise ValueError(f"'{tag}' is not a quant tag (letters, digits and _: Q4_K_M, Q8_0, F16 …)")
    file = "/".join(parts[2:]) or None
    if file is not None:
        if not file.endswith(tuple(MODEL_FILES)):
            raise ValueError(f"'{file}' is not a model file podllama pulls (by name: {', '.join(MODEL_FILES)})")
        if tag:
            raise ValueError("give either a file or a quant tag, not both")
    return "/".join(parts[:2]), tag or None, file

