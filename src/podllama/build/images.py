"""Images: Containerfile per variant, build, smoke test (smoke.py), tags, rollback, recorded flags, the gateway's
image. Base images are base.py's, the web UI ui.py's.

Tags: `podllama/llama-server:<variant>-<commit12>` for every build that passed its smoke test, and
`podllama/llama-server:<variant>` for the one in use, moved only after the smoke test; the image it pointed to
before keeps `:<variant>-previous` for rollback. A failed build or smoke test leaves every tag as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import atomic_write
from ..config.kinds import KINDS, Kind
from ..engine import CliEngine, ContainerSpec, GpuRequest
from . import pinned, source, toolkits
from .bases import Base, ensure_base, pick_base
from .errors import BuildError
from .flags import FlagSet
from .smoke import GPU_BUILDS, SMOKE_TESTS, gpu_checks
from .ui import prepare_ui

REPO = "podllama/llama-server"
# CUDA architectures built when none are detected or configured (Pascal to Blackwell, as llama.cpp's CI), those
# the base's CUDA compiles for
DEFAULT_CUDA_ARCHITECTURES = ["61", "70", "75", "80", "86", "89", "90", "100", "120"]
DEFAULT_ROCM_TARGETS = ["gfx908", "gfx90a", "gfx942", "gfx1030", "gfx1100", "gfx1101", "gfx1102", "gfx1151",
                        "gfx1200", "gfx1201"]


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


# -- build ----------------------------------------------------------------------------------------------------
def cuda_architectures_for(base: Base, requested: list[str]) -> str:
    """The CMake CUDA architectures of a build: those detected or configured (refused when the base's CUDA cannot
    compile for them), else every default one it can."""
    if requested:
        toolkits.check_cuda_architectures(requested, base.cuda, base.describe())
        return ";".join(requested)
    return ";".join(toolkits.supported(DEFAULT_CUDA_ARCHITECTURES, base.cuda))


def build_args_for(variant: str, base: Base, commit: str, build_number: int, cpu_target: str, ui: str,
                   cuda_architectures: list[str], rocm_targets: list[str]) -> dict[str, str]:
    args = {"BUILD_BASE": base.build, "RUNTIME_BASE": base.runtime, "LLAMA_COMMIT": commit[:12],
            "LLAMA_BUILD_NUMBER": str(build_number), "CPU_TARGET": cpu_target, "UI": ui}
    if variant == "cuda":
        args["CUDA_ARCHITECTURES"] = cuda_architectures_for(base, cuda_architectures)
    if variant == "rocm":
        args["ROCM_TARGETS"] = ";".join(rocm_targets or DEFAULT_ROCM_TARGETS)
    return args


def build(engine: CliEngine, variant: str, *, base_choice: str = "auto", cpu_target: str = "native",
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
    base = pick_base(engine, variant, base_choice, progress)
    if variant == "cuda":
        cuda_architectures_for(base, cuda_architectures or [])
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
            if result.variant in GPU_BUILDS:
                result.smoke[result.variant] = gpu_checks(engine, result.image_id, result.variant,
                                                          devices=kind.llama)
        except BuildError:
            if not _tagged(engine, result.image_id):
                engine.remove_image(result.image_id)
            raise
    result.previous = promote(engine, result.image_id, result.variant, result.commit, repo=repo, dirty=dirty)
    result.tags = [tag_for(result.variant, result.commit, repo, dirty), tag_for(result.variant, repo=repo)]
    record_flags(engine, result.image_id, kind)
    result.seconds = round(time.monotonic() - started, 1)
    return result


def build_server(engine: CliEngine, kind: Kind, variant: str, *, base_choice: str = "auto",
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
    base = pick_base(engine, variant, base_choice, progress)
    args = {"BUILD_BASE": base.build, "RUNTIME_BASE": base.runtime, "CPU_TARGET": cpu_target}
    if variant == "cuda":
        args["CUDA_ARCHITECTURES"] = cuda_architectures_for(base, cuda_architectures or [])
    kind_repo = kind.repository(repo)
    progress(f"{kind.program} ({variant}) from {pin.describe()}, engine {engine.name}, base {base.describe()}")
    ensure_base(engine, base, progress)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"build-{kind.name}-{variant}-{time.strftime('%Y%m%d-%H%M%S')}.log"
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
    if chosen not in ("auto", "native", "portable"):
        raise BuildError(f"CPU target {chosen!r}: choose native (this machine's CPU) or portable (any CPU)")
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


def tags_of(engine: CliEngine, variant: str, repo: str = REPO) -> tuple[str | None, str | None]:
    """(the image in use, the previous one) of VARIANT, to put back with restore()."""
    return engine.image_id(tag_for(variant, repo=repo)), engine.image_id(previous_tag(variant, repo))


def restore(engine: CliEngine, variant: str, tags: tuple[str | None, str | None], repo: str = REPO) -> None:
    """`:<variant>` and `:<variant>-previous` pointed back at what tags_of() read: an update that is undone
    leaves no trace in them (the build it refused is never the one `podllama rollback` goes to)."""
    for image, ref in zip(tags, (tag_for(variant, repo=repo), previous_tag(variant, repo)), strict=True):
        if image:
            engine.tag(image, ref)
        elif engine.image_id(ref):
            engine.untag(ref)


def _tagged(engine: CliEngine, image_id: str) -> bool:
    info = engine.image_inspect(image_id) or {}
    return bool(info.get("RepoTags"))


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# -- recorded flags -------------------------------------------------------------------------------------------
def flags_cache(image_id: str, under: Path | None = None) -> Path:
    """Where an image's help text is kept: the user's cache, or UNDER (a stack's state directory, which the
    gateway container sees at the same path)."""
    return (under or source.cache_dir() / "images") / f"{image_id[:24]}.json"


def record_flags(engine: CliEngine, image: str, kind: Kind = KINDS["llama"], look_in: Path | None = None
                 ) -> FlagSet:
    """The flags the image's server knows, read from the help text recorded in the image, cached by id in the
    user's cache (and looked for in LOOK_IN first: the stack's state directory, where the gateway container finds
    what share_flags put there; starting a container from inside the gateway to read it is the fallback). Writes
    nothing but the user's cache, so planning with it leaves a stack's files as they were."""
    image_id = engine.image_id(image)
    if image_id is None:
        raise BuildError(f"image {image} does not exist; build it with `podllama build`")
    cache = flags_cache(image_id)
    help_text = (_cached_help(flags_cache(image_id, look_in), image_id) if look_in is not None else None) \
        or _cached_help(cache, image_id)
    if help_text is None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # one reader at a time; the others find the cache
        with cache.with_suffix(".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            help_text = _cached_help(cache, image_id) or _read_help(engine, image, image_id, kind)
    _keep_help(cache, image_id, help_text)
    return FlagSet.parse(help_text, kind.help_indent)


def share_flags(engine: CliEngine, image: str, under: Path) -> None:
    """IMAGE's recorded flags (record_flags kept them in the user's cache) put UNDER: a stack's state directory,
    where the gateway container, which plans config changes, finds them without starting a container. Done
    when a stack's plan is applied."""
    image_id = engine.image_id(image)
    help_text = _cached_help(flags_cache(image_id), image_id) if image_id is not None else None
    if image_id is not None and help_text is not None:
        _keep_help(flags_cache(image_id, under), image_id, help_text)


def _keep_help(cache: Path, image_id: str, help_text: str) -> None:
    if _cached_help(cache, image_id) != help_text:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps({"image": image_id, "help": help_text}))


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


def gateway_tag(engine: CliEngine, root: Path, source_id: str | None = None) -> str:
    return f"{GATEWAY_REPO}:{engine.name}-{source_id or gateway_source_hash(root)}"


def build_gateway(engine: CliEngine, root: Path, base_choice: str, log_dir: Path,
                  progress: Callable[[str], None] = print, on_line: Callable[[str], None] | None = None,
                  source_id: str | None = None) -> str:
    """The gateway image for this podllama source (SOURCE_ID: its hash, where the caller has it) and ENGINE,
    built if it does not exist yet."""
    source_id = source_id or gateway_source_hash(root)
    tag = gateway_tag(engine, root, source_id)
    if engine.image_exists(tag):
        return tag
    base = pick_base(engine, "cpu", base_choice, progress)
    ensure_base(engine, Base(base.runtime, base.runtime, base.kind), progress)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"build-gateway-{time.strftime('%Y%m%d-%H%M%S')}.log"
    progress(f"building the gateway image {tag} (full log: {log_path})")
    labels = {"podllama.version": __version__, "podllama.kind": "gateway", "podllama.base": base.runtime,
              "podllama.engine": engine.name, "podllama.source-id": source_id}
    args = {"BASE": base.runtime, "ENGINE": engine.name}
    if os.environ.get("PIP_INDEX_URL"):
        args["PIP_INDEX_URL"] = os.environ["PIP_INDEX_URL"]
    with log_path.open("w") as log:
        image_id = engine.build(root / "containers" / "Containerfile.gateway", root, args, labels, log, on_line,
                                secrets={"cacert": host_ca_bundle()})
    if image_id is None:
        raise BuildError(f"the gateway image did not build. Full log: {log_path}\n" + _tail(log_path))
    return tag_gateway(engine, image_id, tag)


def tag_gateway(engine: CliEngine, image_id: str, tag: str) -> str:
    """TAG on the gateway image IMAGE_ID (built or pulled); those of older podllama code are not needed again."""
    for old in engine.list_images(GATEWAY_REPO):
        if old["tag"].startswith(f"{engine.name}-"):
            engine.untag(f"{old['repository']}:{old['tag']}")
    engine.tag(image_id, tag)
    return tag
