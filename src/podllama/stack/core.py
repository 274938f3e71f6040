"""A stack: from services.toml to running server containers — the models they need, their specs, the plan of
what changes and its application, the lifecycle commands and waiting for health. The gateway container is
in gateway.py, status rows in status.py."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..access import tls
from ..access.credentials import SERVER_GID, SERVER_KEY_IN_CONTAINER, Credentials
from ..build import flags, images
from ..build.errors import BuildError
from ..config import PROJECTOR_ROLES, Config, ConfigError, ServerSection
from ..config.kinds import KINDS, Kind
from ..engine import CliEngine, ContainerInfo, ContainerSpec, EngineError, GpuRequest, Mount, hardware
from ..engine.health import OK, container_health
from ..models import defaults, draft, hub, memory
from ..models.gguf_meta import GGUFError, Metadata
from ..models.gguf_meta import read as read_gguf
from ..models.store import ModelNotFound, Store, StoreError
from .gateway import GatewayContainer
from .plan import Plan, plan
from .spec import (
    L_CHOSEN,
    L_COMMIT,
    L_DRAFT,
    L_FILE,
    L_HASH,
    L_IMAGE,
    L_KIND,
    L_MODEL,
    L_REPLICA,
    L_ROLE,
    L_SERVER,
    L_SHA,
    L_STACK,
    SERVER_PORT,
    SLOTS_IN_CONTAINER,
    StackError,
    Unit,
    container_name,
    server_args,
    server_env,
    spec_hash,
    state_keys,
)
from .state import RUNNING, STOPPED, UNLOADED, StackState, replica_key
from .status import status_rows


class Stack:
    def __init__(self, cfg: Config, engine: CliEngine, progress: Callable[[str], None] = lambda m: None,
                 hw: hardware.Hardware | None = None, default_variant: str | None = None) -> None:
        """DEFAULT_VARIANT: what 'auto' means, when it was decided elsewhere (the gateway container cannot see
        the host's GPUs, so the host passes its choice in)."""
        self.cfg, self.engine, self.progress = cfg, engine, progress
        self.state = StackState(cfg.state_path)
        self.hw = hw
        self.default_variant = default_variant
        self.gateway = GatewayContainer(self)

    # -- naming -------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.cfg.stack.name

    @property
    def network(self) -> str:
        return self.name

    @property
    def hardware(self) -> hardware.Hardware:
        if self.hw is None:
            self.hw = hardware.detect()
        return self.hw

    def variant_of(self, server: ServerSection) -> str:
        """The image variant SERVER runs: its own, else the stack's; a stack-wide GPU variant its kind has no
        image for runs the cpu one (the speech server is CPU only)."""
        requested = server.variant or self.cfg.stack.variant
        if requested == "auto" and self.default_variant:
            variant = self.default_variant
        else:
            variant = hardware.resolve_variant(requested, self.hardware)
        if variant not in server.kind.variants and server.variant is None:
            return "cpu"
        return variant

    def device_of(self, name: str) -> str:
        """Where server NAME's layers go: "cpu", or its first GPU ("cuda:0")."""
        server = self.cfg.servers[name]
        variant = self.variant_of(server)
        if variant == "cpu":
            return "cpu"
        first = next((g for g in (server.gpus if isinstance(server.gpus, list) else []) if g.isdigit()), "0")
        return f"{variant}:{first}"

    def estimate(self, name: str, server: ServerSection | None = None) -> memory.Estimate:
        """What server NAME will hold (with the settings SERVER, default its own), from its model files (every
        shard, the projector and the draft model's) and its flags. A server whose context is fitted is counted
        at the context podllama's estimate fits (fitted_context) until its own choice is read back."""
        files = self.model_files(name)
        main = _shards(self.store.path(files.model)) + ([self.store.path(files.mmproj)] if files.mmproj else [])
        draft = _shards(self.store.path(files.draft)) if files.draft else []
        section = server or self.cfg.servers[name]
        if section.fits_context:
            section = section.model_copy(update={"ctx_size": self.fitted_context(name)})
        return memory.estimate(section, main, self.device_of(name), draft=draft, read=self.read_metadata)

    def gpu_totals(self) -> dict[str, int]:
        """Each GPU's memory: what the host told the gateway container ($PODLLAMA_GPU_MEMORY, which cannot see
        the GPUs itself), else from detection."""
        told = os.environ.get("PODLLAMA_GPU_MEMORY")
        return memory.gpu_totals(told if told is not None else memory.gpu_totals_text(self.hardware.gpus))

    def budgets(self) -> dict[str, int | None]:
        """What the stack's servers may hold per device ([placement])."""
        p = self.cfg.placement
        out: dict[str, int | None] = {"cpu": memory.budget(p.cpu_memory, memory.host_memory(), memory.CPU_MARGIN_MIN)}
        totals = self.gpu_totals()
        for device in set(totals) | set(p.gpu_memory):
            out[device] = memory.budget(p.gpu_memory.get(device, "auto"), totals.get(device), memory.GPU_MARGIN_MIN)
        return out

    def fitted(self, name: str, known: flags.FlagSet) -> tuple[list[str], list[str]]:
        """(flags, notes) for a server with ctx_size = "fit": on a GPU whose image has --fit, llama-server fits
        its context to the device itself, leaving what [placement] keeps back; else (the CPU, which llama-server
        does not fit to, or a build without --fit) the largest context podllama's estimate puts within the
        device's budget, less what the stack's `always` servers there are estimated to hold."""
        device = self.device_of(name)
        if device != "cpu" and "--fit" in known:
            total, budget = self.gpu_totals().get(device), self.budgets().get(device)
            margin = (total - budget) // 2**20 if total and budget is not None else None
            argv = ["--fit", "on"] + (["--fit-target", str(margin)] if margin is not None and "--fit-target" in known
                                      else [])
            return argv, [f"context fitted to {device} by llama-server (--fit)"
                          + (f", leaving {margin} MiB" if margin is not None else "")]
        ctx = self.fitted_context(name)
        why = "llama-server fits only GPU memory" if device == "cpu" else "this build has no --fit"
        return ["--ctx-size", str(ctx)], [f"context {ctx} fitted by podllama's estimate to {device}'s budget "
                                          f"({why})"]

    def fitted_context(self, name: str) -> int:
        """The largest context podllama's estimate puts within server NAME's device budget, less what the
        stack's `always` servers there hold; `always` servers that fit their context share what is left
        equally (an on-demand one may use all of it: it is loaded in place of others)."""
        device = self.device_of(name)
        budget = self.budgets().get(device)
        server = self.cfg.servers[name]
        meta = self.model_metadata(name)
        most = int(meta.arch_value("context_length") or 4096) if meta is not None else 4096
        if budget is None:
            return most
        always = [n for n, s in self.cfg.servers.items()
                  if not s.on_demand and s.kind.llama and self.device_of(n) == device]
        fixed = sum(self.estimate(n).devices.get(device, 0) for n in always
                    if n != name and not self.cfg.servers[n].fits_context)
        sharing = 1 if server.on_demand else sum(1 for n in always if self.cfg.servers[n].fits_context)
        room = (budget - fixed) // max(1, sharing)
        lo, hi = 1, max(1, most // 256)  # in steps of 256 cells, as llama.cpp pads them
        while lo < hi:
            mid = (lo + hi + 1) // 2
            held = self.estimate(name, server.model_copy(update={"ctx_size": mid * 256})).devices.get(device, 0)
            lo, hi = (mid, hi) if held <= room else (lo, mid - 1)
        return min(most, lo * 256)

    def image_of(self, variant: str, kind: Kind = KINDS["llama"]) -> str:
        return images.tag_for(variant, repo=kind.repository(self.cfg.build.repository))

    def select(self, servers: list[str] | None) -> list[str]:
        names = servers or list(self.cfg.servers)
        remote = [n for n in names if n in self.cfg.remotes]
        if remote:
            raise StackError(f"{', '.join(remote)}: remote (url = …): podllama routes to them and checks their "
                             "health, but they run elsewhere; start, stop or restart them there")
        unknown = [n for n in names if n not in self.cfg.servers]
        if unknown:
            raise StackError(f"no server named {', '.join(unknown)} in {self.cfg.source}; servers: "
                             f"{', '.join(self.cfg.servers) or 'none'}")
        return names

    # -- what the config asks for -------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        return Store(self.cfg.models_path)

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.cfg.state_path)

    def model_files(self, name: str) -> hub.ServerFiles:
        """The model, projector and draft files (in the store) of server NAME: its hub models once pulled, else
        its fallback where it has one."""
        server = self.cfg.servers[name]
        files = hub.server_files(self.store, server)
        missing = server.model if files is None else None if files.draft else server.draft_model
        if files is None or missing:
            raise StackError(f"servers.{name}: {missing} is not in the model store yet; run "
                             f"`podllama pull {str(missing).removeprefix('hf://')}`")
        if server.model.startswith("hf://") and files.model != server.fallback and server.role in PROJECTOR_ROLES \
                and not files.mmproj:
            raise StackError(f"servers.{name}: role '{server.role}' needs a projector, and {server.model} has no "
                             "mmproj file; set mmproj = \"FILE\"")
        return files

    def metadata(self, model: str) -> Metadata | None:
        """What the model file MODEL (in the store) says about itself; None when it is not there."""
        try:
            return self.read_metadata(self.store.path(model))
        except OSError:
            return None

    @staticmethod
    def read_metadata(path: Path) -> Metadata:
        """The metadata of the GGUF file at PATH, read once per version of the file."""
        st = path.stat()
        return _metadata(str(path), st.st_mtime_ns, st.st_size)

    def model_metadata(self, name: str) -> Metadata | None:
        """Server NAME's model metadata; None when its file is not there or is not a readable GGUF (or podllama
        does not run it)."""
        if name not in self.cfg.servers:
            return None
        try:
            return self.metadata(self.model_files(name)[0])
        except (StackError, GGUFError, OSError):
            return None

    def chosen(self, name: str, model: str) -> tuple[list[str], list[str]]:
        """(flags, notes): what podllama adds to server NAME from what its model file says (defaults.py)."""
        server = self.cfg.servers[name]
        try:
            meta = self.metadata(model)
        except GGUFError as e:
            raise StackError(f"servers.{name}: {e}") from None
        if meta is None:
            return [], []
        argv, notes = defaults.for_server(server.role, server.args, meta)
        if model == server.fallback:
            notes.insert(0, f"the fallback model (the hub model {server.model} is not in the store)")
        return argv, notes

    def pull_missing(self, names: list[str], progress: Callable[[str, int, int], None] | None = None
                     ) -> dict[str, str]:
        """Download every hub model of NAMES that the store does not have yet. Returns the servers whose model
        could not be had (no fallback either), each with what to do. A hub that does not answer is asked once."""
        failed = {}
        creds = self.credentials
        token, endpoint = creds.hub_token(self.cfg), creds.hub_endpoint(self.cfg)
        unreachable: hub.HubUnreachable | None = None
        wanted = [(name, ref, ref == s.model) for name, s in ((n, self.cfg.servers[n]) for n in names)
                  for ref in (s.model, s.draft_model) if ref]
        for name, ref, main in wanted:
            server = self.cfg.servers[name]
            if not ref.startswith("hf://") or hub.resolve(self.store, ref) is not None or name in failed:
                continue
            try:
                if unreachable is not None:
                    raise unreachable
                self.progress(f"servers.{name}: downloading {ref}{'' if main else ' (its draft model)'}")
                hub.pull(self.store, ref, hf_token=token, hub=endpoint, progress=progress,
                         mmproj=main and server.role in PROJECTOR_ROLES, say=self.progress)
            except hub.PullError as e:
                if isinstance(e, hub.HubUnreachable):
                    unreachable = e
                if main and server.fallback and (self.cfg.models_path / server.fallback).is_file():
                    why = e.short if isinstance(e, hub.HubUnreachable) else str(e)
                    self.progress(f"servers.{name}: {ref} cannot be downloaded ({why}); using its fallback "
                                  f"{server.fallback} until it can")
                    continue
                failed[name] = (f"servers.{name}: {ref} is not in the model store and could not be downloaded: "
                                f"{e}. When the hub can be reached, run `podllama pull {ref.removeprefix('hf://')}`")
        return failed

    def remove_model(self, model_id: str, force: bool = False) -> tuple[list[str], list[str]]:
        """Take a model out of the store. Refused while a running server uses it, unless FORCE, which stops
        those servers first. Returns (files removed, servers stopped)."""
        m = self.store.manifest(model_id)
        if m is None:
            raise ModelNotFound(model_id)
        files = {f.path for f in m.files}
        users = sorted({i.labels.get(L_SERVER, "?") for i in self.containers("server").values()
                        if i.running and {i.labels.get(L_FILE), i.labels.get(L_DRAFT)} & files})
        if users and not force:
            raise StoreError(f"{model_id} is used by running servers: {', '.join(users)}; stop them first, or "
                             "force it (`--force`, `?force=1`), which stops them")
        if users:
            self.stop(users)
        return self.store.remove(model_id), users

    def preflight(self, names: list[str] | None, gateway: bool = True,
                  download: Callable[[str, int, int], None] | None = None) -> None:
        """What `start` needs, checked before anything is built or changed: every model present (hub models
        pulled first, DOWNLOAD reporting bytes), GPU passthrough for the variants in use, and the gateway's port
        free or held by this stack's own gateway. Every problem is named at once, with its fix."""
        selected = self.select(names)
        failed = self.pull_missing(selected, download)
        problems = (list(failed.values()) + self.missing_models([n for n in selected if n not in failed])
                    + self.gpu_problems(selected) + self.remote_problems())
        if gateway:
            holder = self.gateway.port_holder()
            if holder not in (None, "ours"):
                gw = self.cfg.gateway
                problems.append(f"gateway.port: {gw.host}:{gw.port} is taken by {holder}; stop it, or give the stack "
                                "another port in [gateway] port")
        if problems:
            raise StackError("\n".join(problems))

    def remote_problems(self) -> list[str]:
        """Remote servers whose key file or CA file cannot be read (the gateway would send them no key, or could not
        verify them)."""
        problems = []
        for name in self.cfg.remotes:
            try:
                self.cfg.remote_key(name)
                tls.remote_context(self.cfg, name)
            except (ConfigError, tls.TlsError) as e:
                problems.append(str(e))
        return problems

    def gpu_problems(self, names: list[str]) -> list[str]:
        """GPU passthrough that would fail for the variants NAMES run on: the smoke test or the first start
        would find out much later."""
        from ..build import doctor

        problems = []
        checks = {"cuda": "NVIDIA passthrough", "rocm": "ROCm passthrough", "vulkan": "Vulkan passthrough"}
        for variant in dict.fromkeys(self.variant_of(self.cfg.servers[n]) for n in names):
            if variant == "cpu":
                continue
            if not any(g.backend == variant for g in self.hardware.gpus):
                problems.append(f"stack.variant: the servers run the {variant} image, but this machine has no GPU for "
                                f"it (`podllama detect`); use variant = \"cpu\" or \"auto\"")
                continue
            for f in doctor.check_gpus(self.hardware):
                if f.check == checks[variant] and not f.ok:
                    problems.append(f"{f.check}: {f.detail}; fix: {f.fix}")
        return problems

    def missing_models(self, names: list[str]) -> list[str]:
        """What keeps NAMES' servers from their files: one not in the store, and a draft model that cannot draft
        for its server (draft.py)."""
        problems = []
        for name in names:
            try:
                files = self.model_files(name)
            except StackError as e:
                problems.append(str(e))
                continue
            absent = [(kind, file) for kind, file in (("model", files.model), ("mmproj", files.mmproj),
                                                      ("draft_model", files.draft))
                      if file and not (self.cfg.models_path / file).is_file()]
            if not absent:
                problems += [p for p in [self.draft_problem(name, files)] if p]
            for kind, file in absent:
                problems.append(f"servers.{name}: {kind} '{file}' not found in {self.cfg.models_path}; put the "
                                f"GGUF file there (`podllama models import FILE`) or download it "
                                f"(`podllama pull REPO[:QUANT]`)")
        return problems

    def draft_type(self, file: str) -> str | None:
        """The speculative type a draft model FILE drafts as when its server names none (draft.default_type)."""
        meta = self.metadata(file)
        return draft.default_type(meta.architecture if meta else None)

    def draft_problem(self, name: str, files: hub.ServerFiles) -> str | None:
        """Why server NAME's draft model cannot draft for its model (their vocabularies differ: llama-server
        would refuse to start), naming both files and the fix; None when it can or there is none."""
        if not files.draft:
            return None
        try:
            why = draft.mismatch(draft.vocabulary(self.store.path(files.model)),
                                 draft.vocabulary(self.store.path(files.draft)))
        except (GGUFError, OSError) as e:
            why = f"it cannot be read ({e})"
        if why is None:
            return None
        return (f"servers.{name}: the draft model {files.draft} cannot draft for {files.model}: {why}. Pick a draft "
                "of the same model family (the same tokenizer), usually a smaller size of the same model")

    def units(self, names: list[str] | None = None) -> list[Unit]:
        """Container specs for the servers; every server's args are checked against its image's flags first.
        Pure: it names the files the containers mount and writes none (recreate() makes them before a container
        is made), so planning and a dry run leave the disk as it was."""
        out: list[Unit] = []
        known: dict[str, flags.FlagSet] = {}
        sha256 = {f.path: f.sha256 for m in self.store.manifests() for f in m.files}  # for the request log
        secret = Mount(str(self.credentials.path("server.key")), SERVER_KEY_IN_CONTAINER, read_only=True)
        for name in self.select(names):
            server = self.cfg.servers[name]
            variant, kind = self.variant_of(server), server.kind
            image = self.image_of(variant, kind)
            image_id = self.engine.image_id(image)
            if image_id is None:
                raise StackError(f"servers.{name}: image {image} does not exist; run "
                                 f"`podllama build --variant {variant}{'' if kind.llama else f' --kind {kind.name}'}`")
            if image not in known:
                try:
                    known[image] = images.record_flags(self.engine, image, kind, look_in=self.flags_dir)
                except BuildError as e:
                    raise StackError(f"servers.{name}: {e}") from None
            files = self.model_files(name)
            problem = self.draft_problem(name, files)
            if problem:
                raise StackError(problem)
            model = files.model
            extra, notes = self.chosen(name, model) if kind.llama else ([], [])
            if server.fits_context:
                fit_argv, fit_notes = self.fitted(name, known[image])
                extra, notes = extra + fit_argv, notes + fit_notes
            if files.draft:
                types = server.spec_types
                if not types and (inferred := self.draft_type(files.draft)):
                    types, extra = [inferred], extra + ["--spec-type", inferred]
                notes.append(f"drafts with {files.draft} ({', '.join(types) or 'the type its file names'})")
            argv = server_args(name, server, known[image], files, extra)
            mounts = [Mount(str(self.cfg.models_path), "/models", read_only=True), secret]
            if server.saves_slots:
                # prompt caches saved when it is unloaded and restored when it is loaded again (gateway/ondemand.py)
                mounts.append(Mount(str(self.slot_path(name)), SLOTS_IN_CONTAINER, read_only=False))
                argv += ["--slot-save-path", SLOTS_IN_CONTAINER]
            labels = self.engine.image_labels(image)
            commit = labels.get("podllama.llama-commit") or labels.get("podllama.source", "")
            gpu = None
            if variant != "cpu":
                gpu = GpuRequest(variant, server.gpus if isinstance(server.gpus, list) else ["all"])
            for replica in range(1, server.replicas + 1):
                spec = ContainerSpec(
                    name=container_name(self.name, name, replica), image=image, args=argv,
                    labels={L_STACK: self.name, L_KIND: "server", L_SERVER: name, L_REPLICA: str(replica),
                            L_ROLE: server.role, L_IMAGE: image, L_COMMIT: commit, L_MODEL: server.model,
                            L_FILE: model, L_SHA: sha256.get(model, ""), L_CHOSEN: "; ".join(notes)}
                    | ({L_DRAFT: files.draft} if files.draft else {}),
                    env=server_env(server), network=self.network, network_aliases=[name],
                    mounts=mounts, gpu=gpu,
                    groups=[str(SERVER_GID)],
                )
                h = spec_hash(spec, image_id)
                spec.labels[L_HASH] = h
                out.append(Unit(name, replica, server.role, spec, h, server.on_demand))
        return out

    def slot_path(self, name: str) -> Path:
        """Where server NAME's saved prompt caches live (made by slot_dir())."""
        return self.cfg.state_path / "slots" / name

    def slot_dir(self, name: str) -> Path:
        """slot_path(NAME), made where missing: in the stack's state directory (0700), writable by the servers'
        group (the gateway, root without capabilities, cannot hand it to that group: then any user, still behind
        the 0700 directory around it)."""
        path = self.slot_path(name)
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            try:
                os.chown(path, 0, SERVER_GID)
                path.chmod(0o2770)
            except PermissionError:
                path.chmod(0o777)
        return path

    def missing_images(self, names: list[str] | None) -> list[tuple[Kind, str]]:
        """(kind, variant) of the images the servers use that do not exist yet."""
        wanted = dict.fromkeys((self.cfg.servers[n].kind, self.variant_of(self.cfg.servers[n]))
                               for n in self.select(names))
        return [(k, v) for k, v in wanted if not self.engine.image_exists(self.image_of(v, k))]

    # -- what runs ----------------------------------------------------------------------------------------
    def containers(self, kind: str | None = None) -> dict[str, ContainerInfo]:
        labels = {L_STACK: self.name} | ({L_KIND: kind} if kind else {})
        return {c.name: c for c in self.engine.list(labels)}

    def declared(self) -> set[str]:
        """The container names the config asks for."""
        return {container_name(self.name, s, r) for s, srv in self.cfg.servers.items() for r in range(1, srv.replicas + 1)}

    def plan(self, names: list[str] | None = None, units: list[Unit] | None = None) -> Plan:
        """What start would do for NAMES (all servers when None): orphans are removed, changed servers
        restarted, missing ones started, matching running ones kept."""
        units = units if units is not None else self.units(names)
        return plan(units, self.containers("server"), self.declared() if names is None else None)

    @property
    def flags_dir(self) -> Path:
        """Where the images' recorded flags are kept for the gateway container (images.share_flags)."""
        return self.cfg.state_path / "images"

    def apply(self, plan: Plan, units: list[Unit]) -> None:
        """PLAN carried out: what the units mount and the gateway reads made first, then the containers."""
        for image in dict.fromkeys(u.spec.image for u in units):
            images.share_flags(self.engine, image, self.flags_dir)
        by_name = {u.name: u for u in units}
        for step in plan.changes:
            if step.action == "remove":
                self.progress(f"removing {step.container} ({step.reason})")
                self.engine.remove(step.container)
                continue
            unit = by_name[step.container]
            info = self.engine.inspect(step.container)
            if step.action == "start" and info is not None and info.labels.get(L_HASH) == unit.hash:
                self.progress(f"starting {step.container}")
                self.engine.start(step.container)
                continue
            self.progress(f"{'re' if step.action == 'restart' else ''}creating {step.container}")
            self.recreate(unit, exists=info is not None)

    def recreate(self, unit: Unit, exists: bool = True) -> None:
        """UNIT's container made afresh from its spec (the old one, if any, removed first), with the files it
        mounts made first: the stack's server key, the server's slot directory."""
        self.credentials.ensure()
        if any(m.target == SLOTS_IN_CONTAINER for m in unit.spec.mounts):
            self.slot_dir(unit.server)
        if exists:
            self.engine.remove(unit.name)
        try:
            self.engine.run(unit.spec)
        except EngineError as e:
            raise StackError(f"servers.{unit.server}: the engine could not start {unit.name}: {e}") from None

    # -- waiting ------------------------------------------------------------------------------------------
    def wait_ready(self, units: list[Unit], timeout: float | None = None,
                   on_state: Callable[[str, str], None] | None = None) -> None:
        """Until every unit's llama-server answers /health with 200. 503 is "loading" and is waited for; a
        container that exits is a failure, reported with its last log lines."""
        deadline = time.monotonic() + (timeout or self.cfg.stack.ready_timeout)
        pending = {u.name: u for u in units}
        last: dict[str, str] = {}
        while pending:
            for cname, unit in list(pending.items()):
                info = self.engine.inspect(cname)
                state = "exited" if info is None or not info.running else container_health(self.engine, info, SERVER_PORT)
                if state != last.get(cname) and on_state:
                    on_state(cname, state)
                last[cname] = state
                if state == OK:
                    del pending[cname]
                elif state == "exited":
                    raise StackError(f"servers.{unit.server}: {cname} exited while starting. Last log lines:\n"
                                     f"{self.tail(cname)}")
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{n} ({last.get(n)})" for n in pending)
                raise StackError(f"not healthy after {timeout or self.cfg.stack.ready_timeout:.0f}s: {names}; "
                                 f"see `podllama logs SERVER`")
            if pending:
                time.sleep(0.25)

    def tail(self, container: str, lines: int = 20) -> str:
        return "".join(self.engine.logs(container, tail=lines)).rstrip()

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self, names: list[str] | None = None, wait: bool = True,
              on_state: Callable[[str, str], None] | None = None, pull: bool = True) -> Plan:
        """PULL: download missing hub models first (False: a preflight did already)."""
        selected = self.select(names)
        failed = self.pull_missing(selected) if pull else {}
        problems = list(failed.values()) + self.missing_models([n for n in selected if n not in failed])
        if problems:
            raise StackError("\n".join(problems))
        for made in self.credentials.ensure():
            self.progress(made)
        units = self.units(selected)  # validates every server before anything changes
        with self.state.operation():
            # internal (no route out) where the gateway reaches the servers from the host's network
            self.engine.create_network(self.network, {L_STACK: self.name}, internal=self.gateway.network() == "host")
            plan = self.plan(None if names is None else selected, units)
            self.record_desired(plan, units)
            self.apply(plan, units)
        if wait:
            self.wait_ready(self.to_run(plan, units), on_state=on_state)
        return plan

    def record_desired(self, plan: Plan, units: list[Unit]) -> None:
        """What PLAN leaves running should run (the supervisor keeps it up); on-demand servers it leaves alone
        wait for their first request."""
        idle = {s.container for s in plan.steps if s.action == "on-demand"}
        self.state.set_desired([u.key for u in units if u.name not in idle], RUNNING)
        self.state.set_desired([u.key for u in units if u.name in idle], UNLOADED)

    @staticmethod
    def to_run(plan: Plan, units: list[Unit]) -> list[Unit]:
        """The UNITS that run once PLAN is applied."""
        idle = {s.container for s in plan.steps if s.action == "on-demand"}
        return [u for u in units if u.name not in idle]

    def stop(self, names: list[str] | None = None, timeout: int = 10) -> list[str]:
        """Graceful stop (SIGTERM, then SIGKILL after TIMEOUT seconds). Without NAMES: every server and the
        gateway. Stopped containers are kept (their logs stay readable); orphans are removed."""
        with self.state.operation():
            running = self.containers()
            if names is None:
                targets = list(running)
            else:
                self.select(names)
                targets = [n for n, i in running.items() if i.labels.get(L_SERVER) in names]
            self.state.set_desired(state_keys(running[n] for n in targets), STOPPED)
            declared = self.declared()
            for cname in targets:
                info = running[cname]
                if info.labels.get(L_KIND) == "server" and cname not in declared:
                    self.progress(f"removing {cname} (no longer declared)")
                    self.engine.remove(cname)
                elif info.running:
                    self.progress(f"stopping {cname}")
                    self.engine.stop(cname, timeout)
            return targets

    def kill(self) -> list[str]:
        """SIGKILL every container of the stack, gateway included, at once. The gateway goes first: its
        supervisor, in the middle of a round, could otherwise start again a server killed a moment before."""
        running = self.containers()
        self.state.set_desired(state_keys(running.values()), STOPPED)
        gateway_first = sorted(running.items(), key=lambda item: item[1].labels.get(L_KIND) != "gateway")
        for cname, info in gateway_first:
            if info.running:
                self.engine.kill(cname)
        return list(running)

    def restart(self, names: list[str] | None = None, wait: bool = True,
                on_state: Callable[[str, str], None] | None = None) -> None:
        """Recreate the servers' containers (one at a time, each healthy before the next)."""
        units = self.units(self.select(names))
        for unit in units:
            if unit.on_demand and self.state.desired(unit.key) == UNLOADED:
                self.progress(f"{unit.name} is not loaded (on demand): nothing to restart")
                continue
            with self.state.operation():
                self.state.set_desired([unit.key], RUNNING)
                self.progress(f"restarting {unit.name}")
                self.recreate(unit)
            if wait:
                self.wait_ready([unit], on_state=on_state)

    def load(self, name: str) -> Unit:
        """Start on-demand server NAME's container (its existing one when it still matches, else afresh); the
        supervisor keeps it up from here. Waiting for it to answer is the caller's."""
        unit = self.units([name])[0]
        with self.state.operation():
            self.state.set_desired([unit.key], RUNNING)
            info = self.engine.inspect(unit.name)
            if info is not None and info.running:
                return unit
            if info is not None and info.labels.get(L_HASH) == unit.hash:
                try:
                    self.engine.start(unit.name)
                    return unit
                except EngineError:
                    pass  # made afresh below
            self.recreate(unit, exists=info is not None)
        return unit

    def unload(self, name: str, timeout: int = 10) -> None:
        """Stop on-demand server NAME; its next request starts it again. The stopped container is kept (its
        logs stay readable)."""
        cname = container_name(self.name, name, 1)
        with self.state.operation():
            self.state.set_desired([replica_key(name, 1)], UNLOADED)
            self.engine.stop(cname, timeout)

    def down(self) -> list[str]:
        """Remove every container of the stack and its network."""
        with self.state.operation():
            running = self.containers()
            for cname in running:
                self.engine.remove(cname)
            self.engine.remove_network(self.network)
            self.state.forget(list(self.state.read().get("servers", {})))
            return list(running)

    # -- looking ------------------------------------------------------------------------------------------
    def status(self, probe: bool = True) -> list[dict[str, Any]]:
        """One row per declared server replica, then any orphan server containers (see status.py)."""
        return status_rows(self, probe)


@functools.lru_cache(maxsize=64)
def _metadata(path: str, mtime_ns: int, size: int) -> Metadata:
    """A model file's metadata, read once per version of the file (the size and time are the key)."""
    return read_gguf(Path(path))


def _shards(first: Path) -> list[Path]:
    """A model's files: the first shard and its siblings (NAME-0000k-of-0000N.gguf), or the one file."""
    marker = first.name.rfind("-00001-of-")
    if marker < 0:
        return [first]
    return sorted(first.parent.glob(first.name[:marker] + "-0*-of-" + first.name[marker + len("-00001-of-"):]))
