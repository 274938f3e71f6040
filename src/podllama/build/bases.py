"""Base images for builds: the upstream ones, a custom pair, or a Debian base bootstrapped here with no registry
(`podllama base-image`), slimmed as Debian's own slim images are."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import validate
from ..engine import CliEngine
from . import source
from .errors import BuildError

if TYPE_CHECKING:
    from .toolkits import Toolkit

LOCAL_BASE = "localhost/podllama-base"
DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")

# (build stage, runtime stage) base images per variant
UPSTREAM_BASES = {
    "cpu": ("docker.io/library/debian:bookworm-slim", "docker.io/library/debian:bookworm-slim"),
    "vulkan": ("docker.io/library/debian:trixie-slim", "docker.io/library/debian:trixie-slim"),
    "cuda": ("docker.io/nvidia/cuda:12.8.1-devel-ubuntu24.04", "docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04"),
    "rocm": ("docker.io/rocm/dev-ubuntu-24.04:7.2.1-complete", "docker.io/rocm/dev-ubuntu-24.04:7.2.1-complete"),
}
# The CUDA version of the upstream CUDA images (which architectures they compile for: toolkits.py)
UPSTREAM_CUDA = (12, 8)
# Debian suites `podllama base-image` can bootstrap, per variant; CUDA's toolkit goes on top (toolkits.lock)
LOCAL_SUITES = {"cpu": "bookworm", "vulkan": "trixie"}


@dataclass
class Base:
    build: str
    runtime: str
    kind: str  # upstream | local | custom
    cuda: tuple[int, int] | None = None  # the CUDA version of the build image, where known
    toolkit: Toolkit | None = None  # a local base's toolkit, made from the package index (toolkits.py)

    def describe(self) -> str:
        images = self.build if self.build == self.runtime else f"{self.build} (build), {self.runtime} (runtime)"
        return f"{images} [{self.kind}]"


def resolve_base(variant: str, choice: str) -> Base:
    from .toolkits import toolkit_of

    if choice == "auto":  # which one depends on what the engine has and can pull
        raise ValueError("resolve_base: 'auto' is chosen by pick_base")
    if choice == "upstream":
        return Base(*UPSTREAM_BASES[variant], kind="upstream", cuda=UPSTREAM_CUDA if variant == "cuda" else None)
    if choice == "local":
        suite = LOCAL_SUITES.get(variant)
        toolkit = toolkit_of(variant)
        if toolkit is not None:
            return Base(toolkit.image("devel"), toolkit.image("runtime"), kind="local", cuda=toolkit.cuda,
                        toolkit=toolkit)
        if suite is None:
            raise BuildError(
                f"no local base for '{variant}': Debian has no {variant.upper()} toolkit image to bootstrap. "
                f"Give a base that has it with --base IMAGE (or BUILD_IMAGE,RUNTIME_IMAGE), e.g. "
                f"{UPSTREAM_BASES[variant][0]} saved from a connected machine and loaded here "
                f"(`podman save`/`podman load`)"
            )
        return Base(f"{LOCAL_BASE}:{suite}", f"{LOCAL_BASE}:{suite}", kind="local")
    build, _, runtime = choice.partition(",")
    build, runtime = build.strip(), (runtime or build).strip()
    try:
        validate.image(build)
        validate.image(runtime)
    except ValueError as e:
        raise BuildError(f"base: {e}; give auto, upstream, local, or IMAGE[,RUNTIME_IMAGE]") from None
    return Base(build, runtime, kind="custom")


def pick_base(engine: CliEngine, variant: str, choice: str, progress: Callable[[str], None]) -> Base:
    """The base of CHOICE. "auto": the upstream images where they are here or a registry gives them, else the
    local base (said so), so a machine without a registry needs no setting to build, start and update."""
    if choice != "auto":
        return resolve_base(variant, choice)
    upstream = resolve_base(variant, "upstream")
    unreachable = pull_missing(engine, upstream, progress)
    if unreachable is None:
        return upstream
    local = resolve_base(variant, "local")
    missing = local_missing(engine, local)
    if missing:
        raise BuildError(f"{unreachable}, and the local base is not here either ({', '.join(missing)}). Where no "
                         f"registry is reachable, create it with `podllama base-image --suite "
                         f"{missing[0].rsplit(':', 1)[-1]}`; [build] base = \"auto\" then uses it")
    progress(f"no registry gives {upstream.build}: building on the local base {local.describe()} "
             '([build] base = "auto")')
    return local


def local_images(base: Base) -> list[str]:
    """The bootstrapped Debian images a local base needs (a toolkit's own are made on its Debian base at the
    first build)."""
    needed = [f"{LOCAL_BASE}:{base.toolkit.suite}"] if base.toolkit is not None else [base.build, base.runtime]
    return list(dict.fromkeys(needed))


def local_missing(engine: CliEngine, base: Base) -> list[str]:
    return [i for i in local_images(base) if not engine.image_exists(i)]


def ensure_base(engine: CliEngine, base: Base, progress: Callable[[str], None]) -> None:
    """Every base image present (pulled if it must be, a local toolkit's made); else fail before anything is
    built."""
    if base.toolkit is not None:
        from .toolkits import ensure_images

        ensure_images(engine, base.toolkit, progress)
        return
    missing = local_missing(engine, base) if base.kind == "local" else []
    if missing:
        raise BuildError(f"local base image {missing[0]} is missing; create it with `podllama base-image --suite "
                         f"{missing[0].rsplit(':', 1)[-1]}`")
    unreachable = pull_missing(engine, base, progress)
    if unreachable:
        raise BuildError(
            f"{unreachable}. Where no registry is reachable, bootstrap a Debian base with `podllama base-image` and "
            "set [build] base = \"local\" (or $PODLLAMA_BASE=local; `podllama build --base local`), or load the "
            "image yourself and name it there"
        )


def pull_missing(engine: CliEngine, base: Base, progress: Callable[[str], None]) -> str | None:
    """BASE's images that are not here pulled; why one cannot be had, or None."""
    for image in dict.fromkeys([base.build, base.runtime]):
        if engine.image_exists(image):
            continue
        progress(f"pulling base image {image}")
        ok, why = engine.pull(image, timeout=600)
        if not ok:
            return f"base image {image} cannot be had: {why.splitlines()[-1] if why else 'pull failed'}"
    return None


# Installed into a bootstrapped base, as Debian's own slim images do: no documentation, manuals or
# translations from later installs, and no package caches left in image layers.
DPKG_SLIM = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""
_CLEAN = '"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"'
APT_CLEAN = (f"DPkg::Post-Invoke {{ {_CLEAN}; }};\nAPT::Update::Post-Invoke {{ {_CLEAN}; }};\n"
             'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n')


def slim_rootfs(root: Path) -> None:
    """What debootstrap leaves that no image needs: downloaded packages, apt's caches and lists, manuals,
    translations, documentation (licences kept); and the settings that keep later installs as lean."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*", "usr/share/man/*",
                    "usr/share/info/*", "usr/share/locale/*"):
        for p in root.glob(pattern):
            if p.name != "locale.alias" and p.name != "lock" and p.name != "partial":
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for doc in (root / "usr/share/doc").glob("*"):
        for p in doc.iterdir() if doc.is_dir() and not doc.is_symlink() else []:
            if p.name != "copyright":
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (root / "etc/dpkg/dpkg.cfg.d/podllama-slim").write_text(DPKG_SLIM)
    (root / "etc/apt/apt.conf.d/podllama-clean").write_text(APT_CLEAN)


def bootstrap_base(engine: CliEngine, suite: str, mirror: str = "http://deb.debian.org/debian",
                   progress: Callable[[str], None] = print, on_line: Callable[[str], None] | None = None) -> str:
    """Make localhost/podllama-base:SUITE from Debian packages (debootstrap, as root), with no registry.
    ON_LINE gets debootstrap's progress lines (retrieving, extracting, configuring …)."""
    if not re.fullmatch(r"[a-z]+", suite):  # it names a directory that is removed and made again
        raise BuildError(f"suite {suite!r}: a Debian suite is a word such as bookworm, trixie or forky")
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed; `apt-get install debootstrap` (scripts/setup.sh does)")
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root; run `sudo podllama base-image`")
    ref = f"{LOCAL_BASE}:{suite}"
    root = source.cache_dir() / "rootfs" / suite
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    progress(f"debootstrap {suite} from {mirror} (about half a minute)")
    # a suite newer than this debootstrap (Debian's testing, for ROCm) is made as unstable's script makes it
    script = [] if (DEBOOTSTRAP_SCRIPTS / suite).exists() else [str(DEBOOTSTRAP_SCRIPTS / "sid")]
    proc = subprocess.Popen(["debootstrap", "--variant=minbase", suite, str(root), mirror, *script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # "I: Retrieving libc6 2.36-9", "I: Extracting …", "I: Configuring …"
        lines.append(line.rstrip())
        if line.startswith("I: ") and on_line is not None:
            on_line(line[3:].strip())
    if proc.wait() != 0:
        raise BuildError(f"debootstrap {suite} failed: {chr(10).join(lines[-20:])}")
    slim_rootfs(root)
    progress(f"importing {ref} into {engine.name}")
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    try:
        engine.import_tar(tar.stdout, ref)
    finally:
        tar.wait()
        shutil.rmtree(root, ignore_errors=True)
    return ref


