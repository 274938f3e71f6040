"""The `podllama` command: parses, calls the modules that do the work, prints. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__, config, hardware, images, source
from .config import ConfigError
from .engine import CliEngine, EngineError, get_engine
from .flags import FlagError
from .images import BuildError
from .source import SourceError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Build, run and serve llama.cpp in containers.")
source_app = typer.Typer(no_args_is_help=True, help="The llama.cpp source (a git submodule).")
app.add_typer(source_app, name="source")

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("-c", "--config", help="services.toml to use "
                                                   "(default: $PODLLAMA_CONFIG or ./services.toml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
EngineOpt = Annotated[Optional[str], typer.Option("--engine", help="podman | docker | auto (default: from the config)")]
VariantOpt = Annotated[Optional[str], typer.Option("--variant", help="auto | cpu | cuda | rocm | vulkan")]


def say(message: str) -> None:
    err.print(f"[dim]•[/dim] {message}", highlight=False)


def emit(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def load_config(path: Path | None, required: bool = True) -> config.Config:
    """The stack's config; commands that can work without one get the defaults when no file exists."""
    p = config.config_path(path)
    if not required and path is None and not p.exists():
        return config.Config()
    return config.load(p)


def engine_for(cfg: config.Config, name: str | None) -> CliEngine:
    return get_engine(name or cfg.stack.engine)


# -- detect ---------------------------------------------------------------------------------------------------
@app.command()
def detect(as_json: JsonOpt = False,
           capture: Annotated[Optional[Path], typer.Option(help="Also write what was read into DIR, as a fixture "
                                                                  "tree for tests and bug reports.")] = None) -> None:
    """Detect CPU and GPUs, and the image variants that suit this machine."""
    host: hardware.Host = hardware.LiveHost()
    if capture:
        host = hardware.RecordingHost(host, capture)
    hw = hardware.detect(host)
    if as_json:
        return emit(hw.to_dict())
    c = hw.cpu
    out.print(f"CPU      {c.arch}, {c.cores} cores, {c.model or 'unknown model'}; features: {', '.join(c.features) or 'none'}")
    for g in hw.gpus:
        extra = ", ".join(x for x in [f"{g.memory_mib} MiB" if g.memory_mib else "",
                                      f"compute {g.compute_capability}" if g.compute_capability else "",
                                      g.gfx_target or "", g.render_node or ""] if x)
        out.print(f"GPU      {g.vendor}: {g.name} ({extra}) → {g.backend}")
    if not hw.gpus:
        out.print("GPU      none found")
    for note in hw.notes:
        out.print(f"[yellow]note[/yellow]     {note}")
    out.print(f"variants [bold]{', '.join(hw.variants)}[/bold] (best first)")


# -- source ---------------------------------------------------------------------------------------------------
@source_app.command("status")
def source_status(as_json: JsonOpt = False) -> None:
    """Commit, date and state of the llama.cpp checkout."""
    st = source.status()
    if as_json:
        return emit(st.to_dict())
    if st.commit is None:
        out.print(f"llama.cpp not checked out (pinned {st.pinned}); run `podllama source init`")
        return
    pin = "at the pinned commit" if st.at_pin else f"[yellow]differs from the pin {(st.pinned or '')[:12]}[/yellow]"
    out.print(f"llama.cpp {st.commit[:12]} ({st.date}) {pin}{', [yellow]dirty[/yellow]' if st.dirty else ''}")
    out.print(f"          {st.subject}")
    out.print(f"remote    {st.remote}")


@source_app.command("init")
def source_init(mirror: Annotated[Optional[str], typer.Option(
        help="A local git repository or work tree to check out from, or 'pypi' for the llama.cpp tree inside "
             "llama-cpp-python's source distribution (for sites without GitHub).")] = None) -> None:
    """Check the llama.cpp submodule out at the pinned commit."""
    st = source.init(mirror, progress=say)
    out.print(f"llama.cpp {st.commit[:12] if st.commit else '?'} checked out at {st.path}")


@source_app.command("update")
def source_update(ref: Annotated[str, typer.Option(help="Commit, tag or branch (default: the remote's HEAD)")] = "HEAD",
                  remote: Annotated[Optional[str], typer.Option(help="Fetch from this URL or path instead of origin")] = None,
                  pin: Annotated[bool, typer.Option(help="Also stage the new commit as the project's pin")] = False) -> None:
    """Move the llama.cpp checkout to another commit (no build; `podllama update` builds and restarts safely)."""
    old, new = source.checkout(ref, remote)
    if pin:
        source.pin()
    out.print(f"llama.cpp {old[:12]} → {new[:12]}" + (" (pinned)" if pin else ""))


# -- images ---------------------------------------------------------------------------------------------------
@app.command("base-image")
def base_image(suite: Annotated[str, typer.Option(help="Debian suite: bookworm (cpu) or trixie (vulkan)")] = "bookworm",
               mirror: Annotated[str, typer.Option(help="Debian package mirror")] = "http://deb.debian.org/debian",
               engine: EngineOpt = None, cfg_path: ConfigOpt = None) -> None:
    """Make a Debian base image from packages (debootstrap), for machines that reach no container registry."""
    eng = engine_for(load_config(cfg_path, required=False), engine)
    ref = images.bootstrap_base(eng, suite, mirror, progress=say)
    out.print(f"{ref} ready in {eng.name}; build with `podllama build --base local`")


@app.command()
def build(variant: VariantOpt = None, engine: EngineOpt = None, cfg_path: ConfigOpt = None,
          base: Annotated[Optional[str], typer.Option(
              help="upstream (public registries), local (`podllama base-image`), or IMAGE[,RUNTIME_IMAGE]. "
                   "Default: [build] base, or $PODLLAMA_BASE")] = None,
          native: Annotated[bool, typer.Option("--native", help="Optimise for this machine's CPU only")] = False,
          ui: Annotated[Optional[str], typer.Option(help="auto | on | off: embed llama.cpp's web UI")] = None,
          smoke: Annotated[bool, typer.Option(help="Smoke-test before tagging")] = True,
          as_json: JsonOpt = False) -> None:
    """Build the llama-server image for this machine's hardware from the llama.cpp submodule."""
    cfg = load_config(cfg_path, required=False)
    eng = engine_for(cfg, engine)
    hw = hardware.detect()
    chosen = hardware.resolve_variant(variant or cfg.stack.variant, hw)
    result = _run_build(cfg, eng, chosen, hw, base=base, native=native, ui=ui, smoke=smoke)
    if as_json:
        return emit(result.to_dict())
    out.print(f"[green]built[/green] {', '.join(result.tags)} ({result.image_id[:12]}) in {result.seconds:.0f}s")
    if result.previous:
        out.print(f"previous image kept as {images.REPO}:{chosen}-previous ({result.previous[:12]})")


def _run_build(cfg: config.Config, eng: CliEngine, variant: str, hw: hardware.Hardware, *, base: str | None = None,
               native: bool = False, ui: str | None = None, smoke: bool = True) -> images.BuildResult:
    import os

    gpu = None
    if variant != "cpu" and any(g.backend == variant for g in hw.gpus):
        from .engine import GpuRequest

        gpu = GpuRequest(backend=variant)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(f"building {variant}", total=100)
        return images.build(
            eng, variant, base_choice=base or os.environ.get("PODLLAMA_BASE") or cfg.build.base,
            cpu_target="native" if native else cfg.build.cpu_target, ui_mode=ui or cfg.build.ui,
            cuda_architectures=cfg.build.cuda_architectures or hw.cuda_architectures,
            rocm_targets=cfg.build.rocm_targets or hw.rocm_targets,
            log_dir=cfg.state_path / "logs", smoke=smoke, gpu=gpu, progress=lambda m: bar.console.print(f"[dim]•[/dim] {m}", highlight=False),
            on_percent=lambda p: bar.update(task, completed=p))


@app.command("images")
def list_images(engine: EngineOpt = None, cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The llama-server images podllama built: variant, llama.cpp commit, tags."""
    eng = engine_for(load_config(cfg_path, required=False), engine)
    rows = eng.list_images(images.REPO)
    if as_json:
        return emit(rows)
    table = Table("tag", "image", "created", "size")
    for r in rows:
        table.add_row(f"{r.get('Repository')}:{r.get('Tag')}", str(r.get("ID", ""))[:19].removeprefix("sha256:"),
                      str(r.get("CreatedSince") or r.get("CreatedAt", "")), str(r.get("Size", "")))
    out.print(table)


# -- config ---------------------------------------------------------------------------------------------------
@app.command("check")
def check(cfg_path: ConfigOpt = None, engine: EngineOpt = None,
          with_flags: Annotated[bool, typer.Option("--flags/--no-flags", help="Also check args against the built "
                                                   "image's llama-server flags")] = True) -> None:
    """Validate services.toml (and each server's args against the flags of the image it will run)."""
    from . import flags as flagmod

    cfg = load_config(cfg_path)
    errors, notes = [], []
    if with_flags and cfg.servers:
        eng = engine_for(cfg, engine)
        hw = hardware.detect()
        for name, server in cfg.servers.items():
            tag = images.tag_for(hardware.resolve_variant(server.variant or cfg.stack.variant, hw))
            if not eng.image_exists(tag):
                notes.append(f"servers.{name}: no {tag} image yet to check its args against; run `podllama build`")
                continue
            try:
                flagmod.render(server.args, images.record_flags(eng, tag))
            except FlagError as e:
                errors.append(f"{cfg.source}: servers.{name}.{e}")
    for n in notes:
        err.print(f"[yellow]note:[/yellow] {n}", highlight=False)
    if errors:
        raise FlagError("\n".join(errors))
    out.print(f"{cfg.source}: ok ({len(cfg.servers)} servers)")


@app.command()
def doctor(engine: EngineOpt = None, cfg_path: ConfigOpt = None, variant: VariantOpt = None,
           fix: Annotated[bool, typer.Option("--fix", help="Apply the fixes podllama can make itself")] = False,
           as_json: JsonOpt = False) -> None:
    """Check the engine, its runtime quirks, the API socket, GPU passthrough and base images."""
    import os

    from . import doctor as doc

    cfg = load_config(cfg_path, required=False)
    eng = engine_for(cfg, engine)
    chosen = hardware.resolve_variant(variant or cfg.stack.variant)
    findings = doc.run(eng, chosen, os.environ.get("PODLLAMA_BASE") or cfg.build.base, fix=fix)
    if as_json:
        emit([f.to_dict() for f in findings])
    else:
        for f in findings:
            mark = "[green]fixed[/green]" if f.fixed else ("[green]ok[/green]" if f.ok else "[red]problem[/red]")
            out.print(f"{mark:<22} {f.check}: {f.detail}", highlight=False)
            if f.fix and not f.ok:
                out.print(f"{'':>8}fix: {f.fix}", highlight=False)
    if not all(f.ok for f in findings):
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """podllama's version and the llama.cpp commit it builds."""
    st = source.status()
    out.print(f"podllama {__version__}, llama.cpp {st.commit[:12] if st.commit else 'not checked out'}")


def main() -> None:
    try:
        app()
    except (ConfigError, SourceError, BuildError, EngineError, FlagError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        sys.exit(130)


if __name__ == "__main__":
    main()
