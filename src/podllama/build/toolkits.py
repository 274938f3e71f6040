"""GPU toolkits: what each can compile for, and, for builds on a Debian base made here (`--base local`), the
toolkits pinned in containers/toolkits.lock — CUDA from NVIDIA's wheels on the package index, ROCm from Debian's
own packages — made into a devel and a runtime base image (containers/Containerfile.<variant>-toolkit) the
first time a build needs them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..engine import CliEngine
from . import source
from .bases import LOCAL_BASE
from .errors import BuildError

LOCK = Path("containers") / "toolkits.lock"

# The oldest compute capability each CUDA major version compiles for (nvcc 13 dropped Maxwell, Pascal, Volta)
CUDA_MIN_ARCHITECTURE = {12: 50, 13: 75}


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str

    def requirement(self) -> str:
        return f"{self.name}=={self.version}@{self.sha256}"


@dataclass(frozen=True)
class Toolkit:
    """A GPU toolkit installed on a bootstrapped Debian base: CUDA from WHEELS (unpacked from nvidia/TREE), or
    Debian's own PACKAGES (ROCm), and what the runtime image keeps of them."""

    variant: str
    version: str
    suite: str
    wheels: tuple[Wheel, ...] = ()
    tree: str = ""
    packages: tuple[str, ...] = ()
    runtime_packages: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return {"cuda": "CUDA", "rocm": "ROCm"}.get(self.variant, self.variant)

    @property
    def containerfile(self) -> Path:
        return Path("containers") / f"Containerfile.{self.variant}-toolkit"

    def build_args(self) -> dict[str, str]:
        if self.wheels:
            return {"WHEELS": " ".join(w.requirement() for w in self.wheels), "TREE": self.tree}
        return {"PACKAGES": " ".join(self.packages), "RUNTIME_PACKAGES": " ".join(self.runtime_packages)}

    def id(self, root: Path) -> str:
        """Names exactly what is installed and how: a changed lock or Containerfile makes new images."""
        made = json.dumps(self.build_args(), sort_keys=True) + (root / self.containerfile).read_text()
        return hashlib.sha256(made.encode()).hexdigest()[:12]

    def image(self, target: str) -> str:
        return f"{LOCAL_BASE}:{self.suite}-{self.variant}{self.version}-{target}"

    @property
    def cuda(self) -> tuple[int, int] | None:
        major, minor = self.version.split(".")[:2]
        return (int(major), int(minor)) if self.variant == "cuda" else None

    def describe(self) -> str:
        origin = f"{len(self.wheels)} wheels from the package index" if self.wheels else \
            f"Debian {self.suite}'s packages"
        return f"{self.name} {self.version} ({origin})"


def read(root: Path | None = None) -> dict[str, Toolkit]:
    path = (root or source.project_root()) / LOCK
    try:
        data = tomllib.loads(path.read_text())
        return {variant: Toolkit(variant=variant, version=str(e["version"]), suite=e["suite"], tree=e.get("tree", ""),
                                 wheels=tuple(Wheel(**w) for w in e.get("wheels", ())),
                                 packages=tuple(e.get("packages", ())),
                                 runtime_packages=tuple(e.get("runtime_packages", ())))
                for variant, e in data.items()}
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise BuildError(f"{path}: {e}") from None


def toolkit_of(variant: str, root: Path | None = None) -> Toolkit | None:
    return read(root).get(variant)


def ensure_images(engine: CliEngine, toolkit: Toolkit, progress: Callable[[str], None] = print,
                  root: Path | None = None, log_dir: Path | None = None,
                  targets: tuple[str, ...] = ("devel", "runtime")) -> None:
    """The toolkit's images (TARGETS: devel, runtime), built from the bootstrapped Debian base when missing or
    made from another pin; the base itself must be there (it needs root: `podllama base-image`)."""
    root = root or source.project_root()
    base, made = f"{LOCAL_BASE}:{toolkit.suite}", toolkit.id(root)
    wanted = [t for t in targets if engine.image_labels(toolkit.image(t)).get("podllama.toolkit-id") != made]
    if not wanted:
        return
    if not engine.image_exists(base):
        raise BuildError(f"local base image {base} is missing; create it with `podllama base-image --suite "
                         f"{toolkit.suite}` (the {toolkit.name} toolkit is installed on top of it)")
    from .images import host_ca_bundle

    logs = log_dir or source.cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args = {"BASE": base, "TOOLKIT_ID": made} | toolkit.build_args()  # the Containerfile's label: a cache key
    if os.environ.get("PIP_INDEX_URL"):  # a site's own mirror of the package index
        args["PIP_INDEX_URL"] = os.environ["PIP_INDEX_URL"]
    labels = {"podllama.toolkit": toolkit.describe()}
    context = root / "containers" / "patches"  # any small directory: the Containerfile copies nothing from it
    for target in wanted:
        ref = toolkit.image(target)
        progress(f"making {ref}: {toolkit.describe()} on {base}")
        log_path = logs / f"toolkit-{toolkit.variant}-{target}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        with log_path.open("w") as log:
            image_id = engine.build(root / toolkit.containerfile, context, args, labels, log,
                                    secrets={"cacert": host_ca_bundle()}, target=target)
        if image_id is None:
            raise BuildError(f"the {toolkit.name} toolkit image ({target}) did not build; full log: "
                             f"{log_path}", log=log_path)
        engine.tag(image_id, ref)


def _number(arch: str) -> int:
    """86 of "86", "90a", "120-real" (validate.cuda_architecture checked the form)."""
    return int(re.match(r"\d+", arch).group())  # type: ignore[union-attr]


def check_cuda_architectures(requested: list[str], version: tuple[int, int] | None, base: str) -> None:
    """Refuse, before anything is built, architectures the base's CUDA cannot compile for."""
    floor = CUDA_MIN_ARCHITECTURE.get(version[0]) if version else None
    old = [a for a in requested if floor is not None and _number(a) < floor]
    if version and old:
        raise BuildError(
            f"CUDA {version[0]}.{version[1]} ({base}) cannot build for compute capability {', '.join(old)}: it "
            f"compiles for {floor} and newer. Build for a GPU it supports, or for older GPUs use a CUDA 12 base "
            f"(--base upstream: nvidia/cuda 12.8); [build] cuda_architectures chooses")


def supported(architectures: list[str], version: tuple[int, int] | None) -> list[str]:
    """ARCHITECTURES that a toolkit of VERSION compiles for (the default list, cut to the toolkit)."""
    floor = CUDA_MIN_ARCHITECTURE.get(version[0], 0) if version else 0
    return [a for a in architectures if _number(a) >= floor]
