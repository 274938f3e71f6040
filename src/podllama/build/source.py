"""The llama.cpp source: a git submodule of this project, pinned to an upstream commit.

Where GitHub cannot be reached, a mirror stands in: any local git repository or work tree, or the git work tree
that the llama-cpp-python source distribution on the Python package index carries.

Moving the submodule survives being killed midway: podllama's changes to it take a lock of its own, under
which a git index lock left behind is stale, and a checkout records where it goes before it starts, so the
next one finishes an interrupted checkout (whose half-updated files are the only changes the tree can have:
a checkout never starts on a tree with changes).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import validate
from ..atomic import atomic_write
from . import pypi

SUBMODULE = "llama.cpp"
UPSTREAM_URL = "https://github.com/ggml-org/llama.cpp.git"
# llama-cpp-python releases whose sdist carries a llama.cpp work tree, by the commit they carry.
PYPI_RELEASES = {"0c1e57098bba43ac29e6e3b677cdceebdd22334f": "0.3.36"}
PYPI_PACKAGE = "llama-cpp-python"


class SourceError(Exception):
    pass


@dataclass
class SourceStatus:
    path: str
    pinned: str | None  # the commit the superproject's gitlink records
    commit: str | None  # the commit checked out (None: not initialised)
    date: str | None
    subject: str | None
    dirty: bool
    remote: str | None

    @property
    def at_pin(self) -> bool:
        return self.commit is not None and self.commit == self.pinned

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"at_pin": self.at_pin}


def git(*args: str, cwd: Path, check: bool = True, config: dict[str, str] | None = None) -> str:
    argv = ["git"]
    for k, v in (config or {}).items():
        argv += ["-c", f"{k}={v}"]
    proc = subprocess.run(argv + list(args), cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SourceError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip() if proc.returncode == 0 else ""


def project_root(start: Path | None = None) -> Path:
    """The superproject holding the llama.cpp submodule (the podllama checkout)."""
    env = os.environ.get("PODLLAMA_HOME")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for p in [here, *here.parents]:
        if (p / ".gitmodules").is_file() and SUBMODULE in (p / ".gitmodules").read_text():
            return p
    # installed from a checkout (pip install -e .): src/podllama/source.py → the checkout
    pkg = Path(__file__).resolve().parents[3]
    if (pkg / ".gitmodules").is_file():
        return pkg
    raise SourceError(
        "cannot find the podllama checkout that holds the llama.cpp submodule; run from inside it or set PODLLAMA_HOME"
    )


def source_dir(root: Path | None = None) -> Path:
    return (root or project_root()) / SUBMODULE


def status(root: Path | None = None) -> SourceStatus:
    root = root or project_root()
    sub = root / SUBMODULE
    pinned = None
    line = git("ls-tree", "HEAD", SUBMODULE, cwd=root, check=False)
    if line:
        pinned = line.split()[2]
    else:  # no commit yet: the index still holds the gitlink
        staged = git("ls-files", "--stage", SUBMODULE, cwd=root, check=False)
        pinned = staged.split()[1] if staged else None
    if not (sub / ".git").exists():
        return SourceStatus(str(sub), pinned, None, None, None, False, None)
    commit = git("rev-parse", "HEAD", cwd=sub, check=False) or None
    date, _, subject = git("log", "-1", "--format=%cI %s", cwd=sub, check=False).partition(" ")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", cwd=sub, check=False))
    remote = git("remote", "get-url", "origin", cwd=sub, check=False) or None
    return SourceStatus(str(sub), pinned, commit, date or None, subject or None, dirty, remote)


def has_commit(repo: Path | str, commit: str) -> bool:
    return bool(git("cat-file", "-t", f"{commit}^{{commit}}", cwd=Path(repo), check=False))


def init(mirror: str | None = None, root: Path | None = None, progress: Callable[[str], object] = print) -> SourceStatus:
    """Check the submodule out at the pinned commit: from its URL, or from a mirror."""
    root = root or project_root()
    st = status(root)
    if st.at_pin:
        progress(f"llama.cpp already at the pinned commit {st.pinned[:12]}")  # type: ignore[index]
        return st
    if st.pinned is None:
        raise SourceError(f"{root}: no llama.cpp gitlink in the index; is this a podllama checkout?")
    config = {"protocol.file.allow": "always"}
    if mirror:
        url = str(pypi_mirror(st.pinned, progress=progress) if mirror == "pypi" else Path(mirror).resolve())
        if not Path(url).exists():
            raise SourceError(f"mirror {url} does not exist; give a local git repository or work tree, or 'pypi'")
        if not has_commit(url, st.pinned):
            head = git("rev-parse", "HEAD", cwd=Path(url), check=False) or "no commits"
            raise SourceError(
                f"mirror {url} is at {head[:12]} and does not hold the pinned commit {st.pinned[:12]}; "
                f"use a mirror that has {st.pinned}, or move the pin with `podllama source update --ref ...`"
            )
        config[f"submodule.{SUBMODULE}.url"] = url
        progress(f"checking out llama.cpp {st.pinned[:12]} from mirror {url}")
    else:
        progress(f"checking out llama.cpp {st.pinned[:12]} from {UPSTREAM_URL}")
    proc = subprocess.run(
        ["git", *sum((["-c", f"{k}={v}"] for k, v in config.items()), []), "submodule", "update", "--init", SUBMODULE],
        cwd=root, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        hint = "" if mirror else "; where GitHub is unreachable use --mirror PATH (a local llama.cpp clone) or --mirror pypi"
        raise SourceError(f"could not check out llama.cpp: {proc.stderr.strip()}{hint}")
    return status(root)


@contextlib.contextmanager
def _changing(sub: Path) -> Iterator[Path]:
    """Held while podllama changes the submodule; yields its git directory. A git index lock found under it was
    left by a git that podllama ran and that was killed: it is removed."""
    gitdir = Path(git("rev-parse", "--absolute-git-dir", cwd=sub))
    with open(gitdir / "podllama.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        (gitdir / "index.lock").unlink(missing_ok=True)
        yield gitdir


def checkout(ref: str, remote: str | None = None, root: Path | None = None) -> tuple[str, str]:
    """Move the submodule to REF (fetched from REMOTE, else its origin). Returns (old commit, new commit); after
    an interrupted checkout, the one that was interrupted."""
    root = root or project_root()
    sub = root / SUBMODULE
    if status(root).commit is None:
        raise SourceError("llama.cpp is not checked out yet; run `podllama source init` first")
    with _changing(sub) as gitdir:
        intent = gitdir / "podllama-checkout"
        if intent.is_file():
            old, new = intent.read_text().split()[:2]
            git("checkout", "--quiet", "--force", "--detach", new, cwd=sub)
            intent.unlink()
            return old, new
        st = status(root)
        assert st.commit is not None
        if st.dirty:
            raise SourceError(f"{sub} has local changes; commit or discard them before moving to another commit")
        new = _fetch(sub, ref, remote)
        if new != st.commit:
            atomic_write(intent, f"{st.commit} {new}\n")
            git("checkout", "--quiet", "--detach", new, cwd=sub)
            intent.unlink()
        return st.commit, new


def _fetch(sub: Path, ref: str, remote: str | None) -> str:
    """The commit REF names, fetched from REMOTE (else origin) unless it is a full commit id already here."""
    try:
        validate.git_ref(ref)
        src = str(Path(remote).resolve()) if remote and Path(remote).exists() else (remote or "origin")
        if remote:
            validate.git_remote(src)
    except ValueError as e:
        raise SourceError(f"{e}; nothing was changed") from None
    if re.fullmatch(r"[0-9a-f]{40}", ref) and has_commit(sub, ref):
        return ref  # a full commit id already here: nothing to fetch
    proc = subprocess.run(["git", "-c", "protocol.file.allow=always", "fetch", "--quiet", "--", src, ref],
                          cwd=sub, capture_output=True, text=True)
    if proc.returncode != 0:
        if ref == "HEAD" or not has_commit(sub, ref):  # offline, a known tag or branch still resolves
            raise SourceError(f"cannot fetch '{ref}' from {src}: {proc.stderr.strip()}")
        return git("rev-parse", f"{ref}^{{commit}}", cwd=sub)
    return git("rev-parse", "FETCH_HEAD^{commit}", cwd=sub)


def pin(root: Path | None = None) -> None:
    """Record the submodule's current commit as the superproject's pin (stages the gitlink)."""
    root = root or project_root()
    git("add", SUBMODULE, cwd=root)


# -- the Python package index as a mirror ---------------------------------------------------------------------
def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "podllama"


def pypi_mirror(commit: str, version: str | None = None, progress: Callable[[str], object] = print) -> Path:
    """Download llama-cpp-python's sdist (checked against the index's sha256) and return its llama.cpp work tree."""
    version = version or PYPI_RELEASES.get(commit)
    if version is None:
        known = ", ".join(f"{v} ({c[:12]})" for c, v in PYPI_RELEASES.items())
        raise SourceError(
            f"no known {PYPI_PACKAGE} release carries llama.cpp {commit[:12]} (known: {known}); "
            "use --mirror PATH with a local llama.cpp clone instead"
        )
    dest = cache_dir() / "mirrors" / f"{PYPI_PACKAGE}-{version}"
    tree = dest / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / ".git").exists():
        return tree
    wanted = f"llama_cpp_python-{version}.tar.gz"
    try:
        archive = pypi.fetch(PYPI_PACKAGE, wanted, dest, progress=progress)
    except pypi.PackageIndexError as e:
        raise SourceError(str(e)) from None
    progress(f"unpacking {wanted}")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    if not (tree / ".git").exists():
        raise SourceError(f"{wanted} carries no llama.cpp git work tree at {tree}")
    return tree
