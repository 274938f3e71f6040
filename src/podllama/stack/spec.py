"""What the config asks for, as containers: names, labels, the llama-server command line, and the hash that
tells whether a running container still matches.

Container names are `<stack>-<server>-<replica>` (replicas count from 1) and `<stack>-gateway`; every
container carries `podllama.stack` and the labels below, so podllama only ever touches its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from ..access.credentials import SERVER_KEY_IN_CONTAINER
from ..build import flags
from ..config import ServerSection
from ..engine import ContainerInfo, ContainerSpec
from ..models.hub import ServerFiles
from .state import replica_key

SERVER_PORT = 8080
SLOTS_IN_CONTAINER = "/slots"  # an on-demand server's saved prompt caches
GATEWAY_PORT = 8080
ROLE_FLAGS: dict[str, list[str]] = {
    "chat": [], "embedding": ["--embedding"], "rerank": ["--rerank"], "vision": [], "infill": [], "audio": [],
}
L_STACK, L_KIND, L_SERVER = "podllama.stack", "podllama.kind", "podllama.server"
L_REPLICA, L_ROLE = "podllama.replica", "podllama.role"
L_HASH, L_IMAGE, L_COMMIT, L_MODEL = "podllama.config-hash", "podllama.image", "podllama.llama-commit", "podllama.model"
L_FILE, L_CHOSEN = "podllama.model-file", "podllama.chosen"
L_DRAFT = "podllama.draft-file"  # the draft model's file, on a server that drafts (speculative decoding)
L_SHA = "podllama.model-sha256"  # the model file's sha256 from the store's manifest: says which, decides nothing


class StackError(Exception):
    """A lifecycle step that cannot be done; the message names the server, the cause and the fix."""


@dataclass
class Unit:
    """One container the config asks for."""

    server: str
    replica: int
    role: str
    spec: ContainerSpec
    hash: str
    on_demand: bool = False  # started by its first request, not by `start` (issue: on-demand servers)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def key(self) -> str:
        return replica_key(self.server, self.replica)


def container_name(stack: str, server: str, replica: int) -> str:
    return f"{stack}-{server}-{replica}"


def dns_name(server: str) -> str:
    """A server's name as a DNS label, as exported stacks name its service (DNS allows no '_')."""
    return server.replace("_", "-")


def dns_hosts(server: str, replicas: int) -> list[str]:
    """The names an exported server's replicas answer to: its service (compose, a headless Kubernetes Service:
    every replica's address) and `podman kube play`'s pods (NAME-pod-0 …, one address each)."""
    return [dns_name(server), *(f"{dns_name(server)}-pod-{i}" for i in range(replicas))]


def server_args(name: str, server: ServerSection, known: flags.FlagSet | None, files: ServerFiles,
                chosen: list[str] | None = None) -> list[str]:
    """The llama-server command line of a server: model and role from podllama, the flags chosen from the model
    file (CHOSEN, see defaults.py), then the user's. FILES are in the store (hub references already resolved).
    The other kinds of server take the model and the user's args (their API key comes from the environment:
    server_env)."""
    kind = server.kind
    argv = [kind.model_flag, f"/models/{files.model}"]
    if kind.alias_flag:
        argv += [kind.alias_flag, server.alias or name]
    if kind.llama:
        argv += ["--api-key-file", SERVER_KEY_IN_CONTAINER]
        if isinstance(server.ctx_size, int):  # ("fit": the flags chosen say how, Stack.fitted)
            argv += ["--ctx-size", str(server.ctx_size)]
        if server.gpu_layers is not None:
            argv += ["--n-gpu-layers", str(server.gpu_layers)]
        if files.mmproj:
            argv += ["--mmproj", f"/models/{files.mmproj}"]
        if files.draft:
            argv += ["--spec-draft-model", f"/models/{files.draft}"]
        argv += ROLE_FLAGS[server.role] + (chosen or [])
        if "metrics" not in server.args:  # the gateway's /metrics?server= reads it
            argv.append("--metrics")
    try:
        argv += user_flags(server, known)
    except flags.FlagError as e:
        raise StackError(f"servers.{name}.{e}") from None
    return argv


def user_flags(server: ServerSection, known: flags.FlagSet | None) -> list[str]:
    """The flags a server's own tables ask for (`speculative`, then `args`), checked against KNOWN."""
    return flags.render(server.speculative, known, "speculative") + flags.render(server.args, known)


def server_env(server: ServerSection) -> dict[str, str]:
    """The environment of a server's container: the user's, and where the program reads its API key from
    (llama-server takes it as a flag)."""
    env = dict(server.env)
    if not server.kind.llama:
        env["PODLLAMA_API_KEY_FILE"] = SERVER_KEY_IN_CONTAINER
    return env


def spec_hash(spec: ContainerSpec, image_id: str) -> str:
    """What decides whether a running container still matches the config (the image by id, so a moved tag
    counts as a change)."""
    data = asdict(spec) | {"image": image_id, "name": None}
    data["labels"] = {k: v for k, v in spec.labels.items() if k not in (L_HASH, L_SHA)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]



def state_keys(infos: Iterable[ContainerInfo]) -> list[str]:
    """State keys ("<server>-<replica>") of the server containers among INFOS."""
    return [f"{i.labels.get(L_SERVER)}-{i.labels.get(L_REPLICA)}" for i in infos if i.labels.get(L_KIND) == "server"]


def int_label(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
