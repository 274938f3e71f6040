"""`podllama export compose|kube|quadlet`: the whole stack of services.toml for an orchestrator to run — the same
containers `podllama start` makes (images, server flags, the hardening, the read-only models volume, the
server key), and the gateway without an engine socket: it finds the servers by their DNS names and leaves
restarts to the orchestrator (`podllama gateway --discovery dns`).

What it writes into DIR:
    compose.yaml, or podllama.yaml (a ConfigMap, a Secret, a Deployment and a Service per server, the gateway's),
    or quadlet/*.container, *.network (a unit per replica and the gateway's, two networks: Podman ≥ 5)
    gateway/services.toml                       the config as the exported gateway reads it
    gateway/state/secrets/{admin.key,server.key}  the stack's keys, for the gateway (0600 / 0440)
    keys/server.key                             the server key alone, for the servers (root:10001, 0440)

The gateway reads its config from /etc/podllama (read-only) and keeps its state in /var/lib/podllama.

The containers come from Stack.units(), so the flags are the ones `start` would give (checked against each
image's --help). Exported servers all run: on-demand loading needs the engine, which an exported gateway
does not have.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import tomli_w
import yaml

from .. import config
from ..access import tls
from ..access.credentials import SERVER_GID, SERVER_KEY_IN_CONTAINER, Credentials
from ..atomic import atomic_write
from ..build import push
from ..config import STATE_ENV, Config
from ..engine import CliEngine, ContainerSpec, GpuRequest, PodmanEngine, hardening
from ..engine.base import device_nodes, rocm_groups
from ..validate import CONTROL
from . import GATEWAY_PORT, L_COMMIT, SERVER_PORT, Stack, dns_name

CONFIG_IN_GATEWAY = "/etc/podllama"  # the exported gateway's services.toml, read-only
STATE_IN_GATEWAY = "/var/lib/podllama"  # … and its state ($PODLLAMA_STATE_DIR): the request log, secrets/
KEY_DIR = str(Path(SERVER_KEY_IN_CONTAINER).parent)  # the servers' key directory: server.key alone
MODELS = "/models"
HEALTH = {"interval": "10s", "timeout": "5s", "retries": 3}
FORMATS = ("compose", "kube", "quadlet")
QUADLET_DIR = "quadlet"


class ExportError(Exception):
    pass


def always_on(cfg: Config) -> dict[str, Any]:
    """CFG's data with every server started with the stack: on-demand loading needs the engine."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    for server in data["servers"].values():
        if server.get("start") == "on-demand":
            server["start"] = "always"
            server.pop("idle_timeout", None)
    return data


def gateway_config(cfg: Config, allowed: list[str]) -> dict[str, Any]:
    """services.toml as the exported gateway reads it: models at /models, every server always on, the
    gateway's service name allowed as a Host."""
    data = always_on(cfg)
    data["stack"]["models_dir"] = MODELS
    data["gateway"]["allowed_hosts"] = sorted(set(data["gateway"].get("allowed_hosts", [])) | set(allowed))
    for key in ("admin_key_file", "api_keys_file"):
        data["gateway"].pop(key, None)  # files of this machine: the keys travel in .podllama/secrets instead
    if "tls_cert" in data["gateway"]:  # the user's certificate travels with the keys too
        data["gateway"] |= {"tls_cert": f"{STATE_IN_GATEWAY}/secrets/{tls.CERT}",
                            "tls_key": f"{STATE_IN_GATEWAY}/secrets/{tls.KEY}"}
    return data


def _stack_keys(cfg: Config, service: list[str]) -> dict[str, str]:
    """The files of the gateway's secrets: the stack's keys, and its TLS certificate and key where it has them
    (a self-signed one naming the gateway's SERVICE names too, as the exported gateway allows them)."""
    creds = Credentials(cfg.state_path)
    creds.ensure()
    keys = {"server.key": creds.server_key() or "", "admin.key": creds.admin_key() or ""}
    try:
        gateway = cfg.gateway.model_copy(update={"allowed_hosts": [*cfg.gateway.allowed_hosts, *service]})
        material, _ = tls.ensure(cfg.model_copy(update={"gateway": gateway}))
    except tls.TlsError as e:
        raise ExportError(str(e)) from None
    if material is not None:
        keys |= {tls.CERT: material.cert.read_text(), tls.KEY: material.key.read_text()}
    return keys


def _write_keys(keys: dict[str, str], out: Path) -> list[Path]:
    """The stack's keys copied for the gateway (OUT/gateway/state/secrets) and the server key alone for the
    servers (OUT/keys); server.key readable by the servers' group."""
    gateway = out / "gateway" / "state" / "secrets"
    written = []
    own = [(gateway / name, keys[name], 0o600) for name in (tls.CERT, tls.KEY) if name in keys]
    for path, value, mode in ((gateway / "admin.key", keys["admin.key"], 0o600),
                              (gateway / "server.key", keys["server.key"], 0o440),
                              (out / "keys" / "server.key", keys["server.key"], 0o440), *own):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if path.parent == gateway else 0o750)
        atomic_write(path, value + "\n", mode=mode)
        if mode == 0o440 and os.geteuid() == 0:
            os.chown(path, 0, SERVER_GID)
        written.append(path)
    if os.geteuid() == 0:
        os.chown(out / "keys", 0, SERVER_GID)
    return written


def _image(engine: CliEngine, spec: ContainerSpec, pushed: dict[str, str]) -> str:
    """The image a server runs, by digest where `build --push` recorded it (PUSHED: image id → reference), else by
    its commit tag (what `podllama build` tagged beside REPO:<variant>, never moved)."""
    image_id = engine.image_id(spec.image)
    if image_id and image_id in pushed:
        return pushed[image_id]
    commit = spec.labels.get(L_COMMIT, "")[:12]
    tagged = f"{spec.image}-{commit}" if commit else spec.image
    return tagged if engine.image_id(tagged) else spec.image


def _servers(stack: Stack) -> list[tuple[str, int, ContainerSpec]]:
    """(server, replicas, the first replica's spec, with its image as exported) for every server podllama runs, all of
    them always on."""
    cfg = config.validate(always_on(stack.cfg))
    cfg._source = stack.cfg.source
    lock = push.read(stack.cfg.root / push.LOCK)["images"].values()
    pushed = {str(e["image_id"]): str(e["ref"]) for e in lock if e.get("image_id") and e.get("ref")}
    seen: dict[str, tuple[str, int, ContainerSpec]] = {}
    for unit in Stack(cfg, stack.engine, default_variant=stack.default_variant, hw=stack.hw).units():
        if unit.server not in seen:
            unit.spec.image = _image(stack.engine, unit.spec, pushed)
            seen[unit.server] = (unit.server, stack.cfg.servers[unit.server].replicas, unit.spec)
    return list(seen.values())


def export(stack: Stack, fmt: str, out: Path, gateway_image: str, flavour: str = "kubernetes") -> list[Path]:
    """Write the stack as FMT into OUT; returns the files written. Nothing is written when the stack cannot be
    exported."""
    if fmt not in FORMATS:
        raise ExportError(f"no export format '{fmt}'; formats: {', '.join(FORMATS)}")
    servers = _servers(stack)
    if not servers:
        raise ExportError("services.toml declares no server podllama runs; nothing to export")
    service = [f"{dns_name(stack.name)}-gateway"]  # the name other containers reach the gateway by
    keys = _stack_keys(stack.cfg, service)
    gateway_toml = tomli_w.dumps(gateway_config(stack.cfg, service))
    if fmt == "compose":
        files = {"compose.yaml": compose(stack, servers, gateway_image)}
    elif fmt == "kube":
        files = {"podllama.yaml": kube(stack, servers, gateway_image, gateway_toml, keys, out, flavour)}
    else:
        files = quadlet(stack, servers, gateway_image, out)
        _remove_stale_units(out / QUADLET_DIR, set(files))
    files["gateway/services.toml"] = gateway_toml
    written = []
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
        written.append(path)
    return [*written, *_write_keys(keys, out)]


# -- GPUs ------------------------------------------------------------------------------------------------------
# a server's GPUs in each format (Quadlet takes Podman's own flags): the vendors' Kubernetes device plugins, and
# compose's device reservations (NVIDIA) or device nodes (AMD's, the render nodes)
KUBE_GPU = {"cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu"}


def _compose_gpu(gpu: GpuRequest | None) -> dict[str, Any]:
    """The keys of a compose service that give it GPU."""
    if gpu is None:
        return {}
    if gpu.backend == "cuda":
        ids = {"count": "all"} if gpu.devices == ["all"] else {"device_ids": gpu.devices}
        return {"deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "capabilities": ["gpu"]} | ids]}}}}
    return {"devices": device_nodes(gpu)} | ({"group_add": rocm_groups()} if gpu.backend == "rocm" else {})


def _kube_gpu(stack: Stack, name: str, gpu: GpuRequest | None) -> dict[str, Any]:
    """The resources of a Kubernetes container that give it GPU: its count of the vendor's device plugin's
    resource ("all": the GPUs this machine has)."""
    if gpu is None:
        return {}
    if gpu.backend not in KUBE_GPU:
        raise ExportError(f"servers.{name}: a {gpu.backend} GPU has no standard Kubernetes resource to request "
                          "(NVIDIA and AMD have device plugins); export it for compose or Quadlet, or run it on "
                          "variant = \"cuda\" or \"rocm\"")
    count = len(gpu.devices) if gpu.devices != ["all"] else \
        sum(1 for g in stack.hardware.gpus if g.backend == gpu.backend) or 1
    return {"resources": {"limits": {KUBE_GPU[gpu.backend]: count}}}


# -- compose ---------------------------------------------------------------------------------------------------
def compose(stack: Stack, servers: list[tuple[str, int, ContainerSpec]], gateway_image: str) -> str:
    gw = stack.cfg.gateway
    services: dict[str, Any] = {}
    for name, replicas, spec in servers:
        services[dns_name(name)] = {
            "image": spec.image, "command": spec.args, "restart": "unless-stopped",
            "read_only": True, "tmpfs": [f"{p}:rw,nosuid,nodev,size=256m" for p in spec.tmpfs],
            "cap_drop": ["ALL"], "security_opt": ["no-new-privileges:true"], "group_add": spec.groups,
            "environment": spec.env,
            "volumes": [f"{stack.cfg.models_path}:{MODELS}:ro", f"./keys:{KEY_DIR}:ro"],
            "networks": ["servers"],
            "healthcheck": {"test": ["CMD", "curl", "-fsS", f"http://127.0.0.1:{SERVER_PORT}/health"],
                            **HEALTH, "start_period": "30s"},
            "labels": {"podllama.stack": stack.name, "podllama.server": name},
        } | _compose_gpu(spec.gpu)
        if replicas > 1:
            services[dns_name(name)].setdefault("deploy", {})["replicas"] = replicas
    services[f"{dns_name(stack.name)}-gateway"] = {
        "image": gateway_image, "command": ["--discovery", "dns", "-c", f"{CONFIG_IN_GATEWAY}/services.toml"],
        "restart": "unless-stopped", "read_only": True, "tmpfs": ["/tmp:rw,nosuid,nodev,size=256m"],
        "cap_drop": ["ALL"], "security_opt": ["no-new-privileges:true"],
        "environment": {"PODLLAMA_PUBLISHED_HOST": gw.host, STATE_ENV: STATE_IN_GATEWAY},
        "volumes": [f"./gateway/services.toml:{CONFIG_IN_GATEWAY}/services.toml:ro",
                    f"./gateway/state:{STATE_IN_GATEWAY}", f"{stack.cfg.models_path}:{MODELS}:ro"],
        "ports": [f"{gw.host}:{gw.port}:{GATEWAY_PORT}"], "networks": ["servers", "outside"],
        "depends_on": [dns_name(n) for n, _, _ in servers],
        "labels": {"podllama.stack": stack.name, "podllama.kind": "gateway"},
    }
    doc = {"name": dns_name(stack.name), "services": services,
           "networks": {"servers": {"internal": True}, "outside": {}}}
    return _header(stack, "docker compose up -d  (or: podman-compose up -d)") + _yaml(doc)


# -- Kubernetes --------------------------------------------------------------------------------------------------
def _labels(stack: Stack, app: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": dns_name(stack.name)}


def _probe(path: str = "/health", initial: int = 5, port: int = SERVER_PORT, https: bool = False) -> dict[str, Any]:
    get = {"path": path, "port": port} | ({"scheme": "HTTPS"} if https else {})  # (the kubelet does not verify)
    return {"httpGet": get, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3,
            "initialDelaySeconds": initial}


def _hardened(uid: int | None, gid: int | None = None) -> dict[str, Any]:
    ctx: dict[str, Any] = {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                           "capabilities": {"drop": ["ALL"]}}
    if uid is not None:
        ctx |= {"runAsUser": uid, "runAsNonRoot": uid != 0}
    if gid is not None:
        ctx["runAsGroup"] = gid
    return ctx


def kube(stack: Stack, servers: list[tuple[str, int, ContainerSpec]], gateway_image: str, gateway_toml: str,
         keys: dict[str, str], out: Path, flavour: str) -> str:
    """FLAVOUR: "kubernetes" (the keys in a Secret) or "podman" (`podman kube play` of Podman < 4.4 cannot play
    a Secret, nor mount a subPath: the keys are mounted from the export's directory OUT)."""
    part = dns_name(stack.name)
    secret_name, config_name = f"{part}-keys", f"{part}-config"
    models = {"name": "models", "hostPath": {"path": str(stack.cfg.models_path), "type": "Directory"}}
    server_key_only = [{"key": "server.key", "path": "server.key"}]
    if flavour == "podman":
        keys_volume = {"name": "keys", "hostPath": {"path": str((out / "keys").resolve()), "type": "Directory"}}
        gateway_keys = {"name": "secrets",
                        "hostPath": {"path": str((out / "gateway" / "state" / "secrets").resolve()), "type": "Directory"}}
    else:
        keys_volume = {"name": "keys", "secret": {"secretName": secret_name, "defaultMode": 0o440,
                                                  "items": server_key_only}}
        gateway_keys = {"name": "secrets", "secret": {"secretName": secret_name, "defaultMode": 0o400}}
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": config_name, "labels": _labels(stack, "config")},
         "data": {"services.toml": gateway_toml}},
    ]
    if flavour != "podman":
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": secret_name, "labels": _labels(stack, "keys")},
                     "stringData": keys})
    tmp = {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}}
    for name, replicas, spec in servers:
        app = dns_name(name)
        container = {
            "name": "server", "image": spec.image, "args": spec.args,
            "env": [{"name": k, "value": v} for k, v in spec.env.items()],
            # no ports: podman kube play would publish them on the host; the headless Service needs none
            "securityContext": _hardened(10001, SERVER_GID),  # the group that reads server.key
            "volumeMounts": [{"name": "models", "mountPath": MODELS, "readOnly": True},
                             {"name": "keys", "mountPath": KEY_DIR, "readOnly": True},
                             {"name": "tmp", "mountPath": "/tmp"}],
            "readinessProbe": _probe(), "livenessProbe": _probe(initial=30),
            "startupProbe": _probe() | {"failureThreshold": int(stack.cfg.stack.ready_timeout // 10) or 1},
        } | _kube_gpu(stack, name, spec.gpu)
        docs.append(_deployment(stack, app, replicas, container, [models, keys_volume, tmp], fs_group=SERVER_GID))
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": app, "labels": _labels(stack, app)},
                     "spec": {"clusterIP": "None", "selector": _labels(stack, app),  # headless: every replica
                              "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": SERVER_PORT}]}})
    gw_app = f"{part}-gateway"
    gateway = {
        "name": "gateway", "image": gateway_image,
        "args": ["--discovery", "dns", "-c", f"{CONFIG_IN_GATEWAY}/services.toml"],
        "env": [{"name": "PODLLAMA_PUBLISHED_HOST", "value": stack.cfg.gateway.host},
                {"name": STATE_ENV, "value": STATE_IN_GATEWAY}],
        # podman kube play publishes a hostPort on the host; Kubernetes reaches the gateway through its Service
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT}
                  | ({"hostPort": stack.cfg.gateway.port, "hostIP": stack.cfg.gateway.host} if flavour == "podman" else {})],
        "securityContext": _hardened(0),
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_IN_GATEWAY, "readOnly": True},
                         {"name": "state", "mountPath": STATE_IN_GATEWAY},
                         {"name": "secrets", "mountPath": f"{STATE_IN_GATEWAY}/secrets", "readOnly": True},
                         {"name": "models", "mountPath": MODELS, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "readinessProbe": _probe(port=GATEWAY_PORT, https=stack.cfg.gateway.secure),
        "livenessProbe": _probe(initial=10, port=GATEWAY_PORT, https=stack.cfg.gateway.secure),
    }
    volumes = [{"name": "config", "configMap": {"name": config_name}}, {"name": "state", "emptyDir": {}},
               gateway_keys, models, tmp]
    docs.append(_deployment(stack, gw_app, 1, gateway, volumes))
    docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": gw_app, "labels": _labels(stack, gw_app)},
                 "spec": {"selector": _labels(stack, gw_app),
                          "ports": [{"name": "http", "port": stack.cfg.gateway.port, "targetPort": "http"}]}})
    how = "podman kube play --network NET podllama.yaml" if flavour == "podman" else "kubectl apply -f podllama.yaml"
    return _header(stack, how) + "---\n".join(_yaml(d) for d in docs)


def _deployment(stack: Stack, app: str, replicas: int, container: dict[str, Any], volumes: list[dict[str, Any]],
                fs_group: int | None = None) -> dict[str, Any]:
    pod: dict[str, Any] = {"containers": [container], "volumes": volumes, "automountServiceAccountToken": False,
                           "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}}
    if fs_group is not None:
        pod["securityContext"] |= {"fsGroup": fs_group, "supplementalGroups": [fs_group]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": app, "labels": _labels(stack, app)},
            "spec": {"replicas": replicas, "selector": {"matchLabels": _labels(stack, app)},
                     "template": {"metadata": {"labels": _labels(stack, app)}, "spec": pod}}}


# -- Quadlet ----------------------------------------------------------------------------------------------------
Value = str | list[str]  # a key's value: text, or words (Exec, PodmanArgs, Environment, Label: split as systemd does)
Section = list[tuple[str, Value]]


def quadlet(stack: Stack, servers: list[tuple[str, int, ContainerSpec]], gateway_image: str,
            out: Path) -> dict[str, str]:
    """Quadlet units (Podman's systemd generator): a .container per server replica, each under its server's DNS
    name on an internal network, and the gateway's, on that network and on one that publishes its port; systemd
    restarts what dies. The keys and the gateway's config are bind-mounted from OUT, which must stay where it
    is. Returns {path under OUT: text}."""
    part = dns_name(stack.name)
    servers_net, outside_net = f"{part}-servers.network", f"{part}.network"
    label: tuple[str, Value] = ("Label", [f"podllama.stack={stack.name}"])
    files = {f"{QUADLET_DIR}/{servers_net}": _unit(stack, f"podllama {stack.name}: the servers' network", {
                 "Network": [("NetworkName", f"{part}-servers"), ("Internal", "true"), label]}),
             f"{QUADLET_DIR}/{outside_net}": _unit(stack, f"podllama {stack.name}: the gateway's published network", {
                 "Network": [("NetworkName", part), label]})}
    models: tuple[str, Value] = ("Volume", f"{stack.cfg.models_path}:{MODELS}:ro")
    keys: tuple[str, Value] = ("Volume", f"{(out / 'keys').resolve()}:{KEY_DIR}:ro")
    service: Section = [("Restart", "always"), ("TimeoutStartSec", "900")]  # 900: time to pull an image
    install: Section = [("WantedBy", "default.target")]
    server_units = []
    for name, replicas, spec in servers:
        for replica in range(1, replicas + 1):
            unit = f"{part}-{dns_name(name)}" + (f"-{replica}" if replicas > 1 else "")
            args = [*hardening(spec), f"--network-alias={dns_name(name)}",
                    *(PodmanEngine().gpu_flags(spec.gpu) if spec.gpu else [])]
            container: Section = [
                ("ContainerName", unit), ("Image", _qualified(spec.image)), ("Network", servers_net),
                models, keys,
                *(("Environment", [f"{k}={v}"]) for k, v in spec.env.items()),
                ("PodmanArgs", args),
                ("HealthCmd", f"curl -fsS http://127.0.0.1:{SERVER_PORT}/health"),
                ("HealthInterval", str(HEALTH["interval"])), ("HealthTimeout", str(HEALTH["timeout"])),
                ("HealthRetries", str(HEALTH["retries"])), ("HealthStartPeriod", "30s"),
                label, ("Label", [f"podllama.server={name}"]), ("Exec", spec.args)]
            what = f"server {name}" + (f" (replica {replica} of {replicas})" if replicas > 1 else "")
            files[f"{QUADLET_DIR}/{unit}.container"] = _unit(stack, f"podllama {stack.name}: {what}", {
                "Container": container, "Service": service, "Install": install})
            server_units.append(f"{unit}.service")
    gw = stack.cfg.gateway
    gateway_dir = (out / "gateway").resolve()
    gateway = ContainerSpec(name=f"{part}-gateway", image=gateway_image, user="0:0")  # as `start` runs it
    container = [
        ("ContainerName", gateway.name), ("Image", _qualified(gateway_image)),
        ("Network", servers_net), ("Network", outside_net), ("PublishPort", f"{gw.host}:{gw.port}:{GATEWAY_PORT}"),
        ("Volume", f"{gateway_dir / 'services.toml'}:{CONFIG_IN_GATEWAY}/services.toml:ro"),
        ("Volume", f"{gateway_dir / 'state'}:{STATE_IN_GATEWAY}:rw"), models,
        ("Environment", [f"PODLLAMA_PUBLISHED_HOST={gw.host}", f"{STATE_ENV}={STATE_IN_GATEWAY}"]),
        ("PodmanArgs", hardening(gateway)), label, ("Label", ["podllama.kind=gateway"]),
        ("Exec", ["--discovery", "dns", "-c", f"{CONFIG_IN_GATEWAY}/services.toml"])]
    # Wants, not Requires: the gateway stays up while a server restarts, and answers 503 for it meanwhile
    files[f"{QUADLET_DIR}/{part}-gateway.container"] = _unit(stack, f"podllama {stack.name}: the gateway", {
        "Unit": [("Wants", server_units), ("After", server_units)],
        "Container": container, "Service": service, "Install": install})
    return files


def _qualified(image: str) -> str:
    """IMAGE with its registry: Podman names what it builds localhost/…, and Quadlet warns about short names."""
    first = image.split("/", 1)[0]
    return image if "/" in image and ("." in first or ":" in first or first == "localhost") else f"localhost/{image}"


def _unit(stack: Stack, description: str, sections: dict[str, Section]) -> str:
    """A Quadlet unit file. Every value is checked for line breaks (which would start a directive of their own) and
    kept literal: systemd's specifiers (%) everywhere, and variables ($) in what Podman's keys turn into the
    podman command line, escaped; word values quoted where they need it."""
    how = f"cp {QUADLET_DIR}/* /etc/containers/systemd/ && systemctl daemon-reload && " \
          f"systemctl start {dns_name(stack.name)}-gateway"
    body: dict[str, Section] = {"Unit": [("Description", description)]}
    for section, keys in sections.items():
        body.setdefault(section, []).extend(keys)
    text = _header(stack, how)
    for section, keys in body.items():
        literal = section in ("Container", "Network")  # what the generator copies into ExecStart
        text += f"\n[{section}]\n"
        for key, value in keys:
            words = [_escape(w, key, literal) for w in (value if isinstance(value, list) else [value])]
            text += f"{key}={' '.join(map(_quoted, words)) if isinstance(value, list) else words[0]}\n"
    return text


def _escape(value: str, key: str, literal: bool) -> str:
    if CONTROL.search(value):
        raise ExportError(f"{key}: {value!r} holds a control character, which cannot be written into a unit file "
                          f"(a line break would start a line of its own); remove it from services.toml")
    value = value.replace("%", "%%")
    return value.replace("$", "$$") if literal else value


def _quoted(word: str) -> str:
    if re.fullmatch(r"[\w@+=:,./%$-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _remove_stale_units(directory: Path, keep: set[str]) -> None:
    """Units an earlier export wrote into DIRECTORY that this one does not (a replica fewer): left there, they
    would still run."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.suffix in (".container", ".network") and f"{QUADLET_DIR}/{path.name}" not in keep \
                and path.read_text(errors="replace").startswith("# podllama stack"):
            path.unlink()


def _header(stack: Stack, how: str) -> str:
    # a comment line: a line break in the config's path would end it (and start a directive in a unit file)
    source = CONTROL.sub("?", str(stack.cfg.source or "services.toml"))
    return (f"# podllama stack '{stack.name}', exported from {source} by `podllama export`.\n"
            f"# Run: {how}\n")


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML ships no types
    """Multi-line strings (the ConfigMap's services.toml) as literal blocks, readable as the file they are."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def _yaml(doc: dict[str, Any]) -> str:
    return str(yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120))


def valid_dir(path: str) -> Path:
    if not re.fullmatch(r"[^\x00-\x1f]+", path):
        raise ExportError(f"'{path}' is not a directory name")
    return Path(path)
