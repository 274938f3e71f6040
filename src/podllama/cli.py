"""The `podllama` command: parses, calls the modules that do the work, prints. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__, config, hardware, images, source
from .api import ApiError
from .config import ConfigError
from .engine import CliEngine, EngineError, get_engine
from .flags import FlagError
from .hub import PullError
from .images import BuildError
from .source import SourceError
from .stack import Stack, StackError
from .store import StoreError
from .update import UpdateError

# No locals in tracebacks: a token or key can be among them.
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Build, run and serve llama.cpp in containers.")
source_app = typer.Typer(no_args_is_help=True, help="The llama.cpp source (a git submodule).")
app.add_typer(source_app, name="source")
models_app = typer.Typer(no_args_is_help=True, help="The model store: list, remove, verify, import.")
app.add_typer(models_app, name="models")

# Wide enough for tables when the output is a pipe or a CI log (rich assumes 80 columns there).
out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

ConfigOpt = Annotated[Path | None, typer.Option("-c", "--config", help="services.toml to use "
                                                   "(default: $PODLLAMA_CONFIG or ./services.toml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
EngineOpt = Annotated[str | None, typer.Option("--engine", help="podman | docker | auto (default: from the config)")]
VariantOpt = Annotated[str | None, typer.Option("--variant", help="auto | cpu | cuda | rocm | vulkan")]


def say(message: str) -> None:
    err.print(f"[dim]•[/dim] {message}", highlight=False, soft_wrap=True)


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
def detect(as_json: JsonOpt = False, cfg_path: ConfigOpt = None,
           capture: Annotated[Path | None, typer.Option(help="Also write what was read into DIR, as a fixture "
                                                              "tree for tests and bug reports.")] = None) -> None:
    """Detect CPU and GPUs, and the image variants that suit this machine (and what the stack's variant means)."""
    host: hardware.Host = hardware.LiveHost()
    if capture:
        host = hardware.RecordingHost(host, capture)
    hw = hardware.detect(host)
    cfg = load_config(cfg_path, required=False)
    chosen = hardware.resolve_variant(cfg.stack.variant, hw)
    if as_json:
        return emit(hw.to_dict() | {"stack_variant": {"configured": cfg.stack.variant, "resolved": chosen}})
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
    out.print(f"variants [bold]{', '.join(hw.variants)}[/bold] (best first); the stack's variant "
              f"'{cfg.stack.variant}' means [bold]{chosen}[/bold]")


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
def source_init(mirror: Annotated[str | None, typer.Option(
        help="A local git repository or work tree to check out from, or 'pypi' for the llama.cpp tree inside "
             "llama-cpp-python's source distribution (for sites without GitHub).")] = None) -> None:
    """Check the llama.cpp submodule out at the pinned commit."""
    st = source.init(mirror, progress=say)
    out.print(f"llama.cpp {st.commit[:12] if st.commit else '?'} checked out at {st.path}")


@source_app.command("update")
def source_update(ref: Annotated[str, typer.Option(help="Commit, tag or branch (default: the remote's HEAD)")] = "HEAD",
                  remote: Annotated[str | None, typer.Option(help="Fetch from this URL or path instead of origin")] = None,
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
          base: Annotated[str | None, typer.Option(
              help="upstream (public registries), local (`podllama base-image`), or IMAGE[,RUNTIME_IMAGE]. "
                   "Default: [build] base, or $PODLLAMA_BASE")] = None,
          native: Annotated[bool, typer.Option("--native", help="Optimise for this machine's CPU only")] = False,
          ui: Annotated[str | None, typer.Option(help="auto | on | off: embed llama.cpp's web UI")] = None,
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
        out.print(f"previous image kept as {images.previous_tag(chosen, cfg.build.repository)} ({result.previous[:12]})")


def _run_build(cfg: config.Config, eng: CliEngine, variant: str, hw: hardware.Hardware, *, base: str | None = None,
               native: bool = False, ui: str | None = None, smoke: bool = True) -> images.BuildResult:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(f"building {variant}", total=100)
        return images.build_configured(
            eng, cfg, variant, hw, base=base, native=native, ui=ui, smoke=smoke,
            progress=lambda m: bar.console.print(f"[dim]•[/dim] {m}", highlight=False),
            on_percent=lambda p: bar.update(task, completed=p))


@app.command("images")
def list_images(engine: EngineOpt = None, cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The llama-server images podllama built: variant, llama.cpp commit, tags."""
    cfg = load_config(cfg_path, required=False)
    eng = engine_for(cfg, engine)
    rows = eng.list_images(cfg.build.repository)
    if as_json:
        return emit(rows)
    table = Table("tag", "image", "created", "size")
    for r in rows:
        table.add_row(f"{r['repository']}:{r['tag']}", r["id"][:12], r["created"], r["size"])
    out.print(table)


# -- the stack ------------------------------------------------------------------------------------------------
ServersArg = Annotated[list[str] | None, typer.Argument(help="Servers (default: all)", show_default=False)]


def stack_for(cfg_path: Path | None, engine: str | None) -> Stack:
    cfg = load_config(cfg_path)
    return Stack(cfg, engine_for(cfg, engine), progress=say)


@app.command()
def start(servers: ServersArg = None, cfg_path: ConfigOpt = None, engine: EngineOpt = None,
          gateway: Annotated[bool, typer.Option(help="Also run the gateway container")] = True,
          wait: Annotated[bool, typer.Option(help="Wait until every server is healthy")] = True) -> None:
    """Start the stack (or some servers): build missing images, check models, start, wait until healthy."""
    from .api import GatewayAPI

    st = stack_for(cfg_path, engine)
    taken = st.credentials.capture_env()
    if taken:
        say(f"{', '.join(taken)} handed to the gateway as files in {st.credentials.dir} (never in its environment)")
    for variant in st.missing_variants(servers):
        say(f"image {st.image_of(variant)} missing: building it (once; later starts reuse it)")
        _run_build(st.cfg, st.engine, variant, st.hardware)
    plan = st.start(servers, wait=wait, on_state=lambda c, s: say(f"{c}: {s}"))
    out.print(f"servers: {plan.describe()}")
    if gateway:
        url = st.start_gateway(source.project_root())
        try:  # a gateway that kept running reads the config (and keys) just written
            GatewayAPI(st).reload()
        except ApiError as e:
            err.print(f"[yellow]note:[/yellow] {e}", highlight=False)
        out.print(f"gateway: [bold]{url}[/bold] (admin key: {st.credentials.path('admin.key')})")


@app.command()
def stop(servers: ServersArg = None, cfg_path: ConfigOpt = None, engine: EngineOpt = None,
         timeout: Annotated[int, typer.Option("--timeout", "-t", help="Seconds before SIGKILL")] = 10) -> None:
    """Stop servers gracefully (all of them and the gateway when none is named); the supervisor leaves them down."""
    st = stack_for(cfg_path, engine)
    stopped = st.stop(servers, timeout)
    out.print(f"stopped {len(stopped)} containers" if stopped else "nothing was running")


@app.command()
def kill(cfg_path: ConfigOpt = None, engine: EngineOpt = None) -> None:
    """Kill every container of the stack at once, the gateway included."""
    st = stack_for(cfg_path, engine)
    killed = st.kill()
    out.print(f"killed {len(killed)} containers" if killed else "nothing was running")


@app.command()
def restart(servers: ServersArg = None, cfg_path: ConfigOpt = None, engine: EngineOpt = None) -> None:
    """Recreate servers one at a time, each healthy before the next."""
    st = stack_for(cfg_path, engine)
    st.restart(servers, on_state=lambda c, s: say(f"{c}: {s}"))
    out.print("restarted " + ", ".join(st.select(servers)))


@app.command()
def down(cfg_path: ConfigOpt = None, engine: EngineOpt = None) -> None:
    """Remove every container of the stack and its network (models and images stay)."""
    st = stack_for(cfg_path, engine)
    removed = st.down()
    out.print(f"removed {len(removed)} containers and network {st.network}")


@app.command()
def status(cfg_path: ConfigOpt = None, engine: EngineOpt = None, as_json: JsonOpt = False) -> None:
    """Per server: state, health, uptime, restarts, image, commit, model, role."""
    st = stack_for(cfg_path, engine)
    rows = st.status()
    gw = st.engine.inspect(st.gateway_name)
    saved = st.state.read()
    if as_json:
        return emit({"stack": st.name, "servers": rows, "gateway": {
            "container": st.gateway_name, "state": gw.state if gw else "missing", "url": st.gateway_url},
            "last_update": saved.get("last_update")})
    table = Table("server", "role", "state", "health", "uptime", "restarts", "commit", "model")
    for r in rows:
        state = r["state"] + ("" if r["declared"] else " (not declared)")
        if r["desired"] == "stopped" and r["state"] != "running":
            state += " (stopped)"
        table.add_row(f"{r['server']}/{r['replica']}", r["role"], state, r["health"] or "-", _duration(r["uptime_s"]),
                      str(r["restarts"]), r["commit"] or "-", r["model"])
    out.print(table)
    out.print(f"gateway {st.gateway_name}: {gw.state if gw else 'missing'} ({st.gateway_url})")
    for r in rows:
        if r["failed"]:
            out.print(f"[red]{r['container']} failed[/red]: {r['failed']['reason']}\n{r['failed']['logs']}")
    last = saved.get("last_update")
    if last:
        word = "[green]ok[/green]" if last.get("ok") else "[red]failed[/red]"
        out.print(f"last update {word}: {last.get('summary', '')}")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@app.command()
def logs(server: Annotated[str, typer.Argument(help="A server name, or 'gateway'")],
         cfg_path: ConfigOpt = None, engine: EngineOpt = None,
         follow: Annotated[bool, typer.Option("-f", "--follow")] = False,
         tail: Annotated[int | None, typer.Option("--tail", "-n", help="Only the last N lines")] = None,
         replica: Annotated[int, typer.Option(help="Which replica")] = 1) -> None:
    """A server's log (llama-server's own output)."""
    from .stack import container_name

    st = stack_for(cfg_path, engine)
    name = st.gateway_name if server == "gateway" else container_name(st.name, st.select([server])[0], replica)
    if st.engine.inspect(name) is None:
        raise StackError(f"no container {name}; is the stack started (`podllama start`)?")
    try:
        for line in st.engine.logs(name, tail=tail, follow=follow):
            sys.stdout.write(line)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


@app.command()
def update(cfg_path: ConfigOpt = None, engine: EngineOpt = None,
           ref: Annotated[str, typer.Option(help="Commit, tag or branch (default: the remote's newest commit)")] = "HEAD",
           remote: Annotated[str | None, typer.Option(
               help="Fetch from this URL or path instead of the submodule's origin")] = None,
           as_json: JsonOpt = False) -> None:
    """Move llama.cpp to a new commit, build and smoke-test, restart servers one by one; roll back on any failure."""
    from .update import update as run_update

    st = stack_for(cfg_path, engine)
    result = run_update(st, ref, remote, progress=say)
    emit(result.to_dict()) if as_json else out.print(f"[green]updated[/green] {result.summary}")


@app.command()
def rebuild(variant: VariantOpt = None, cfg_path: ConfigOpt = None, engine: EngineOpt = None,
            as_json: JsonOpt = False) -> None:
    """Rebuild the stack's images at the current commit and restart servers on them, with rollback on failure."""
    from .update import rebuild as run_rebuild

    st = stack_for(cfg_path, engine)
    result = run_rebuild(st, [variant] if variant and variant != "auto" else None, progress=say)
    emit(result.to_dict()) if as_json else out.print(f"[green]rebuilt[/green] {result.summary}")


@app.command()
def rollback(variant: VariantOpt = None, cfg_path: ConfigOpt = None, engine: EngineOpt = None) -> None:
    """Go back to the previous image of a variant (`:<variant>-previous`) and restart the servers that use it."""
    st = stack_for(cfg_path, engine)
    chosen = variant if variant and variant != "auto" else st.variant_of(next(iter(st.cfg.servers.values()))) \
        if st.cfg.servers else hardware.resolve_variant(st.cfg.stack.variant)
    image = images.rollback(st.engine, chosen, repo=st.cfg.build.repository)
    out.print(f"{st.image_of(chosen)} → {image[:12]}")
    users = [n for n, s in st.cfg.servers.items() if st.variant_of(s) == chosen]
    if users:
        st.restart(users, on_state=lambda c, s: say(f"{c}: {s}"))
        out.print("restarted " + ", ".join(users))


@app.command()
def endpoints(as_json: JsonOpt = False) -> None:
    """Every llama-server endpoint the gateway serves, from its route table (Markdown, or --json)."""
    from dataclasses import asdict

    from .gateway import help as helpdoc
    from .gateway.routes import ENDPOINTS

    if as_json:
        return emit([asdict(ep) | {"roles": list(ep.roles)} for ep in ENDPOINTS])
    sys.stdout.write(helpdoc.markdown())


@app.command("gateway")
def gateway_cmd(cfg_path: ConfigOpt = None,
                host: Annotated[str | None, typer.Option(help="Bind address (default: [gateway] host)")] = None,
                port: Annotated[int | None, typer.Option(help="Port (default: [gateway] port)")] = None,
                supervise: Annotated[bool, typer.Option(help="Run the supervisor in this process")] = True) -> None:
    """Run the gateway in this process (development; `podllama start` runs it as a container)."""
    import logging
    import os

    from .gateway.app import Gateway
    from .gateway.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = load_config(cfg_path)
    host = host or cfg.gateway.host
    # in a container on the stack's network it binds 0.0.0.0, but clients reach it at the published address
    bound = os.environ.get("PODLLAMA_PUBLISHED_HOST") or host
    gw = Gateway(cfg, supervise=supervise, bound=bound)
    serve(gw, host, port or cfg.gateway.port, gw.limits)


# -- models ---------------------------------------------------------------------------------------------------
def download_bars() -> tuple[Progress, Any]:
    """A rich progress bar per file, for hub.pull's progress callback."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=err, transient=False)
    tasks: dict[str, Any] = {}

    def update(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = bars.add_task(name, total=total or None)
        bars.update(tasks[name], completed=done, total=total or None)

    return bars, update


@app.command()
def pull(ref: Annotated[str, typer.Argument(help="ORG/REPO[:QUANT] or ORG/REPO/FILE.gguf (as llama.cpp's -hf)")],
         cfg_path: ConfigOpt = None,
         revision: Annotated[str | None, typer.Option(help="Branch, tag or commit (default: main)")] = None,
         mmproj: Annotated[bool, typer.Option(help="Also the multimodal projector, when the repo has one")] = True,
         as_json: JsonOpt = False) -> None:
    """Download a model from Hugging Face into the store (resumes; checks every file's sha256)."""
    from . import hub
    from .store import Store

    cfg = load_config(cfg_path, required=False)
    token = hub.token(cfg.hub_token_file)
    bars, update = download_bars()
    with bars:
        m = hub.pull(Store(cfg.models_path), ref, revision=revision, mmproj=mmproj, hf_token=token,
                     hub=cfg.hub.endpoint, progress=update, say=say)
    if as_json:
        return emit(m.to_dict())
    out.print(f"[green]{m.id}[/green] at {(m.revision or '')[:12]}: {len(m.files)} files, {m.size / 2**20:.1f} MiB in "
              f"{cfg.models_path}")
    out.print(f'use it: model = "hf://{m.id}"  (or "{m.model}")')


@models_app.command("list")
def models_list(cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Models in the store: size, source, which servers use them."""
    from .store import Store

    cfg = load_config(cfg_path, required=False)
    from . import hub

    rows = hub.listing(Store(cfg.models_path), cfg.servers)
    if as_json:
        return emit(rows)
    table = Table("model", "size", "source", "revision", "used by")
    for r in rows:
        table.add_row(r["id"], f"{r['size'] / 2**20:.1f} MiB", r["source"], (r["revision"] or "")[:12],
                      ", ".join(r["used_by"]) or "-")
    out.print(table)


@models_app.command("rm")
def models_rm(model_id: Annotated[str, typer.Argument(help="A model id from `podllama models list`")],
              cfg_path: ConfigOpt = None, engine: EngineOpt = None,
              force: Annotated[bool, typer.Option("--force", help="Stop the servers that use it first")] = False) -> None:
    """Remove a model from the store; refused while a running server uses it (unless --force)."""
    cfg = load_config(cfg_path, required=False)
    removed, stopped = Stack(cfg, engine_for(cfg, engine), progress=say).remove_model(model_id, force)
    out.print(f"removed {model_id} ({len(removed)} files)" + (f"; stopped {', '.join(stopped)}" if stopped else ""))


@models_app.command("verify")
def models_verify(model_id: Annotated[str | None, typer.Argument(help="One model (default: all)")] = None,
                  cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Re-check every byte of the stored models against their manifests (sizes and sha256)."""
    from .store import Store

    cfg = load_config(cfg_path, required=False)
    report = Store(cfg.models_path).verify(model_id)
    if as_json:
        emit(report)
    else:
        for mid, problems in report.items():
            out.print(f"[green]ok[/green]      {mid}" if not problems else f"[red]damaged[/red] {mid}: {'; '.join(problems)}")
    if any(report.values()):
        raise typer.Exit(1)


@models_app.command("import")
def models_import(file: Annotated[Path, typer.Argument(help="A local GGUF file")], cfg_path: ConfigOpt = None,
                  name: Annotated[str | None, typer.Option(help="Its name in the store (default: the file's)")] = None) -> None:
    """Copy a local GGUF into the store and record it (checked before it takes its name)."""
    from .store import Store

    cfg = load_config(cfg_path, required=False)
    m = Store(cfg.models_path).import_file(file, name)
    out.print(f'imported {m.id}: model = "{m.model}"')


@models_app.command("usage")
def models_usage(cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Disk used by the store, downloads in progress, and free space."""
    from .store import Store

    cfg = load_config(cfg_path, required=False)
    u = Store(cfg.models_path).usage()
    if as_json:
        return emit(u)
    out.print(f"{u['path']}: {u['models']} models, {u['bytes'] / 2**30:.2f} GiB "
              f"({u['partial_bytes'] / 2**20:.1f} MiB partial downloads); {u['disk_free_bytes'] / 2**30:.1f} GiB free")


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

    from . import doctor as doc

    cfg = load_config(cfg_path, required=False)
    eng = engine_for(cfg, engine)
    chosen = hardware.resolve_variant(variant or cfg.stack.variant)
    findings = doc.run(eng, chosen, images.base_choice(cfg), fix=fix)
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
    except (ConfigError, SourceError, BuildError, EngineError, FlagError, StackError, UpdateError, PullError, StoreError,
            ApiError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        sys.exit(130)


if __name__ == "__main__":
    main()
