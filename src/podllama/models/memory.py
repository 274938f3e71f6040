"""How much memory a server will take, from its GGUF files and its flags, before it starts; and how much the
stack may hold ([placement]).

The estimate follows what llama.cpp allocates (at the pinned commit):
- weights: the model's tensors. On the CPU they are mapped from the file and resident once used (the warm-up
  at load uses them all). With `--n-gpu-layers N` the last N repeating layers go to the GPU (all of them and
  the output layer beyond the layer count); the token embeddings stay on the CPU.
- KV cache: n_ctx cells (the server's context: `ctx_size`, else the model's training context) × layers ×
  (K width + V width) × the cache type's bytes per element; padded to 256 cells, and with --parallel N (no
  unified cache) to N pools of 256-cell multiples. Layers with sliding-window attention hold only
  n_swa × slots + n_ubatch cells (padded to 256), as llama.cpp's iSWA cache does.
- compute buffers: 256 bytes per vocabulary entry plus 16 per embedding width × n_ubatch (fitted to what the
  test models really take; bench/RESULTS-ondemand.md shows estimate against measured).
- the process itself: 20 MiB on the CPU; on a GPU, its context (400 MiB).
- a draft model (speculative decoding): its own weights, KV cache and compute buffers, for the same context
  and slots as the server (llama-server gives the draft the target's), its layers offloaded by
  speculative.draft_ngl (default: all) and its cache typed by speculative.draft_type_k/v (default f16).
Nothing here is exact; the figure measured once a server runs replaces it (gateway/ondemand.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ServerSection
from ..engine.hardware import Gpu
from ..units import parse_size
from .gguf_meta import Metadata
from .gguf_meta import read as read_gguf

MiB = 2**20
PROCESS_CPU = 20 * MiB
PROCESS_GPU = 400 * MiB
# bytes per KV element by cache type (block size and bytes per block of ggml's types)
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
            "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}
# sliding-window layer patterns llama.cpp assumes when the file does not say (src/models/*.cpp)
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma-embedding": 6, "gemma3n": 5, "cohere2": 4, "llama4": 4,
               "openai-moe": 2, "olmo2": 4, "exaone4": 4, "afmoe": 4, "plamo3": 8}
CPU_MARGIN_MIN = 2**30  # "auto" budgets leave this much, or MARGIN_SHARE of the device, whichever is more
MARGIN_SHARE = 0.10
GPU_MARGIN_MIN = 512 * MiB


@dataclass
class Estimate:
    """Bytes per device ("cpu", "cuda:0" …) and what they are made of."""

    devices: dict[str, int] = field(default_factory=dict)
    parts: dict[str, int] = field(default_factory=dict)  # weights, kv, compute, process

    @property
    def total(self) -> int:
        return sum(self.devices.values())


# the spellings of the flags the estimate reads in `args`
GPU_LAYERS, CACHE_K, CACHE_V = ("n_gpu_layers", "ngl", "gpu_layers"), ("cache_type_k", "ctk"), ("cache_type_v", "ctv")


def _arg(server: ServerSection, *names: str) -> object:
    return next((server.args[n] for n in names if n in server.args), None)


# what the servers that are not llama-server hold beyond their model files (interpreter, runtime, buffers)
OTHER_PROCESS = {"whisper": 64 * MiB, "sd": 256 * MiB, "speech": 160 * MiB}


def estimate(server: ServerSection, files: list[Path], device: str = "cpu", draft: Sequence[Path] = (),
             read: Callable[[Path], Metadata] = read_gguf) -> Estimate:
    """What SERVER (its model FILES: the model's shards, then a projector if any; its DRAFT model's shards)
    will hold, on DEVICE for the layers it offloads and on the CPU for the rest. READ gives a file's metadata
    (a caller may keep what it read)."""
    if draft:
        main, extra = estimate(server, files, device, read=read), estimate(_as_draft(server), list(draft), device,
                                                                            read=read)
        shared = {"cpu": PROCESS_CPU, device: PROCESS_GPU if device != "cpu" else PROCESS_CPU}  # one process
        for where, size in extra.devices.items():
            main.devices[where] = main.devices.get(where, 0) + size - shared.get(where, 0)
        main.parts["draft"] = extra.total - sum(shared.get(w, 0) for w in extra.devices)
        return main
    if not server.kind.llama:
        weights = sum(f.stat().st_size for f in files)
        process = OTHER_PROCESS[server.kind.name]
        working = weights // 4
        return Estimate({device: weights + working + process},
                        {"weights": weights, "compute": working, "process": process})
    metas = [read(f) for f in files]
    meta = metas[0]
    n_layer = int(meta.arch_value("block_count") or 0)
    layers = _offloaded(server, n_layer) if device != "cpu" else 0
    cpu = gpu = 0
    for m in metas:
        for name, size in m.tensor_bytes().items():
            layer = re.match(r"blk\.(\d+)\.", name)
            on_gpu = device != "cpu" and (
                (layer is not None and int(layer.group(1)) >= n_layer - layers) or
                (layer is None and name.startswith("output") and layers > n_layer) or
                (m is not meta and m.architecture == "clip"))  # a projector goes where the layers go
            if on_gpu:
                gpu += size
            else:
                cpu += size
    ubatch = int(_arg(server, "ubatch_size", "ub") or 512)  # type: ignore[call-overload]
    kv = _kv_bytes(server, meta, n_layer, ubatch)
    n_vocab = meta.vocab_size or 32000
    n_embd = int(meta.arch_value("embedding_length") or 0)
    compute = n_vocab * 256 + n_embd * ubatch * 16
    parts = {"weights": cpu + gpu, "kv": kv, "compute": compute,
             "process": PROCESS_CPU + (PROCESS_GPU if device != "cpu" else 0)}
    if device == "cpu" or layers == 0:
        return Estimate({"cpu": cpu + gpu + kv + compute + PROCESS_CPU}, parts)
    share = min(layers, n_layer) / n_layer if n_layer else 1.0  # KV of offloaded layers lives on the GPU
    kv_gpu = int(kv * share)
    return Estimate({"cpu": cpu + (kv - kv_gpu) + PROCESS_CPU, device: gpu + kv_gpu + compute + PROCESS_GPU}, parts)


def _as_draft(server: ServerSection) -> ServerSection:
    """SERVER's settings as its draft model gets them: the same context and slots, the draft's own offload and
    cache types."""
    spec = server.speculative
    args = {k: v for k, v in server.args.items() if k not in GPU_LAYERS + CACHE_K + CACHE_V}
    args |= {"cache_type_k": spec.get("draft_type_k", "f16"), "cache_type_v": spec.get("draft_type_v", "f16")}
    ngl = spec.get("draft_ngl")
    return server.model_copy(update={"args": args, "gpu_layers": None if ngl is None else str(ngl),
                                     "draft_model": None, "speculative": {}, "mmproj": None})


def _offloaded(server: ServerSection, n_layer: int) -> int:
    ngl = server.gpu_layers if server.gpu_layers is not None else _arg(server, *GPU_LAYERS)
    if ngl in (None, "auto", "all"):
        return n_layer + 1  # llama.cpp's default offloads everything that fits; count all of it
    return int(str(ngl))


def kv_cells(server: ServerSection, per_request: int, slots: int) -> int:
    """The KV cells a llama-server holds whose slots each take PER_REQUEST tokens (its /props): one pool all
    slots share when the cache is unified (llama-server's default when --parallel is not given), else one per
    slot."""
    return per_request if _unified(server) else per_request * slots


def _unified(server: ServerSection) -> bool:
    """Whether its slots share one KV pool: --kv-unified, or llama-server's default without --parallel."""
    unified = _arg(server, "kv_unified", "kvu")
    return bool(unified) if unified is not None else _arg(server, "parallel", "np") in (None, -1, "-1")


def _cells(n: int) -> int:
    """N KV cells as llama.cpp allocates them: padded to a multiple of 256."""
    return -(-n // 256) * 256


def _kv_bytes(server: ServerSection, meta: Metadata, n_layer: int, ubatch: int) -> int:
    given = server.ctx_size if isinstance(server.ctx_size, int) else 0  # "fit": at most the model's own
    ctx = given or int(_arg(server, "ctx_size", "c") or 0) or int(meta.arch_value("context_length") or 4096)  # type: ignore[call-overload]
    parallel = int(_arg(server, "parallel", "np") or -1)  # type: ignore[call-overload]
    slots = parallel if parallel > 0 else 4
    n_head = int(meta.arch_value("attention.head_count") or 1)
    n_head_kv = meta.arch_value("attention.head_count_kv")
    n_head_kv = int(n_head_kv if isinstance(n_head_kv, int) else n_head)
    n_embd = int(meta.arch_value("embedding_length") or 0)
    k_len = int(meta.arch_value("attention.key_length") or (n_embd // n_head if n_head else 0))
    v_len = int(meta.arch_value("attention.value_length") or k_len)
    k_type = str(_arg(server, *CACHE_K) or "f16")
    v_type = str(_arg(server, *CACHE_V) or "f16")
    per_cell = n_head_kv * (k_len * KV_BYTES.get(k_type, 2.0) + v_len * KV_BYTES.get(v_type, 2.0))
    cells = _cells(ctx)
    if not _unified(server) and slots > 1:  # a pool per slot, each padded to 256 cells (llama-context.cpp)
        cells = _cells(cells // slots) * slots
    n_swa = int(meta.arch_value("attention.sliding_window") or 0)
    swa_layers = 0
    if n_swa and not _arg(server, "swa_full"):
        pattern = meta.arch_value("attention.sliding_window_pattern")
        pattern = pattern if isinstance(pattern, int) and pattern > 0 else SWA_PATTERN.get(meta.architecture or "", 1)
        swa_layers = n_layer - -(-n_layer // pattern) if pattern > 1 else 0
    swa_cells = min(cells, _cells(n_swa * slots + ubatch))
    return int(per_cell * (cells * (n_layer - swa_layers) + swa_cells * swa_layers))


# -- the budget -------------------------------------------------------------------------------------------------
def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/meminfo")


def host_memory() -> int:
    """The machine's memory, from /proc/meminfo (a container sees the host's)."""
    return _meminfo("MemTotal")


def available_memory() -> int:
    """What the machine could give a new process now without swapping (MemAvailable)."""
    return _meminfo("MemAvailable")


def budget(setting: str, total: int | None, margin_min: int) -> int | None:
    """A device's budget: SETTING bytes, or for "auto" TOTAL less max(MARGIN_MIN, 10 %) (None: unknown)."""
    if setting != "auto":
        return parse_size(setting)
    if total is None:
        return None
    return max(0, total - max(margin_min, int(total * MARGIN_SHARE)))


def gpu_totals(text: str) -> dict[str, int]:
    """{"cuda:0": bytes} from "cuda:0=25769803776,rocm:1=…" (what the host tells the gateway container, which
    cannot see the GPUs itself; see gpu_totals_text)."""
    out = {}
    for item in text.split(","):
        device, _, size = item.strip().partition("=")
        if re.fullmatch(r"(cuda|rocm|vulkan):[0-9]{1,2}", device) and size.isdigit():
            out[device] = int(size)
    return out


def gpu_totals_text(gpus: list[Gpu]) -> str:
    """The host's GPUs' memory, for the gateway container's environment."""
    return ",".join(f"{g.backend}:{g.index if g.index is not None else n}={g.memory_mib * MiB}"
                    for n, g in enumerate(gpus) if g.memory_mib)
