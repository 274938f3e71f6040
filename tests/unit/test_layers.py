"""The folders are layers, and imports only run downward: a part may use the parts below it, never one above
(imports made for type checking alone aside). docs/architecture.md draws the same table."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "src" / "podllama"
# bottom first; a module belongs to the longest prefix listed
LAYERS = [
    ["podllama", "podllama.atomic", "podllama.units", "podllama.validate", "podllama.progress"],
    ["podllama.config"],  # services.toml, the server programs
    ["podllama.engine"],  # Podman and Docker, the machine's hardware, health probes
    ["podllama.models"],  # the model store, Hugging Face, GGUF files, memory estimates
    ["podllama.build"],  # images: sources, Containerfiles, builds, pushes, doctor
    ["podllama.access"],  # credentials, keys, the database, usage
    ["podllama.stack", "podllama.api"],  # a stack's containers, state, supervision, changes, exports
    ["podllama.gateway.front"],  # what every request passes: HTTP server, guard, bodies, the upstream client
    ["podllama.gateway.routing"],  # the route table, server handles, discovery, loading, proxying, accounting
    ["podllama.gateway.apis"],  # the gateway's own APIs: management, Ollama, help, dashboard
    ["podllama.gateway"],  # the app that joins them
    ["podllama.cli"],
]


def layer_of(module: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found is not None, module
    return found


def module_of(path: Path) -> tuple[str, str]:
    """(module, its package)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), ".".join(parts[:-1])
    return ".".join(parts), ".".join(parts[:-1])


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of podllama's own in PATH, outside `if TYPE_CHECKING:` blocks."""
    module, package = module_of(path)
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.split(".")[0] != "podllama":
            continue
        for alias in node.names:  # `from . import x` names a module
            full = f"{target}.{alias.name}"
            is_module = (PACKAGE.parent / full.replace(".", "/")).with_suffix(".py").exists() or \
                (PACKAGE.parent / full.replace(".", "/") / "__init__.py").exists()
            out.append((node.lineno, full if is_module else target))
    return out


def test_imports_only_run_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, _ = module_of(path)
        for line, target in imports(path):
            if layer_of(target) > layer_of(module):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_package_root_holds_only_a_handful_of_modules():
    root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert root == ["__init__", "api", "atomic", "cli", "progress", "units", "validate"], root


def test_every_module_belongs_to_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_of(path)[0])


def test_the_architecture_diagram_is_drawn_from_the_code_as_it_is():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "architecture.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# Python named from outside the package: shell scripts, CI, Containerfiles, benches and the docs' commands
OUTSIDE = ["scripts", ".ci", ".github", "containers", "bench", "docs", "README.md", "Makefile"]
REFERENCE = re.compile(r"from (podllama(?:\.\w+)*) import ([\w, ]+)|python3? -m (podllama(?:\.\w+)+)")


def outside_references() -> list[tuple[str, str, list[str]]]:
    """(where, module, names) for every `from podllama… import …` and `-m podllama.…` outside src/."""
    found = []
    for top in OUTSIDE:
        base = ROOT / top
        paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        for path in paths:
            if path.suffix in {".png", ".jpg", ".gguf", ".json", ".lock"}:
                continue
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            for n, line in enumerate(text.splitlines(), 1):
                for m in REFERENCE.finditer(line):
                    module = m.group(1) or m.group(3)
                    names = [x.strip() for x in (m.group(2) or "").split(",") if x.strip() and x.strip() != "as"]
                    found.append((f"{path.relative_to(ROOT)}:{n}", module, [x.split()[0] for x in names]))
    return found


def test_every_name_used_from_outside_the_package_exists():
    """A module moved inside the package must take its callers in scripts/, .ci/ and bench/ with it: the setup
    script once imported a module from its old place and only CI found out."""
    refs = outside_references()
    assert any("scripts/setup.sh" in where for where, _, _ in refs)  # the walk sees the shell scripts
    missing = []
    for where, module, names in refs:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{where}: {module}: {e}")
            continue
        for name in names:
            if not hasattr(mod, name) and importlib.util.find_spec(f"{module}.{name}") is None:
                missing.append(f"{where}: {module} has no {name}")
    assert not missing, "\n".join(missing)
