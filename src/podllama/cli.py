"""The `podllama` command: parses, calls the modules that do the work, prints. Nothing else lives here.

Exit codes: 0 done; 1 an error podllama explains (one line: what, why, the fix — under --json, as JSON on
stdout); 2 a usage error (an unknown option, a missing argument); 130 interrupted (Ctrl-C). `models verify`
and `doctor` exit 1 when they find a problem.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, config
from .access import tls
from .access.database import Database, DatabaseError
from .access.keys import KeyProblem
from .api import ApiError, GatewayAPI
from .build import bases, images, source
from .build import push as pushes
from .build.errors import BuildError
from .build.flags import FlagError
from .build.push import PushError
from .build.source import SourceError
from .config import Config, ConfigError, kinds
from .config.kinds import KINDS, Kind
from .engine import CliEngine, EngineError, get_engine, hardware
from .models.gguf_meta import GGUFError
from .models.hub import PullError
from .models.store import StoreError
from .progress import Step, Steps
from .stack import Stack, StackError
from .stack.export import ExportError
from .stack.service import ServiceError
from .stack.spec import user_flags
from .stack.update import UpdateError
from .units import human

# No locals in tracebacks: a token or key can be among them (and unexpected errors print one line anyway).
app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Build, run and serve llama.cpp in containers.")
source_app = typer.Typer(no_args_is_help=True, help="The llama.cpp source (a git submodule).")
app.add_typer(source_app, name="source")
models_app = typer.Typer(no_args_is_help=True, help="The model store: list, remove, verify, import.")
app.add_typer(models_app, name="models")
service_app = typer.Typer(no_args_is_help=True, help="Start the stack with the machine (a systemd unit).")
app.add_typer(service_app, name="service")
keys_app = typer.Typer(no_args_is_help=True, help="Keys for the gateway: scopes, limits, expiry (stored hashed).")
app.add_typer(keys_app, name="keys")

# Wide enough for tables when the output is a pipe or a CI log (rich assumes 80 columns there).
out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

ConfigOpt = Annotated[Path | None, typer.Option("-c", "--config", help="services.toml to use "
                                                   "(default: $PODLLAMA_CONFIG or ./services.toml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts (errors too).")]
EngineOpt = Annotated[str | None, typer.Option("--engine", help="podman | docker | auto (default: from the config)")]
VariantOpt = Annotated[str | None, typer.Option("--variant", help="auto | cpu | cuda | rocm | vulkan")]
ServersArg = Annotated[list[str] | None, typer.Argument(help="Servers (default: all)", show_default=False)]
ROOT_ONLY = ("podllama runs its stacks as root (rootful Podman or Docker; rootless Podman is not supported yet): "
             "run it with sudo, e.g. `sudo podllama {command}`")


def say(message: str) -> None:
    err.print(f"[dim]•[/dim] {escape(message)}", highlight=False, soft_wrap=True)


def emit(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def show(as_json: bool, data: Any, text: str) -> None:
    """DATA as JSON, or TEXT for a person."""
    emit(data) if as_json else out.print(text, highlight=False)


def load_config(path: Path | None, required: bool = True) -> config.Config:
    """The stack's config; commands that can work without one get the defaults when no file exists."""
    p = config.config_path(path)
    if not required and path is None and not p.exists():
        return config.Config()
    return config.load(p)


def engine_for(cfg: config.Config, name: str | None) -> CliEngine:
    if os.geteuid() != 0:
        raise RootRequired(ROOT_ONLY.format(command=" ".join(sys.argv[1:3])))
    return get_engine(name or cfg.stack.engine)


def stack_for(cfg_path: Path | None, engine: str | None) -> Stack:
    cfg = load_config(cfg_path)
    return Stack(cfg, engine_for(cfg, engine), progress=say)


class RootRequired(Exception):
    pass


# -- the command itself -----------------------------------------------------------------------------------------
def _version(value: bool) -> None:
    if value:
        st = source.status()
        out.print(f"podllama {__version__}, llama.cpp {st.commit[:12] if st.commit else 'not checked out'}")
        raise typer.Exit()


@app.callback()
def podllama(cfg_path: ConfigOpt = None,
             version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                                   help="Print podllama's version and exit.")] = False) -> None:
    """Build, run and serve llama.cpp in containers."""
    if cfg_path is not None:  # before the subcommand: the same as after it
        os.environ[config.CONFIG_ENV] = str(cfg_path)


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
    out.print(f"CPU      {c.arch}, {c.cores} cores, {c.model or 'unknown model'}; "
              f"features: {', '.join(c.features) or 'none'}")
    for g in hw.gpus:
        extra = ", ".join(x for x in [f"{g.memory_mib} MiB" if g.memory_mib else "",
                                      f"compute {g.compute_capability}" if g.compute_capability else "",
                                      g.gfx_target or "", g.render_node or ""] if x)
        out.print(f"GPU      {g.vendor}: {g.name} ({extra}) → {g.backend}")
    if not hw.gpus:
        out.print("GPU      none found")
    for note in hw.notes:
        out.print(f"[yellow]note[/yellow]     {escape(note)}")
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
             "llama-cpp-python's source distribution (for sites without GitHub).")] = None,
        as_json: JsonOpt = False) -> None:
    """Check the llama.cpp submodule out at the pinned commit."""
    st = source.init(mirror, progress=say)
    show(as_json, st.to_dict(), f"llama.cpp {st.commit[:12] if st.commit else '?'} checked out at {st.path}")


@source_app.command("update")
def source_update(ref: Annotated[str, typer.Option(help="Commit, tag or branch (default: the remote's HEAD)")] = "HEAD",
                  remote: Annotated[str | None, typer.Option(help="Fetch from this URL or path instead of origin")] = None,
                  pin: Annotated[bool, typer.Option(help="Also stage the new commit as the project's pin")] = False,
                  as_json: JsonOpt = False) -> None:
    """Move the llama.cpp checkout to another commit (no build; `podllama update` builds and restarts safely)."""
    old, new = source.checkout(ref, remote)
    if pin:
        source.pin()
    show(as_json, {"old": old, "new": new, "pinned": pin}, f"llama.cpp {old[:12]} → {new[:12]}" + (" (pinned)" if pin else ""))


# -- images ---------------------------------------------------------------------------------------------------
@app.command("base-image")
def base_image(suite: Annotated[str, typer.Option(
                   help="Debian suite: bookworm (cpu, cuda), trixie (vulkan) or forky (rocm)")] = "bookworm",
               mirror: Annotated[str, typer.Option(help="Debian package mirror")] = "http://deb.debian.org/debian",
               engine: EngineOpt = None, cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Make a Debian base image from packages (debootstrap), for machines that reach no container registry."""
    eng = engine_for(load_config(cfg_path, required=False), engine)
    steps = Steps(err)
    with steps.step(f"Debian {suite} base image (debootstrap)") as s:
        ref = bases.bootstrap_base(eng, suite, mirror, progress=s.say, on_line=lambda line: s.advance(None, None, line))
    show(as_json, {"image": ref, "engine": eng.name},
         escape(f'{ref} ready in {eng.name}; builds use it where no registry is reachable ([build] base = '
                "\"auto\"), or always with [build] base = \"local\""))


TargetOpt = Annotated[str | None, typer.Option(
    "--cpu-target", help="native (this machine's CPU; the default for images built here) or portable (every CPU "
                         "of the architecture: for images meant for other machines)")]


def build_variant(step: Step, cfg: config.Config, eng: CliEngine, variant: str, hw: hardware.Hardware, *,
                  base: str | None = None, target: str | None = None, ui: str | None = None,
                  smoke: bool = True, kind: Kind = KINDS["llama"], fresh: bool = False) -> images.BuildResult:
    """One image build, its output read for progress (objects compiled n/N) by STEP."""
    return images.build_configured(eng, cfg, variant, hw, base=base, target=target, ui=ui, smoke=smoke, kind=kind,
                                   fresh=fresh, progress=step.say, on_line=step.on_build_line)


def kind_option(name: str | None) -> Kind:
    try:
        return kinds.named(name or "llama")
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


KindOpt = Annotated[str | None, typer.Option("--kind", help=f"The server program: {', '.join(KINDS)} (default: "
                                                            "llama, llama.cpp's llama-server); build: also gateway")]


@app.command()
def build(variant: VariantOpt = None, engine: EngineOpt = None, cfg_path: ConfigOpt = None,
          base: Annotated[str | None, typer.Option(
              help="auto (upstream where a registry gives it, else local), upstream (public registries), local "
                   "(`podllama base-image`), or IMAGE[,RUNTIME_IMAGE]. "
                   "Default: [build] base, or $PODLLAMA_BASE")] = None,
          native: Annotated[bool, typer.Option("--native", help="Same as --cpu-target native")] = False,
          portable: Annotated[bool, typer.Option("--portable", help="Same as --cpu-target portable")] = False,
          cpu_target: TargetOpt = None,
          ui: Annotated[str | None, typer.Option(help="auto | on | off: embed llama.cpp's web UI")] = None,
          smoke: Annotated[bool, typer.Option(help="Smoke-test before tagging")] = True,
          fresh: Annotated[bool, typer.Option("--fresh", help="Use no cached layer and compile everything again "
                                                              "(refreshing the compiler cache)")] = False,
          kind: KindOpt = None,
          push: Annotated[str | None, typer.Option(
              "--push", metavar="REGISTRY/NAME", help="Then push it as REGISTRY/NAME:<variant>-<commit> and "
              ":<variant>, and record the digest in images.lock (builds for any CPU unless --native)")] = None,
          tls_verify: Annotated[bool, typer.Option(help="Podman: require TLS from the registry")] = True,
          as_json: JsonOpt = False) -> None:
    """Build a server image for this machine's hardware: llama-server from the llama.cpp submodule, or (--kind)
    whisper-server, sd-server or the speech server from the sources pinned in containers/sources.lock."""
    cfg = load_config(cfg_path, required=False)
    eng = engine_for(cfg, engine)
    if kind == "gateway":
        given = [o for o, v in (("--variant", variant), ("--native", native), ("--portable", portable),
                                ("--cpu-target", cpu_target), ("--ui", ui), ("--fresh", fresh)) if v]
        if given:
            raise typer.BadParameter(f"the gateway image has no {', '.join(given)}: it is made for an engine "
                                     "(--engine)", param_hint="--kind gateway")
        return build_gateway(cfg, eng, base, push, tls_verify, as_json)
    hw = hardware.detect()
    k = kind_option(kind)
    chosen = hardware.resolve_variant(variant or cfg.stack.variant, hw)
    target = cpu_target or ("native" if native else "portable" if portable else None)
    if push is not None:
        pushes.repository(push)  # a bad name is refused before the build
        target = target or "portable"  # meant for other machines
    steps = Steps(err)
    with steps.step(f"build the {chosen} {k.program} image") as s:
        result = build_variant(s, cfg, eng, chosen, hw, base=base, target=target, ui=ui, smoke=smoke, kind=k,
                               fresh=fresh)
    pushed = None
    if push is not None:
        with steps.step(f"push to {push}") as s:
            pushed = pushes.push(eng, result.image_id, push, chosen, result.commit, k.name, cfg.root / pushes.LOCK,
                                   tls_verify=tls_verify, progress=s.say)
    if as_json:
        return emit(result.to_dict() | {"pushed": pushed})
    if pushed is not None:
        say_pushed(pushed, cfg)
    out.print(f"[green]built[/green] {', '.join(result.tags)} ({result.image_id[:12]}) in {result.seconds:.0f}s")
    if result.previous:
        out.print(f"previous image kept as {images.previous_tag(chosen, k.repository(cfg.build.repository))} "
                  f"({result.previous[:12]})")


def say_pushed(pushed: dict[str, Any], cfg: config.Config) -> None:
    out.print(f"[green]pushed[/green] {', '.join(pushed['tags'])} = {pushed['ref']} (recorded in "
              f"{cfg.root / pushes.LOCK})")


def build_gateway(cfg: config.Config, eng: CliEngine, base: str | None, push: str | None, tls_verify: bool,
                  as_json: bool) -> None:
    """`build --kind gateway`: the gateway image of this checkout's podllama code for ENG, pushed like a server's
    (its variant the engine, its commit the code's hash) so that machines pull it instead of building it."""
    root = source.project_root()
    if push is not None:
        pushes.repository(push)
    steps = Steps(err)
    with steps.step(f"the gateway image for {eng.name}") as s:
        source_id = images.gateway_source_hash(root)
        tag = images.build_gateway(eng, root, images.base_choice(cfg, base), cfg.state_path / "logs",
                                   progress=s.say, on_line=s.on_build_line, source_id=source_id)
    pushed = None
    if push is not None:
        with steps.step(f"push to {push}") as s:
            pushed = pushes.push(eng, tag, push, eng.name, source_id, "gateway",
                                 cfg.root / pushes.LOCK, tls_verify=tls_verify, progress=s.say)
    if as_json:
        return emit({"image": tag, "image_id": eng.image_id(tag), "pushed": pushed})
    if pushed is not None:
        say_pushed(pushed, cfg)
    out.print(f"[green]gateway image[/green] {tag}")


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
def download_progress(step: Step) -> Any:
    return lambda name, done, total: step.advance(done >> 20, total >> 20 if total else None, f"MiB {name}")


def ensure_tls(cfg: Config) -> tuple[tls.Tls | None, str | None]:
    """The gateway's certificate ready (made where self-signed and missing), or a clear error before anything
    starts."""
    try:
        return tls.ensure(cfg)
    except tls.TlsError as e:
        raise StackError(str(e)) from None


def tls_facts(material: tls.Tls | None) -> dict[str, str] | None:
    """The certificate a client should trust, by path and fingerprint (None: plain HTTP)."""
    if material is None or not material.cert.is_file():
        return None
    return {"cert": str(material.cert), "fingerprint": material.fingerprint(),
            "kind": "self-signed" if material.self_signed else "files"}


def say_tls(material: tls.Tls | None) -> None:
    """The certificate clients should trust, for people (nothing for plain HTTP)."""
    if (facts := tls_facts(material)) is not None:
        out.print(f"TLS certificate {facts['cert']}, SHA-256 {facts['fingerprint']}")


@app.command()
def start(servers: ServersArg = None, cfg_path: ConfigOpt = None, engine: EngineOpt = None,
          gateway: Annotated[bool, typer.Option(help="Also run the gateway container")] = True,
          wait: Annotated[bool, typer.Option(help="Wait until every server is healthy")] = True,
          as_json: JsonOpt = False) -> None:
    """Start the stack (or some servers): check, build what is missing, start, wait until healthy."""
    st = stack_for(cfg_path, engine)
    steps = Steps(err)
    material = None
    taken = st.credentials.capture_env()
    if taken:
        say(f"{', '.join(taken)} handed to the gateway as files in {st.credentials.dir} (never in its environment)")
    with steps.step("check the config, models, GPUs and the gateway's port") as s:
        if gateway:  # (before the port check, which speaks HTTPS with it)
            material, made = ensure_tls(st.cfg)
            if made:
                s.say(made)
        st.preflight(servers, gateway=gateway, download=download_progress(s))
    for k, variant in st.missing_images(servers):
        with steps.step(f"get the {variant} {k.program} image (once; later starts reuse it)") as s:
            if not pushes.from_lock(st.engine, st.cfg, k, variant, say=s.say):
                build_variant(s, st.cfg, st.engine, variant, st.hardware, kind=k)
    with steps.step("start the servers") as s:
        plan = st.start(servers, wait=wait, on_state=lambda c, state: s.say(f"{c}: {state}"), pull=False)
    url = None
    if gateway:
        with steps.step("start the gateway") as s:
            url = st.gateway.start(source.project_root(), on_line=s.on_build_line)
            try:  # a gateway that kept running reads the config (and keys) just written
                GatewayAPI(st.cfg).reload()
            except ApiError as e:
                s.say(f"note: {e}")
    steps.summary()
    key = st.credentials.path("admin.key")
    if as_json:
        return emit({"servers": plan.to_dict(), "gateway": url, "admin_key_file": str(key), "steps": steps.as_json(),
                     "tls": tls_facts(material)})
    out.print(f"servers: {plan.describe()}")
    if url:
        out.print(f"gateway: [bold]{url}[/bold]   (try `podllama run \"Hello\"`; admin key in {key})")
        say_tls(material)


@app.command()
def stop(servers: ServersArg = None, cfg_path: ConfigOpt = None, engine: EngineOpt = None,
         timeout: Annotated[int, typer.Option("--timeout", "-t", help="Seconds before SIGKILL")] = 10,
         as_json: JsonOpt = False) -> None:
    """Stop servers gracefully (all of them and the gateway when none is named); the supervisor leaves them down."""
    stopped = stack_for(cfg_path, engine).stop(servers, timeout)
    show(as_json, {"stopped": stopped}, f"stopped {len(stopped)} containers" if stopped else "nothing was running")


@app.command()
def kill(cfg_path: ConfigOpt = None, engine: EngineOpt = None, as_json: JsonOpt = False) -> None:
    """Kill every container of the stack at once, the gateway included."""
    killed = stack_for(cfg_path, engine).kill()
    show(as_json, {"killed": killed}, f"killed {len(killed)} containers" if killed else "nothing was running")


@app.command()
def restart(servers: ServersArg = None, cfg_path: ConfigOpt = None, engine: EngineOpt = None,
            as_json: JsonOpt = False) -> None:
    """Recreate servers one at a time, each healthy before the next."""
    st = stack_for(cfg_path, engine)
    st.restart(servers, on_state=lambda c, s: say(f"{c}: {s}"))
    names = st.select(servers)
    show(as_json, {"restarted": names}, "restarted " + ", ".join(names))


@app.command()
def load(server: Annotated[str, typer.Argument(help="An on-demand server")], cfg_path: ConfigOpt = None,
         as_json: JsonOpt = False) -> None:
    """Load an on-demand server now, as its first request would (room made within the memory budget)."""
    cfg = load_config(cfg_path)
    result = GatewayAPI(cfg, timeout=cfg.gateway.load_timeout + 30).admin("POST", f"/servers/{server}/load")
    show(as_json, result, f"{server}: {result['status']['value']}")


@app.command()
def unload(server: Annotated[str, typer.Argument(help="An on-demand server")], cfg_path: ConfigOpt = None,
           as_json: JsonOpt = False) -> None:
    """Stop an on-demand server (its prompt caches saved); its next request loads it again."""
    cfg = load_config(cfg_path)
    result = GatewayAPI(cfg, timeout=120).admin("POST", f"/servers/{server}/unload")
    show(as_json, result, f"{server}: {'unloaded' if result['was_loaded'] else 'was not loaded'}")


@app.command()
def down(cfg_path: ConfigOpt = None, engine: EngineOpt = None, as_json: JsonOpt = False) -> None:
    """Remove every container of the stack and its network (models and images stay)."""
    st = stack_for(cfg_path, engine)
    removed = st.down()
    show(as_json, {"removed": removed, "network": st.network}, f"removed {len(removed)} containers and network {st.network}")


@app.command()
def status(cfg_path: ConfigOpt = None, engine: EngineOpt = None, as_json: JsonOpt = False) -> None:
    """Per server: state, health, uptime, restarts, image, commit, model, role, the defaults podllama chose."""
    st = stack_for(cfg_path, engine)
    rows = st.status()
    gw = st.engine.inspect(st.gateway.name)
    saved = st.state.read()
    if as_json:
        return emit({"stack": st.name, "servers": rows, "gateway": {
            "container": st.gateway.name, "state": gw.state if gw else "missing", "url": st.gateway.url,
            "restarts": gw.restarts if gw else 0, "tls": tls_facts(tls.of(st.cfg))},
            "last_update": saved.get("last_update"), "engine_problem": saved.get("engine_problem"),
            "engine_back": saved.get("engine_back")})
    table = Table("server", "role", "state", "health", "uptime", "restarts", "memory", "last use", "commit", "model")
    for r in rows:
        state = r["state"] + ("" if r["declared"] else " (not declared)")
        if r["desired"] == "stopped" and r["state"] != "running":
            state += " (stopped)"
        elif r["desired"] == "unloaded" and r["state"] != "running":
            state = "unloaded (on demand)"
        last_use = f"{_duration(r['idle_s'])} ago" if r.get("idle_s") is not None else "-"
        table.add_row(f"{r['server']}/{r['replica']}", r["role"], state, r["health"] or "-", _duration(r["uptime_s"]),
                      str(r["restarts"]), _memory(r.get("memory")), last_use, r["commit"] or "-",
                      r["model"])
    out.print(table)
    restarted = f", restarted {gw.restarts} times by the engine" if gw and gw.restarts else ""
    out.print(f"gateway {st.gateway.name}: {gw.state if gw else 'missing'} ({st.gateway.url}){restarted}")
    say_tls(tls.of(st.cfg))
    if problem := saved.get("engine_problem"):
        out.print(f"[red]supervision paused[/red] since {_clock(problem['since'])}: the gateway cannot reach "
                  f"{st.engine.name}'s API ({escape(problem['error'])}); requests still reach the servers that run. "
                  "Fix: `podllama doctor --fix`", highlight=False)
    elif (back := saved.get("engine_back")) and time.time() - back["at"] < 24 * 3600:
        out.print(f"[dim]supervision was paused from {_clock(back['since'])} to {_clock(back['at'])} (the gateway "
                  f"could not reach {st.engine.name}'s API: {escape(back['error'])})[/dim]", highlight=False)
    for r in rows:
        if r.get("chosen"):
            out.print(f"[dim]{r['container']}: {escape(r['chosen'])}[/dim]", highlight=False)
        if (r.get("memory") or {}).get("context"):
            out.print(f"[dim]{r['container']}: fitted context {r['memory']['context']} tokens per request (read "
                      "from the server's /props)[/dim]", highlight=False)
        if r["failed"]:
            out.print(f"[red]{r['container']} failed[/red]: {escape(r['failed']['reason'])}\n{escape(r['failed']['logs'])}")
    last = saved.get("last_update")
    if last:
        word = "[green]ok[/green]" if last.get("ok") else "[red]failed[/red]"
        out.print(f"last update {word}: {escape(last.get('summary', ''))}")
        check = last.get("check")
        if check:
            out.print(f"[dim]  conformance check: {escape(check.get('summary', ''))} ({escape(str(check.get('report')))})"
                      "[/dim]", highlight=False)


def _memory(figures: dict[str, Any] | None) -> str:
    """"312 MiB" measured, "~350 MiB" estimated (per device where there are several)."""
    if not figures:
        return "-"
    measured, estimate = figures.get("measured") or {}, figures.get("estimate") or {}
    parts = [(f"{human(measured[d])}" if d in measured else f"~{human(estimate[d])}") + ("" if d == "cpu" else f" {d}")
             for d in dict.fromkeys([*estimate, *measured])]
    return ", ".join(parts) or "-"


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


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
    name = st.gateway.name if server == "gateway" else container_name(st.name, st.select([server])[0], replica)
    if st.engine.inspect(name) is None:
        raise StackError(f"no container {name}; is the stack started (`podllama start`)?")
    for line in st.engine.logs(name, tail=tail, follow=follow):
        sys.stdout.write(line)
        sys.stdout.flush()


NoCheckOpt = Annotated[bool, typer.Option("--no-check", help=(
    "Roll out without comparing the new build with the running one on shadow servers ([update] check)"))]


def rolling(step: Step, st: Stack, target: str | None = None) -> Any:
    """The build an update or rebuild makes, reporting to STEP (TARGET: a CPU target other than the image's)."""
    return lambda variant: build_variant(step, st.cfg, st.engine, variant, st.hardware, target=target)


@app.command()
def update(cfg_path: ConfigOpt = None, engine: EngineOpt = None,
           ref: Annotated[str, typer.Option(help="Commit, tag or branch (default: the remote's newest commit)")] = "HEAD",
           remote: Annotated[str | None, typer.Option(
               help="Fetch from this URL or path instead of the submodule's origin")] = None,
           check_only: Annotated[bool, typer.Option("--check", help=(
               "Only build the new commit and compare it with the running build on shadow servers; change "
               "nothing (exit 1 when they differ)"))] = False,
           no_check: NoCheckOpt = False, as_json: JsonOpt = False) -> None:
    """Move llama.cpp to a new commit, build and smoke-test, check it answers as the running build does (shadow
    servers, [update]), restart servers one by one; roll back on any failure."""
    from .stack.update import update as run_update

    st = stack_for(cfg_path, engine)
    steps = Steps(err)
    with steps.step(f"{'check' if check_only else 'update'} llama.cpp at {ref}") as s:
        result = run_update(st, ref, remote, progress=s.say, build=rolling(s, st), check=False if no_check else None,
                            only_check=check_only)
    steps.summary()
    word = ("[green]no differences[/green]" if result.ok else "[red]differences[/red]") if check_only else \
        "[green]updated[/green]"
    show(as_json, result.to_dict(), f"{word} {escape(result.summary)}")
    if check_only and result.check:
        out.print(f"report: {escape(str(result.check.get('report')))}")
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def rebuild(variant: VariantOpt = None, cfg_path: ConfigOpt = None, engine: EngineOpt = None,
            native: Annotated[bool, typer.Option("--native", help="Same as --cpu-target native")] = False,
            portable: Annotated[bool, typer.Option("--portable", help="Same as --cpu-target portable")] = False,
            cpu_target: TargetOpt = None, no_check: NoCheckOpt = False, as_json: JsonOpt = False) -> None:
    """Rebuild the stack's images at the current commit and restart servers on them, with rollback on failure.
    --native replaces an image built for any CPU (one pulled from CI's registry) with one for this machine's."""
    from .stack.update import rebuild as run_rebuild

    st = stack_for(cfg_path, engine)
    steps = Steps(err)
    target = cpu_target or ("native" if native else "portable" if portable else None)
    with steps.step("rebuild the stack's images") as s:
        result = run_rebuild(st, [variant] if variant and variant != "auto" else None, progress=s.say,
                             build=rolling(s, st, target), check=False if no_check else None)
    steps.summary()
    show(as_json, result.to_dict(), f"[green]rebuilt[/green] {escape(result.summary)}")


@app.command()
def rollback(variant: VariantOpt = None, cfg_path: ConfigOpt = None, engine: EngineOpt = None,
             kind: KindOpt = None, as_json: JsonOpt = False) -> None:
    """Go back to the previous image of a variant (`:<variant>-previous`) and restart the servers that use it."""
    st = stack_for(cfg_path, engine)
    k = kind_option(kind)
    mine = [s for s in st.cfg.servers.values() if s.kind == k]
    chosen = variant if variant and variant != "auto" else st.variant_of(mine[0]) \
        if mine else hardware.resolve_variant(st.cfg.stack.variant)
    image = images.rollback(st.engine, chosen, repo=k.repository(st.cfg.build.repository))
    users = [n for n, s in st.cfg.servers.items() if s.kind == k and st.variant_of(s) == chosen]
    if users:
        st.restart(users, on_state=lambda c, s: say(f"{c}: {s}"))
    show(as_json, {"kind": k.name, "variant": chosen, "image": image, "restarted": users},
         f"{st.image_of(chosen, k)} → {image[:12]}" + (f"; restarted {', '.join(users)}" if users else ""))


# -- asking a model ---------------------------------------------------------------------------------------------
def _answer(api: GatewayAPI, messages: list[dict[str, str]], model: str | None, max_tokens: int | None = None,
            temperature: float | None = None, conversation: bool = False) -> str:
    """Stream one answer to the terminal. Ctrl-C stops it (what came so far is kept): in a CONVERSATION the next
    question can follow; otherwise the command ends (exit 130)."""
    pieces: list[str] = []
    interrupted = [False]

    def on_sigint(signum: int, frame: object) -> None:
        # also remembered: a KeyboardInterrupt raised inside an object's finalizer is swallowed by Python, and
        # the answer must stop all the same
        interrupted[0] = True
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, on_sigint)
    try:
        for piece in api.chat(messages, model, max_tokens, temperature):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
            if interrupted[0]:
                raise KeyboardInterrupt
        if interrupted[0]:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]\n" if conversation else "\n")
        if not conversation:
            raise
        return "".join(pieces)
    finally:
        signal.signal(signal.SIGINT, before)
    sys.stdout.write("\n")
    return "".join(pieces)


@app.command()
def run(words: Annotated[list[str], typer.Argument(help="[MODEL] PROMPT (the prompt from stdin when it is -)",
                                                   show_default=False)],
        cfg_path: ConfigOpt = None,
        max_tokens: Annotated[int | None, typer.Option(help="Longest answer, in tokens")] = None,
        temperature: Annotated[float | None, typer.Option(help="Sampling temperature (0: always the likeliest)")] = None,
        as_json: JsonOpt = False) -> None:
    """Ask a model of the running stack one thing; the answer streams back (through the gateway)."""
    if len(words) > 2:
        raise typer.BadParameter("give at most a model and one prompt (quote the prompt)")
    model, prompt = (words[0], words[1]) if len(words) == 2 else (None, words[0])
    if prompt == "-":
        prompt = sys.stdin.read()
    api = GatewayAPI(load_config(cfg_path))
    messages = [{"role": "user", "content": prompt}]
    if as_json:
        return emit({"model": model, "content": "".join(api.chat(messages, model, max_tokens, temperature))})
    _answer(api, messages, model, max_tokens, temperature)


@app.command()
def chat(model: Annotated[str | None, typer.Argument(help="A model, alias or server (default: the chat default)")] = None,
         cfg_path: ConfigOpt = None) -> None:
    """Talk with a model of the running stack. /clear forgets the conversation; Ctrl-D or /exit leaves."""
    api = GatewayAPI(load_config(cfg_path))
    messages: list[dict[str, str]] = []
    err.print(f"[dim]chatting with {model or 'the default chat server'} at {api.url}; /clear, /exit[/dim]")
    while True:
        try:
            line = input("› ")
        except EOFError:
            out.print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/clear":
            messages.clear()
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": _answer(api, messages, model, conversation=True)})


# -- gateway and endpoints --------------------------------------------------------------------------------------
@app.command()
def endpoints(as_json: JsonOpt = False) -> None:
    """Every llama-server endpoint the gateway serves, from its route table (Markdown, or --json)."""
    from dataclasses import asdict

    from .gateway.apis import help as helpdoc
    from .gateway.routing.routes import ENDPOINTS

    if as_json:
        return emit([asdict(ep) | {"roles": list(ep.roles)} for ep in ENDPOINTS])
    sys.stdout.write(helpdoc.markdown())


@app.command("export")
def export_cmd(fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="compose, kube or quadlet")],
               cfg_path: ConfigOpt = None, engine: EngineOpt = None,
               output: Annotated[str, typer.Option("-o", "--output", help="Directory to write into")] = "export",
               target: Annotated[str, typer.Option("--for", help="kube: kubernetes (the keys in a Secret) or podman "
                                                             "(`podman kube play`: the keys mounted from DIR)")]
               = "kubernetes",
               as_json: JsonOpt = False) -> None:
    """Write the whole stack for compose, Kubernetes or systemd (Quadlet units): the same images, flags and
    hardening as `start`, the read-only models volume, the server key, health probes, and a gateway that finds
    the servers by DNS."""
    from .stack.export import FORMATS, export, valid_dir

    if fmt not in FORMATS:  # before the gateway image is built
        raise typer.BadParameter(f"no export format '{fmt}'; formats: {', '.join(FORMATS)}", param_hint="FORMAT")
    if target not in ("kubernetes", "podman"):
        raise typer.BadParameter("kubernetes or podman", param_hint="--for")
    st = stack_for(cfg_path, engine)
    out_dir = valid_dir(output)
    with Steps(err).step("gateway image") as s:
        gateway_image = pushes.gateway_image(st.engine, st.cfg, source.project_root(), st.cfg.state_path / "logs",
                                             say=s.say)
    written = export(st, fmt, out_dir, gateway_image, flavour=target)
    if as_json:
        return emit({"format": fmt, "files": [str(p) for p in written]})
    for path in written:
        out.print(str(path))


@app.command("gateway")
def gateway_cmd(cfg_path: ConfigOpt = None,
                host: Annotated[str | None, typer.Option(help="Bind address (default: [gateway] host)")] = None,
                port: Annotated[int | None, typer.Option(help="Port (default: [gateway] port)")] = None,
                supervise: Annotated[bool, typer.Option(help="Run the supervisor in this process")] = True,
                discovery: Annotated[str, typer.Option(help="engine: the stack's containers; dns: an exported stack's "
                                                            "services (no engine, restarts left to the orchestrator)")]
                = "engine") -> None:
    """Run the gateway in this process (development; `podllama start` runs it as a container)."""
    import logging

    from .gateway.app import Gateway
    from .gateway.front.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = load_config(cfg_path)
    host = host or cfg.gateway.host
    # in a container on the stack's network it binds 0.0.0.0, but clients reach it at the published address
    bound = os.environ.get("PODLLAMA_PUBLISHED_HOST") or host
    if discovery not in ("engine", "dns"):
        raise typer.BadParameter("engine or dns", param_hint="--discovery")
    try:
        material, _ = tls.ensure(cfg)
    except tls.TlsError as e:
        raise typer.BadParameter(str(e)) from None
    gw = Gateway(cfg, supervise=supervise, bound=bound, orchestrated=discovery == "dns")
    serve(gw, host, port or cfg.gateway.port, gw.limits, material)


# -- models ---------------------------------------------------------------------------------------------------
@app.command()
def pull(ref: Annotated[str, typer.Argument(help="ORG/REPO[:QUANT] or ORG/REPO/FILE (.gguf as llama.cpp's -hf; "
                                                 ".bin, .onnx, .safetensors for the other kinds)")],
         cfg_path: ConfigOpt = None,
         revision: Annotated[str | None, typer.Option(help="Branch, tag or commit (default: main)")] = None,
         mmproj: Annotated[bool, typer.Option(help="Also the multimodal projector, when the repo has one")] = True,
         as_json: JsonOpt = False) -> None:
    """Download a model from Hugging Face into the store (resumes, retries, checks every file's sha256)."""
    from .access.credentials import Credentials
    from .models import hub
    from .models.store import Store

    cfg = load_config(cfg_path, required=False)
    creds = Credentials(cfg.state_path)
    steps = Steps(err)
    with steps.step(f"download {ref}") as s:
        m = hub.pull(Store(cfg.models_path), ref, revision=revision, mmproj=mmproj, hf_token=creds.hub_token(cfg),
                     hub=creds.hub_endpoint(cfg), progress=download_progress(s), say=s.say)
    if as_json:
        return emit(m.to_dict())
    out.print(f"[green]{m.id}[/green] at {(m.revision or '')[:12]}: {len(m.files)} files, {m.size / 2**20:.1f} MiB in "
              f"{cfg.models_path}")
    out.print(f'use it: model = "hf://{m.id}"  (or "{m.model}")')


@models_app.command("list")
def models_list(cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Models in the store: size, source, which servers use them."""
    from .models import hub
    from .models.store import Store

    cfg = load_config(cfg_path, required=False)
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
              force: Annotated[bool, typer.Option("--force", help="Stop the servers that use it first")] = False,
              as_json: JsonOpt = False) -> None:
    """Remove a model from the store; refused while a running server uses it (unless --force)."""
    cfg = load_config(cfg_path, required=False)
    removed, stopped = Stack(cfg, engine_for(cfg, engine), progress=say).remove_model(model_id, force)
    show(as_json, {"removed": removed, "stopped": stopped},
         f"removed {model_id} ({len(removed)} files)" + (f"; stopped {', '.join(stopped)}" if stopped else ""))


@models_app.command("verify")
def models_verify(model_id: Annotated[str | None, typer.Argument(help="One model (default: all)")] = None,
                  cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Re-check every byte of the stored models against their manifests (sizes and sha256)."""
    from .models.store import Store

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
                  name: Annotated[str | None, typer.Option(help="Its name in the store (default: the file's)")] = None,
                  as_json: JsonOpt = False) -> None:
    """Copy a local GGUF into the store and record it (checked before it takes its name)."""
    from .models.store import Store

    cfg = load_config(cfg_path, required=False)
    m = Store(cfg.models_path).import_file(file, name)
    show(as_json, m.to_dict(), f'imported {m.id}: model = "{m.model}"')


@models_app.command("usage")
def models_usage(cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Disk used by the store, downloads in progress, and free space."""
    from .models.store import Store

    cfg = load_config(cfg_path, required=False)
    u = Store(cfg.models_path).usage()
    show(as_json, u, f"{u['path']}: {u['models']} models, {u['bytes'] / 2**30:.2f} GiB "
                     f"({u['partial_bytes'] / 2**20:.1f} MiB partial downloads); {u['disk_free_bytes'] / 2**30:.1f} GiB free")


# -- config and machine -----------------------------------------------------------------------------------------
@app.command("check")
def check(cfg_path: ConfigOpt = None, engine: EngineOpt = None,
          with_flags: Annotated[bool, typer.Option("--flags/--no-flags", help="Also check args against the built "
                                                   "image's llama-server flags")] = True,
          as_json: JsonOpt = False) -> None:
    """Validate services.toml (and each server's args against the flags of the image it will run)."""
    cfg = load_config(cfg_path)
    errors, notes = [], []
    if with_flags and cfg.servers:
        eng = engine_for(cfg, engine)
        hw = hardware.detect()
        st = Stack(cfg, eng, hw=hw)
        for name, server in cfg.servers.items():
            tag = st.image_of(st.variant_of(server), server.kind)
            if not eng.image_exists(tag):
                notes.append(f"servers.{name}: no {tag} image yet to check its args against; run `podllama build`")
                continue
            try:
                user_flags(server, images.record_flags(eng, tag, server.kind))
            except FlagError as e:
                errors.append(f"{cfg.source}: servers.{name}.{e}")
    for n in notes if not as_json else []:
        err.print(f"[yellow]note:[/yellow] {n}", highlight=False)
    if errors:
        raise FlagError("\n".join(errors))
    show(as_json, {"config": str(cfg.source), "servers": len(cfg.servers), "notes": notes},
         f"{cfg.source}: ok ({len(cfg.servers)} servers)")


@app.command()
def doctor(engine: EngineOpt = None, cfg_path: ConfigOpt = None, variant: VariantOpt = None,
           fix: Annotated[bool, typer.Option("--fix", help="Apply the fixes podllama can make itself")] = False,
           as_json: JsonOpt = False) -> None:
    """Check the engine, its runtime quirks, the API socket, GPU passthrough and base images."""
    from .build import doctor as doc

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
def version(as_json: JsonOpt = False) -> None:
    """podllama's version and the llama.cpp commit it builds."""
    st = source.status()
    show(as_json, {"podllama": __version__, "llama.cpp": st.commit},
         f"podllama {__version__}, llama.cpp {st.commit[:12] if st.commit else 'not checked out'}")


@service_app.command("install")
def service_install(cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Write (and enable, where systemd runs) a unit that starts this stack when the machine starts."""
    from .stack import service

    cfg = load_config(cfg_path)
    assert cfg.source is not None
    unit = service.unit_for(cfg.stack.name, cfg.source, cfg.stack.engine, source.project_root())
    done = service.install(unit)
    show(as_json, {"unit": str(unit.path), "done": done}, "\n".join(done))


@service_app.command("remove")
def service_remove(cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Disable and remove the stack's unit."""
    from .stack import service

    cfg = load_config(cfg_path)
    assert cfg.source is not None
    done = service.remove(service.unit_for(cfg.stack.name, cfg.source, cfg.stack.engine, source.project_root()))
    show(as_json, {"done": done}, "\n".join(done))


# -- running it -------------------------------------------------------------------------------------------------
def _database(cfg_path: Path | None) -> tuple[config.Config, Database]:
    from .access.credentials import Credentials

    cfg = load_config(cfg_path, required=False)
    return cfg, Credentials(cfg.state_path).database(cfg)


def _names(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="What the key is for (a-z, 0-9, '-', '_')")],
                models: Annotated[str | None, typer.Option(help="Only these models (comma-separated ids or aliases)")] = None,
                servers: Annotated[str | None, typer.Option(help="Only these servers (comma-separated)")] = None,
                roles: Annotated[str | None, typer.Option(help="Only servers of these roles (chat, embedding …)")] = None,
                admin: Annotated[bool, typer.Option("--admin", help="May use the management API (/admin) too")] = False,
                rpm: Annotated[int | None, typer.Option(help="Requests per minute at most")] = None,
                tpm: Annotated[int | None, typer.Option(help="Tokens per minute at most (prompt and answer)")] = None,
                concurrency: Annotated[int | None, typer.Option(help="Requests under way at once, at most")] = None,
                expires: Annotated[str | None, typer.Option(help="Unusable from this date (2027-01-31, UTC)")] = None,
                cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Make a key; it is printed once (only its hash is kept). The gateway takes it within seconds."""
    from .access.keys import KeyStore, NewKey

    cfg, db = _database(cfg_path)
    key, secret = KeyStore(db).create(NewKey(name, _names(models), _names(servers), _names(roles), admin, rpm, tpm,
                                             concurrency, expires), cfg)
    if as_json:
        return emit({**key.public(), "key": secret})
    out.print(secret, highlight=False, soft_wrap=True)
    say(f"key '{key.name}' ({key.id}) made; it is shown this once: keep it now")


@keys_app.command("list")
def keys_list(cfg_path: ConfigOpt = None, as_json: JsonOpt = False,
              every: Annotated[bool, typer.Option("--all", help="Revoked and expired keys too")] = False) -> None:
    """The keys: id, name, scope, limits, expiry, state (never the keys themselves)."""
    from .access.keys import KeyStore

    keys = [k.public() for k in KeyStore(_database(cfg_path)[1]).list() if every or k.state == "active"]
    if as_json:
        return emit(keys)
    table = Table("id", "name", "key", "scope", "limits", "expires", "state")
    for k in keys:
        scope = "; ".join(f"{what}: {', '.join(k[what])}" for what in ("models", "servers", "roles") if k[what])
        limits = ", ".join(f"{k[what]} {what}" for what in ("rpm", "tpm", "concurrency") if k[what])
        table.add_row(k["id"], k["name"], k["prefix"], ("admin; " if k["admin"] else "") + (scope or "everything"),
                      limits or "-", k["expires"] or "never", k["state"])
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="A key's id or name (from `podllama keys list`)")],
                cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke a key: the gateway refuses it within seconds."""
    from .access.keys import KeyStore

    revoked = KeyStore(_database(cfg_path)[1]).revoke(key)
    show(as_json, revoked.public(), f"revoked key '{revoked.name}' ({revoked.id})")


@app.command()
def usage(by: Annotated[str, typer.Option(help="key | model | server | route | build | model-file")] = "key",
          since: Annotated[str, typer.Option(help="A span (30m, 24h, 7d, 90d) or a date (2026-11-01)")] = "24h",
          cfg_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Requests, errors, tokens and latency from the usage rollups (to the minute for two days, then by the
    hour for [gateway] usage_days); by build (llama.cpp commit) or model file (sha256) too."""
    from .access import usage as report

    cfg, db = _database(cfg_path)
    try:
        start = report.since_of(since)
        rows = report.summary(db, by, start)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if as_json:
        return emit(rows)
    table = Table(by, "requests", "errors", "prompt tokens", "completion tokens", "mean latency", "p95", "mean TTFB")
    for r in rows:
        table.add_row(r[by], str(r["requests"]), str(r["errors"]), str(r["prompt_tokens"]), str(r["completion_tokens"]),
                      _seconds(r["mean_latency_s"]), _p95(r), _seconds(r["mean_ttfb_s"]))
    out.print(table if rows else f"no requests in the log since {since}")
    gw = cfg.gateway
    out.print(f"[dim]{db.where}: {human(db.size() or 0)}; requests kept {gw.log_days:g} days (bodies "
              f"{min(gw.log_body_days, gw.log_days):g}), usage by the hour {gw.usage_days:g} days[/dim]")


def _p95(row: dict[str, Any]) -> str:
    """The bucket's upper edge the 95th percentile falls under."""
    p95 = row["p95_latency_s"]
    return ("> 30 s" if row["requests"] else "-") if p95 is None else f"≤ {_seconds(p95)}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


KNOWN_ERRORS = (ConfigError, SourceError, BuildError, EngineError, FlagError, StackError, UpdateError, PullError,
                StoreError, ApiError, ServiceError, GGUFError, RootRequired, DatabaseError, KeyProblem,
                ExportError, PushError)


def fail(code: int, message: str, kind: str, as_json: bool) -> None:
    if as_json:
        emit({"error": {"type": kind, "message": message, "exit_code": code}})
    else:
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    as_json = "--json" in sys.argv[1:]
    interrupted = "interrupted; nothing was left half-done (run the same command again to finish)"
    try:
        rv = app(prog_name="podllama", standalone_mode=False)
    except (typer.Abort, click.exceptions.Abort, KeyboardInterrupt):
        fail(130, interrupted, "interrupted", as_json)
    except KNOWN_ERRORS as e:
        fail(1, str(e), type(e).__name__, as_json)
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # a usage error (typer's own click, or click)
            if as_json:
                fail(e.exit_code, e.format_message(), "usage", True)
            e.show()  # type: ignore[attr-defined]
            sys.exit(e.exit_code)
        if os.environ.get("PODLLAMA_DEBUG"):  # one line, no locals; the traceback only when asked for
            raise
        fail(1, f"unexpected {type(e).__name__}: {e} (PODLLAMA_DEBUG=1 shows where)", type(e).__name__, as_json)
    if rv == 130:  # typer turns Ctrl-C into that exit code itself
        fail(130, interrupted, "interrupted", as_json)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
