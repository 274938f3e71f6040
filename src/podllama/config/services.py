"""services.toml: the declarative description of one podllama stack.

The file is parsed into pydantic models; every error a person sees names the file, the key and the fix.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .. import validate as checks
from ..atomic import atomic_write
from ..units import parse_duration, parse_size
from .kinds import Kind, of_role

DEFAULT_CONFIG = "services.toml"
STATE_ENV = "PODLLAMA_STATE_DIR"
CONFIG_ENV = "PODLLAMA_CONFIG"

# llama-server's roles, then those of the other server kinds (kinds.py): transcription (whisper-server), image
# (sd-server), speech (the speech server)
Role = Literal["chat", "embedding", "rerank", "vision", "infill", "audio", "transcription", "image", "speech"]
PROJECTOR_ROLES = ("vision", "audio")  # roles whose server needs a multimodal projector (mmproj)
EngineName = Literal["auto", "podman", "docker"]
VariantName = Literal["auto", "cpu", "cuda", "rocm", "vulkan"]

# llama-server's speculative decoding types at the pinned commit (--spec-type), and those that draft with a second
# model file (draft_model); the others draft from the prompt's own n-grams or the model's MTP head
SPEC_TYPES = ("none", "draft-simple", "draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark", "ngram-simple",
              "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
DRAFT_TYPES = ("draft-simple", "draft-eagle3", "draft-dflash", "draft-dspark")
GENERATING_ROLES = ("chat", "vision", "infill", "audio")  # llama-server roles that generate text (and can draft)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
Scalar = str | int | float | bool
ArgValue = Scalar | list[Scalar]


class ConfigError(Exception):
    """A services.toml that cannot be used; the message names the file, the key and the fix."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StackSection(_Model):
    name: str = "podllama"
    engine: EngineName = "auto"
    variant: VariantName = "auto"
    models_dir: str = "./models"
    ready_timeout: Annotated[float, Field(gt=0)] = 600  # seconds a start waits for every server to be healthy

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be 1-40 characters of a-z, 0-9, '-' or '_', starting with a letter or digit")
        return v


class BuildSection(_Model):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)
    # "upstream": public base images from their registries; "local": images made by `podllama base-image`;
    # "auto": upstream where a registry gives them, else local; anything else is taken as one image reference
    # used for both stages (or BUILD,RUNTIME).
    base: str = "auto"
    repository: str = "podllama/llama-server"  # where built images are tagged
    # auto: native for images built for this machine (an update keeps what the image in use was built with);
    # portable: one image for every CPU of the architecture, for other machines
    cpu_target: Literal["auto", "portable", "native"] = "auto"
    ui: Literal["auto", "on", "off"] = "auto"
    cuda_architectures: list[str] = Field(default_factory=list)
    rocm_targets: list[str] = Field(default_factory=list)
    # where a missing image comes from: "auto" pulls the one images.lock names for its variant and commit (pushed
    # by `podllama build --push`, e.g. in CI) and compiles when there is none; "pull" only pulls; "compile" only
    # compiles
    from_: Literal["auto", "pull", "compile"] = Field("auto", alias="from")

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        if v not in ("auto", "upstream", "local"):
            for part in v.split(","):
                checks.image(part.strip())
        return v

    @field_validator("repository")
    @classmethod
    def _repository(cls, v: str) -> str:
        return checks.image_name(v)

    @field_validator("cuda_architectures")
    @classmethod
    def _cuda(cls, v: list[str]) -> list[str]:
        return [checks.cuda_architecture(a) for a in v]

    @field_validator("rocm_targets")
    @classmethod
    def _rocm(cls, v: list[str]) -> list[str]:
        return [checks.rocm_target(t) for t in v]


class GatewaySection(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    # auto: the host's network where the servers' addresses can be reached from the host (rootful engines),
    # else the stack's network with the port published; see docs/gateway.md for the measured difference
    network: Literal["auto", "host", "stack"] = "auto"
    # role → server that gets requests without a (known) model; default: the role's first server
    defaults: dict[Role, str] = Field(default_factory=dict)
    load_timeout: Annotated[float, Field(ge=0)] = 120  # wait this long for a loading server, then 503
    # a streamed request with no answer yet gets an SSE comment line this often, saying what its server is doing
    # (a load, a restart, a long prompt), so clients and proxies keep the connection; 0: never
    progress_interval: Annotated[float, Field(ge=0)] = 5
    connect_timeout: Annotated[float, Field(gt=0)] = 5
    first_byte_timeout: Annotated[float, Field(gt=0)] = 600  # from the request to the response's first byte
    idle_timeout: Annotated[float, Field(gt=0)] = 300  # between two chunks of a response (no total timeout)
    max_body_mb: Annotated[float, Field(gt=0)] = 64
    # image requests (sd-server takes any): images per request, and the longest side of each in pixels
    max_images: Annotated[int, Field(ge=1, le=64)] = 4
    max_image_side: Annotated[int, Field(ge=64, le=16384)] = 2048
    api_keys_file: str | None = None  # one inference key per line (also $PODLLAMA_API_KEYS, comma-separated)
    admin_key_file: str | None = None  # the key for /admin (also $PODLLAMA_ADMIN_KEY)
    # Host names the gateway answers to besides its bound address and localhost (DNS rebinding defence);
    # "*" turns the check off (behind a proxy that rewrites Host)
    allowed_hosts: list[str] = Field(default_factory=list)
    # Web origins allowed to call the gateway from a browser (CORS), e.g. "http://localhost:3000"; "*" = any
    cors_origins: list[str] = Field(default_factory=list)
    queue_timeout: Annotated[float, Field(gt=0)] = 30  # wait this long for a free connection to a server, then 503
    header_timeout: Annotated[float, Field(gt=0)] = 10  # a request's line and headers must arrive within this
    body_timeout: Annotated[float, Field(gt=0)] = 60  # a request body that sends nothing this long is cut off
    # a request body must average at least this many bytes a second once body_grace seconds have passed (408)
    min_body_rate: Annotated[float, Field(ge=0)] = 240
    body_grace: Annotated[float, Field(ge=0)] = 5
    # a client that takes none of its answer for this long is closed (nginx's send_timeout)
    send_timeout: Annotated[float, Field(gt=0)] = 60
    # how far a client may fall behind its server (memory 1 MiB, then a temporary file) before it is closed
    answer_buffer_mb: Annotated[float, Field(gt=0)] = 64
    max_header_kb: Annotated[int, Field(ge=4, le=1024)] = 64  # request line and headers together (431 beyond)
    max_headers: Annotated[int, Field(ge=8, le=1000)] = 100
    # keys and the request log: a postgresql:// URL (also $PODLLAMA_DATABASE given to `podllama start`);
    # default: the SQLite file podllama.db in the stack's state directory
    database: str | None = None
    log_requests: bool = True  # one row per request in the database (time, key, route, tokens, latency …)
    log_bodies: bool = False  # and the first 64 KiB of each request's and answer's body
    log_days: Annotated[float, Field(gt=0)] = 30  # rows kept this long, then pruned (usage stays in the rollups)
    log_body_days: Annotated[float, Field(gt=0)] = 7  # logged bodies kept this long (never longer than the rows)
    usage_days: Annotated[float, Field(gt=0)] = 400  # hourly usage rollups kept this long
    # HTTPS: "self-signed" (a certificate made once, kept with the stack's secrets), or tls_cert + tls_key (PEM
    # files, relative to services.toml); plain HTTP is not answered on a TLS port
    tls: Literal["off", "self-signed"] = "off"
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def secure(self) -> bool:
        return self.tls != "off" or self.tls_cert is not None

    @property
    def url(self) -> str:
        """Where the gateway is reached from this machine."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.secure else 'http'}://{host}:{self.port}"

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _tls_file(cls, v: str | None) -> str | None:
        return None if v is None else checks.text(v, "the file name")

    @model_validator(mode="after")
    def _tls(self) -> GatewaySection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: the certificate and its private key")
        if self.tls_cert is not None and self.tls != "off":
            raise ValueError("tls = \"self-signed\" and tls_cert/tls_key are two ways to the same thing; keep one")
        return self

    @field_validator("database")
    @classmethod
    def _database(cls, v: str | None) -> str | None:
        return checks.database_url(v) if v else None

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for host in v:
            if host != "*" and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]", host):
                raise ValueError(f"'{host}' is not a host name (like example.lan, 192.168.1.5 or [fd00::5]), or '*'")
        return [h.lower() for h in v]

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\[\]:-]+", origin):
                raise ValueError(f"'{origin}' is not an origin (scheme://host[:port], no path, e.g. "
                                 "http://localhost:3000), or '*'")
        return [o.lower().rstrip("/") for o in v]


class HubSection(_Model):
    """Where models come from."""

    endpoint: str | None = None  # default: $HF_ENDPOINT, else https://huggingface.co
    token_file: str | None = None  # a file holding a Hugging Face read token (also $HF_TOKEN); never printed


class SupervisorSection(_Model):
    """How the supervisor (inside the gateway) keeps servers up."""

    interval: Annotated[float, Field(gt=0)] = 2.0  # seconds between rounds
    unhealthy_after: Annotated[int, Field(ge=1)] = 3  # failed probes of a loaded server before it is restarted
    stall_timeout: Annotated[float, Field(gt=0)] = 300  # loading with no new log output this long → restart
    # a new server not listening after this long is not answering (one that listens only once loaded: loading)
    listen_timeout: Annotated[float, Field(gt=0)] = 30
    backoff_initial: Annotated[float, Field(ge=0)] = 1.0
    backoff_max: Annotated[float, Field(gt=0)] = 60.0
    crash_loop_limit: Annotated[int, Field(ge=1)] = 5  # restarts within crash_loop_window → marked failed
    crash_loop_window: Annotated[float, Field(gt=0)] = 300


class UpdateSection(_Model):
    """How `podllama update` checks a new llama.cpp build against the running one before it serves
    (docs/updating.md): a shadow server per server on the candidate image, the conformance set replayed on both."""

    check: bool = True  # before every update and rebuild (`--no-check` skips it once)
    gate: Literal["strict", "report"] = "strict"  # strict: a difference stops the rollout; report: it is only told
    # requests per route family the gateway keeps, bodies included, to replay beside the built-in cases; 0: none
    sample: Annotated[int, Field(ge=0, le=100)] = 0
    min_cosine: Annotated[float, Field(ge=-1, le=1)] = 0.999  # an embedding moved further than this is a difference
    min_text_equal: Annotated[float, Field(ge=0, le=1)] = 0.0  # share of equal answers below which text differs
    max_slowdown: Annotated[float, Field(ge=0)] = 0.5  # tokens/s or load time this much worse (0.5: 50 %) differs
    timeout: Annotated[float, Field(gt=0)] = 120  # per request of the replay


DEFAULT_IDLE_TIMEOUT = 600.0  # an on-demand server unused this long is stopped


class PlacementSection(_Model):
    """How much memory the stack's servers may hold at once, per device; on-demand servers are started and
    stopped to stay within it. "auto": what the device has, less a margin (see docs/on-demand.md)."""

    cpu_memory: str = "auto"
    gpu_memory: dict[str, str] = Field(default_factory=dict)  # {"cuda:0" = "22GiB"}; devices not named: auto

    @field_validator("cpu_memory")
    @classmethod
    def _cpu(cls, v: str) -> str:
        if v != "auto":
            parse_size(v)
        return v

    @field_validator("gpu_memory")
    @classmethod
    def _gpu(cls, v: dict[str, str]) -> dict[str, str]:
        for device, size in v.items():
            if not re.fullmatch(r"(cuda|rocm|vulkan):[0-9]{1,2}", device):
                raise ValueError(f"'{device}' is not a device; name it like \"cuda:0\", \"rocm:1\" or \"vulkan:0\"")
            if size != "auto":
                parse_size(size)
        return v


class ServerSection(_Model):
    role: Role = "chat"
    model: str
    # a file in models_dir used while `model` (a hub reference) is not in the store and cannot be downloaded
    fallback: str | None = None
    alias: str | None = None
    mmproj: str | None = None
    # a smaller model of the same tokenizer that drafts tokens for this one to verify (speculative decoding): a
    # file in models_dir or an hf:// reference, pulled like the model
    draft_model: str | None = None
    # llama-server's speculative settings, its --spec-* flags without the prefix: type = "draft-simple",
    # draft_n_max = 16, draft_ngl = "all", ngram_mod_n_match = 24 …
    speculative: dict[str, ArgValue] = Field(default_factory=dict)
    # tokens of context; "fit" (or "auto"): the largest that fits the device, by llama-server's own fitting
    # where the image has --fit, else by podllama's memory estimate within [placement]
    ctx_size: Annotated[int, Field(ge=0)] | Literal["fit"] | None = None
    gpu_layers: Annotated[int, Field(ge=0)] | Literal["auto", "all"] | None = None
    replicas: Annotated[int, Field(ge=1, le=16)] = 1
    variant: VariantName | None = None
    gpus: list[str] | Literal["all"] | None = None
    args: dict[str, ArgValue] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    # "always": runs from `podllama start` on; "on-demand": started by the first request for it, stopped when
    # idle for idle_timeout or when another server needs its memory ([placement])
    start: Literal["always", "on-demand"] = "always"
    idle_timeout: float | None = None  # seconds or "10m"; on-demand servers only (default: 10 minutes)

    @field_validator("ctx_size", mode="before")
    @classmethod
    def _ctx(cls, v: Any) -> Any:
        if v in ("fit", "auto"):
            return "fit"
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(f"{v!r} is not a context size: a number of tokens (0: the model's), or \"fit\"")

    @property
    def fits_context(self) -> bool:
        return self.ctx_size == "fit"

    @field_validator("idle_timeout", mode="before")
    @classmethod
    def _idle(cls, v: Any) -> float | None:
        if v is None:
            return None
        seconds = parse_duration(v)
        if seconds <= 0:
            raise ValueError("must be more than 0 seconds")
        return seconds

    @property
    def on_demand(self) -> bool:
        return self.start == "on-demand"

    @property
    def saves_slots(self) -> bool:
        """Its prompt caches are saved when it is unloaded and restored when it is loaded (on-demand servers
        that do not set slot saving themselves)."""
        return self.on_demand and self.kind.slots and not {"slot_save_path", "slots"} & set(self.args)

    @property
    def kind(self) -> Kind:
        """The server program that serves its role (kinds.py)."""
        return of_role(self.role)

    @property
    def origin(self) -> str:
        """Where it serves from: its model file (a remote server: its URL)."""
        return self.model

    @property
    def idle_seconds(self) -> float:
        return self.idle_timeout if self.idle_timeout is not None else DEFAULT_IDLE_TIMEOUT

    @field_validator("model", "mmproj", "fallback", "draft_model")
    @classmethod
    def _file(cls, v: str | None) -> str | None:
        if v is None:
            return v
        checks.text(v, "the file name")
        if v.startswith("hf://"):
            checks.hf_reference(v)
            return v
        p = Path(v)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(
                f"'{v}' leaves the models directory; name a file inside models_dir "
                "(e.g. 'my-model.gguf' or 'org/my-model.gguf')"
            )
        return v

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str | None) -> str | None:
        return None if v is None else checks.text(v, "alias")

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: list[str] | str | None) -> list[str] | str | None:
        return [checks.device(d) for d in v] if isinstance(v, list) else v

    @field_validator("args", "speculative")
    @classmethod
    def _args(cls, v: dict[str, ArgValue]) -> dict[str, ArgValue]:
        for key, value in v.items():
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", key):
                raise ValueError(f"'{key}' is not a flag name; write it without dashes, e.g. parallel = 2")
            for item in value if isinstance(value, list) else [value]:
                checks.arg_value(item, key)
        return v

    @property
    def spec_types(self) -> list[str]:
        """The speculative types asked for (speculative.type: one, a list, or comma-separated)."""
        given = self.speculative.get("type", [])
        return [t.strip() for item in (given if isinstance(given, list) else [given]) for t in str(item).split(",")]

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"'{key}' is not an environment variable name")
            if "\x00" in value:
                raise ValueError(f"env.{key} holds a NUL byte")
        return v

    @model_validator(mode="after")
    def _fallback(self) -> ServerSection:
        if self.fallback is not None and not self.model.startswith("hf://"):
            raise ValueError("fallback is for a model = \"hf://…\" that may not be downloadable; a local model "
                             "needs none")
        if self.fallback is not None and self.fallback.startswith("hf://"):
            raise ValueError("fallback must be a file in models_dir, not a hub reference")
        return self

    @model_validator(mode="after")
    def _on_demand(self) -> ServerSection:
        if self.idle_timeout is not None and not self.on_demand:
            raise ValueError("idle_timeout is for servers with start = \"on-demand\"; an \"always\" server is never "
                             "stopped for being idle")
        if self.on_demand and self.replicas > 1:
            raise ValueError("start = \"on-demand\" takes one replica; use replicas = 1 or start = \"always\"")
        return self

    @model_validator(mode="after")
    def _kind(self) -> ServerSection:
        if self.kind.llama:
            return self
        given = [k for k in ("mmproj", "ctx_size", "gpu_layers", "draft_model") if getattr(self, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: llama-server settings; role '{self.role}' runs "
                             f"{self.kind.program}, which has none (give its own flags in args)")
        return self

    @model_validator(mode="after")
    def _speculative(self) -> ServerSection:
        if not (self.draft_model or self.speculative):
            return self
        if self.role not in GENERATING_ROLES:
            raise ValueError(f"draft_model, speculative: speculative decoding speeds up generating text; role "
                             f"'{self.role}' generates none (roles that do: {', '.join(GENERATING_ROLES)})")
        unknown = [t for t in self.spec_types if t not in SPEC_TYPES]
        if unknown:
            raise ValueError(f"speculative.type: {', '.join(map(repr, unknown))} is not a speculative type of this "
                             f"llama-server; types: {', '.join(SPEC_TYPES)}")
        drafting = [t for t in self.spec_types if t in DRAFT_TYPES]
        if drafting and not self.draft_model:
            raise ValueError(f"speculative.type {drafting[0]!r} drafts with a second model; name it in draft_model "
                             "(a GGUF of the same tokenizer, in models_dir or hf://org/repo:QUANT)")
        if self.draft_model and self.spec_types and not drafting:
            raise ValueError(f"draft_model is set, but speculative.type {', '.join(self.spec_types)} uses no draft "
                             f"model; add \"draft-simple\" to the types or remove draft_model")
        spelled = [k for k in self.speculative if k.replace("_", "-") in ("draft-model", "draft-hf", "model-draft")]
        if spelled:
            raise ValueError(f"speculative.{spelled[0]}: the draft model is draft_model in the server section, "
                             "where podllama pulls, mounts and checks it")
        return self

    @model_validator(mode="after")
    def _projector(self) -> ServerSection:
        if self.role in PROJECTOR_ROLES and not self.mmproj and not self.model.startswith("hf://"):
            raise ValueError(f"role '{self.role}' needs mmproj = \"FILE\" (the model's multimodal projector GGUF), "
                             "or a model = \"hf://…\" whose repo has one")
        return self


# What a server that podllama runs has and a remote one cannot: set on a [servers.X] with url, they are refused.
RUN_ONLY = ("fallback", "mmproj", "ctx_size", "gpu_layers", "replicas", "variant", "gpus", "args", "env", "start",
            "idle_timeout", "draft_model", "speculative")


class RemoteServer(ServerSection):
    """A server podllama routes to and health-checks but does not run: `[servers.X] url = "http://host:port"` —
    a llama-server on another machine, or any OpenAI-compatible server. Requests keep the model name the
    client sent (make `alias` the name the server expects, for servers that check it)."""

    url: str
    model: str = ""  # what it serves, as a name clients may use (optional)
    api_key_file: str | None = None  # a file holding the key it wants (relative to services.toml)
    ca_file: str | None = None  # https:// servers: a PEM CA that signed its certificate (besides the system's)
    health: str = "/health"  # the path that answers 200 when it is ready (e.g. /v1/models)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        checks.text(v, "url")
        u = urlsplit(v)
        try:
            port = u.port
        except ValueError:
            port = None
        if u.scheme not in ("http", "https") or not u.hostname or port is None or u.username or u.password or \
                u.query or u.fragment or u.path not in ("", "/") or not re.fullmatch(r"[A-Za-z0-9.:_\[\]-]+", u.netloc):
            raise ValueError(f"'{v}' is not http(s)://HOST:PORT (a port, no path or credentials; the key goes in "
                             "api_key_file)")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _ca(self) -> RemoteServer:
        if self.ca_file is not None and not self.secure:
            raise ValueError("ca_file is for an https:// server; this one is plain HTTP")
        return self

    @property
    def secure(self) -> bool:
        return self.url.startswith("https://")

    @field_validator("health")
    @classmethod
    def _health(cls, v: str) -> str:
        if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", v):
            raise ValueError(f"'{v}' is not a path such as /health or /v1/models")
        return v

    @field_validator("model")
    @classmethod
    def _served(cls, v: str) -> str:
        return v and checks.text(v, "model")

    @model_validator(mode="after")
    def _projector(self) -> RemoteServer:  # the remote server has its projector, if any
        return self

    @model_validator(mode="after")
    def _runs_elsewhere(self) -> RemoteServer:
        given = [k for k in RUN_ONLY if k in self.model_fields_set]
        if given:
            raise ValueError(f"{', '.join(given)}: settings of a server podllama runs; a server with url runs "
                             "elsewhere (set them where it runs)")
        return self

    @property
    def origin(self) -> str:
        return self.url

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (443 if self.secure else 80)


class Config(_Model):
    stack: StackSection = Field(default_factory=StackSection)
    build: BuildSection = Field(default_factory=lambda: BuildSection.model_validate({}))
    gateway: GatewaySection = Field(default_factory=GatewaySection)
    supervisor: SupervisorSection = Field(default_factory=SupervisorSection)
    hub: HubSection = Field(default_factory=HubSection)
    placement: PlacementSection = Field(default_factory=PlacementSection)
    update: UpdateSection = Field(default_factory=UpdateSection)
    servers: dict[str, ServerSection] = Field(default_factory=dict)  # the servers podllama runs
    # [servers.X] sections with url: routed and health-checked, run elsewhere
    remotes: dict[str, RemoteServer] = Field(default_factory=dict)

    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _split_remotes(cls, data: Any) -> Any:
        """[servers.X] with url is a remote server; in the file both are [servers.X]."""
        if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
            return data
        if "remotes" in data:
            raise ValueError("there is no [remotes] section: write [servers.NAME] with url = \"http://host:port\"")
        servers = {k: v for k, v in data["servers"].items() if not (isinstance(v, dict) and "url" in v)}
        remotes = {k: v for k, v in data["servers"].items() if k not in servers}
        return {**data, "servers": servers, "remotes": remotes}

    @property
    def routable(self) -> dict[str, ServerSection]:
        """Every server the gateway routes to: the ones podllama runs and the remote ones."""
        return {**self.servers, **self.remotes}

    @model_validator(mode="after")
    def _servers(self) -> Config:
        routable = self.routable
        for role, chosen in self.gateway.defaults.items():
            if chosen not in routable:
                raise ValueError(f"gateway.defaults.{role}: no server named '{chosen}'")
            if routable[chosen].role != role:
                raise ValueError(f"gateway.defaults.{role}: server '{chosen}' has role '{routable[chosen].role}'")
        names: dict[str, str] = {}
        for name, server in routable.items():
            if not NAME_RE.match(name):
                raise ValueError(
                    f"server name '{name}' must be 1-40 characters of a-z, 0-9, '-' or '_' "
                    "(it becomes part of container names)"
                )
            for called in {name, server.alias or name}:
                other = names.get(called)
                if other is not None and other != name:
                    raise ValueError(f"'{called}' names both server '{other}' and server '{name}'; names and aliases "
                                     "must be unique")
                names[called] = name
        return self

    # -- where things live -------------------------------------------------------------------------------
    @property
    def source(self) -> Path | None:
        """The file this config was loaded from (None when built in memory)."""
        return self._source

    @property
    def root(self) -> Path:
        return self._source.parent if self._source else Path.cwd()

    @property
    def models_path(self) -> Path:
        p = Path(os.path.expanduser(self.stack.models_dir))
        return (p if p.is_absolute() else self.root / p).resolve()

    @property
    def hub_token_file(self) -> Path | None:
        f = self.hub.token_file
        return self.named_file(f) if f else None

    def named_file(self, name: str) -> Path:
        """A file the config names (key files, the hub token): absolute, or relative to services.toml."""
        return Path(name) if Path(name).is_absolute() else self.root / name

    @property
    def state_path(self) -> Path:
        """Per-stack state: build logs, recorded image facts, credentials. Kept beside the config, ignored by git;
        $PODLLAMA_STATE_DIR elsewhere (an exported gateway: its config is read-only, its state is not)."""
        return Path(os.environ.get(STATE_ENV) or self.root / ".podllama")

    def remote_key(self, name: str) -> str | None:
        """The key remote server NAME wants, read from its api_key_file now (None: it wants none)."""
        f = self.remotes[name].api_key_file
        if not f:
            return None
        path = self.named_file(f)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"servers.{name}.api_key_file: cannot read {path} ({e.strerror}); write the server's "
                              "key there") from None
        return checks.text(key, f"the key in {path}") if key else None

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))

    @model_serializer(mode="wrap")
    def _as_in_the_file(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Remote servers are [servers.X] sections in the file, with only what was set."""
        data: dict[str, Any] = handler(self)
        data.pop("remotes", None)
        data["servers"] = {**data.get("servers", {}), **{
            n: r.model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {"url": r.url}
            for n, r in self.remotes.items()}}
        return data


def config_path(path: str | os.PathLike[str] | None) -> Path:
    """The config file to use: the given path, else $PODLLAMA_CONFIG, else ./services.toml."""
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    p = config_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: no such file; create one (see docs/configuration.md) or point to it with "
            f"-c/--config PATH or ${CONFIG_ENV}"
        ) from None
    return parse(text, source=p)


def parse(text: str, source: Path | None = None) -> Config:
    where = str(source) if source else "services.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}; fix the syntax at that line") from None
    cfg = validate(data, where)
    if source is not None:
        cfg._source = source.resolve()
    return cfg


def validate(data: Any, where: str = "services.toml") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, where)) from None


def format_errors(e: ValidationError, where: str) -> str:
    lines = []
    for err in e.errors():
        loc = ["servers" if i == 0 and p == "remotes" else p for i, p in enumerate(err["loc"])]
        key = ".".join(str(p) for p in loc if not _is_union_tag(p)) or "(top level)"
        lines.append(f"{where}: {key}: {_explain(err)}")
    return "\n".join(dict.fromkeys(lines))


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the member type of a union to the location ("int", "literal['auto','all']" ...)
    return isinstance(part, str) and (part.startswith(("literal[", "list[", "function-"))
                                      or part in {"int", "str", "float", "bool"})


def _explain(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling (docs/configuration.md lists every key)"
    if kind == "missing":
        return "required key is missing; add it"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if "input" in err and kind != "value_error":
        return f"{msg} (got {err['input']!r})"
    return msg


def save(cfg: Config, path: Path) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of it."""
    atomic_write(path, cfg.to_toml())


__all__ = [
    "ArgValue", "BuildSection", "CONFIG_ENV", "Config", "ConfigError", "DEFAULT_CONFIG", "DEFAULT_IDLE_TIMEOUT",
    "EngineName", "GatewaySection", "HubSection", "NAME_RE", "PROJECTOR_ROLES", "PlacementSection", "RUN_ONLY",
    "RemoteServer", "Role", "STATE_ENV", "Scalar", "ServerSection", "StackSection", "SupervisorSection", "UpdateSection",
    "VariantName", "config_path", "format_errors", "load", "parse", "save", "validate",
]
