"""On-demand servers without containers: the config keys, the memory estimate from real GGUF files, the choice
of what to stop to make room, and the plan that leaves on-demand servers to their first request."""

from __future__ import annotations

from pathlib import Path

import pytest

from podllama import config
from podllama.build import source
from podllama.engine import ContainerInfo, ContainerSpec
from podllama.models import gguf_meta, memory, tinymodel
from podllama.stack import Unit, plan
from podllama.stack.placement import Held, make_room
from podllama.stack.spec import L_HASH
from podllama.units import parse_duration, parse_size
from tests.helpers import ROOT

MiB = 2**20


# -- config ---------------------------------------------------------------------------------------------------------
def test_sizes_and_durations_as_people_write_them():
    assert parse_size("12GiB") == 12 * 2**30 and parse_size("512 MiB") == 512 * MiB and parse_size("1.5G") == 3 * 2**29
    assert parse_size("2GB") == 2 * 10**9 and parse_size(1000) == 1000
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400 and parse_duration(90) == 90
    for bad in ("twelve", "12 parsecs", "-1GiB"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)
    for bad in ("10 minutes", "m", "5x"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)


def load(text: str, tmp_path: Path) -> config.Config:
    path = tmp_path / "services.toml"
    path.write_text(text)
    return config.load(path)


def test_on_demand_keys_are_checked(tmp_path):
    cfg = load('[placement]\ncpu_memory = "12GiB"\ngpu_memory = { "cuda:0" = "22GiB" }\n'
               '[servers.a]\nmodel = "a.gguf"\nstart = "on-demand"\nidle_timeout = "5m"\n', tmp_path)
    assert cfg.servers["a"].on_demand and cfg.servers["a"].idle_seconds == 300
    assert cfg.placement.cpu_memory == "12GiB"
    cfg = load('[servers.a]\nmodel = "a.gguf"\nstart = "on-demand"\n', tmp_path)
    assert cfg.servers["a"].idle_seconds == config.DEFAULT_IDLE_TIMEOUT and cfg.placement.cpu_memory == "auto"
    for text, problem in [
        ('[servers.a]\nmodel = "a.gguf"\nidle_timeout = "5m"\n', "idle_timeout is for servers with start"),
        ('[servers.a]\nmodel = "a.gguf"\nstart = "on-demand"\nreplicas = 2\n', "takes one replica"),
        ('[servers.a]\nmodel = "a.gguf"\nstart = "sometimes"\n', "servers.a.start"),
        ('[placement]\ncpu_memory = "lots"\n', "is not a size"),
        ('[placement]\ngpu_memory = { "gpu0" = "8GiB" }\n', "is not a device"),
    ]:
        with pytest.raises(config.ConfigError, match=problem):
            load(text, tmp_path)


# -- the estimate ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("est")
    return tinymodel.write(d / "est.gguf", source.source_dir(ROOT) / tinymodel.VOCAB_FILE, n_embd=128, n_layer=4,
                           n_head=4, n_ff=256)


def test_the_estimate_adds_weights_kv_cache_and_buffers_from_the_file(tiny):
    server = config.ServerSection(model="est.gguf", ctx_size=1000, args={"parallel": 2})
    e = memory.estimate(server, [tiny])
    weights = tiny.stat().st_size
    assert 0.95 * weights < e.parts["weights"] <= weights  # every tensor, not the header
    # 1000 cells padded to 1024 × 4 layers × (128 K + 128 V) × 2 bytes (f16)
    assert e.parts["kv"] == 1024 * 4 * 256 * 2
    q8 = memory.estimate(config.ServerSection(model="est.gguf", ctx_size=1000,
                                              args={"cache_type_k": "q8_0", "cache_type_v": "q8_0"}), [tiny])
    assert q8.parts["kv"] == int(1024 * 4 * 256 * 34 / 32)
    assert e.devices == {"cpu": sum(e.parts.values())}


def test_offloaded_layers_count_on_the_gpu(tiny):
    half = memory.estimate(config.ServerSection(model="est.gguf", ctx_size=1024, gpu_layers=2), [tiny], "cuda:0")
    none = memory.estimate(config.ServerSection(model="est.gguf", ctx_size=1024, gpu_layers=0), [tiny], "cuda:0")
    full = memory.estimate(config.ServerSection(model="est.gguf", ctx_size=1024), [tiny], "cuda:0")
    assert none.devices == {"cpu": none.parts["weights"] + none.parts["kv"] + none.parts["compute"] + memory.PROCESS_CPU}
    assert 0 < half.devices["cuda:0"] < full.devices["cuda:0"]
    assert half.devices["cpu"] > full.devices["cpu"]  # the layers it keeps, and their KV cache
    # all layers and the output on the GPU: the token embeddings stay on the CPU, nothing else
    assert full.devices["cpu"] == gguf_meta.read(tiny).tensor_bytes()["token_embd.weight"] + memory.PROCESS_CPU


def test_auto_budgets_leave_a_margin():
    assert memory.budget("auto", 24 * 2**30, memory.CPU_MARGIN_MIN) == 24 * 2**30 - int(24 * 2**30 * 0.1)
    assert memory.budget("auto", 4 * 2**30, memory.CPU_MARGIN_MIN) == 3 * 2**30  # at least 1 GiB left
    assert memory.budget("6GiB", None, memory.CPU_MARGIN_MIN) == 6 * 2**30
    assert memory.budget("auto", None, memory.GPU_MARGIN_MIN) is None  # a device of unknown size: no limit
    assert memory.gpu_totals("cuda:0=1024,evil=5,rocm:1=x") == {"cuda:0": 1024}


# -- what to stop ------------------------------------------------------------------------------------------------------
def test_least_recently_used_idle_servers_go_first():
    held = [Held("old", {"cpu": 300}, True, last_used=1), Held("new", {"cpu": 300}, True, last_used=5),
            Held("busy", {"cpu": 300}, True, busy=2, last_used=0), Held("chat", {"cpu": 300}, False)]
    assert make_room("x", {"cpu": 200}, {"cpu": 1300}, held).victims == ["old"]
    assert make_room("x", {"cpu": 500}, {"cpu": 1300}, held).victims == ["old", "new"]
    # busy ones only when the idle ones are not enough (the loader lets their requests finish first)
    assert make_room("x", {"cpu": 800}, {"cpu": 1300}, held).victims == ["old", "new", "busy"]
    assert make_room("x", {"cpu": 100}, {"cpu": 1300}, held).victims == []
    assert make_room("x", {"cpu": 100}, {"cpu": None}, held).victims == []  # no budget on the device


def test_what_always_runs_is_never_stopped_and_the_refusal_says_what_holds_the_memory():
    held = [Held("chat", {"cpu": 900 * MiB}, False), Held("od", {"cpu": 300 * MiB}, True)]
    room = make_room("x", {"cpu": 400 * MiB}, {"cpu": 1200 * MiB}, held, {"cpu": '[placement] cpu_memory = "1200MiB"'})
    assert room.victims == [] and room.refusal is not None
    assert "needs 400.0 MiB on cpu" in room.refusal and "'chat' 900.0 MiB" in room.refusal
    assert 'cpu_memory = "1200MiB"' in room.refusal and "od" not in room.refusal.split("held by")[1]
    too_big = make_room("x", {"cpu": 2000 * MiB}, {"cpu": 1200 * MiB}, [])
    assert too_big.refusal and "more than the whole budget" in too_big.refusal


def test_room_is_made_on_every_device_the_server_needs():
    held = [Held("gpu-a", {"cuda:0": 10, "cpu": 1}, True, last_used=1), Held("cpu-b", {"cpu": 10}, True, last_used=2)]
    room = make_room("x", {"cuda:0": 10, "cpu": 5}, {"cuda:0": 15, "cpu": 12}, held)
    assert room.victims == ["gpu-a", "cpu-b"]  # gpu-a for the GPU; its CPU share alone is not enough
    assert make_room("x", {"cuda:0": 10}, {"cuda:0": 15, "cpu": 12}, held).victims == ["gpu-a"]


# -- the plan ----------------------------------------------------------------------------------------------------------
def unit(server: str, on_demand: bool) -> Unit:
    return Unit(server, 1, "chat", ContainerSpec(name=f"s-{server}-1", image="img"), "h1", on_demand)


def info(name: str, running: bool, h: str = "h1") -> ContainerInfo:
    return ContainerInfo(id=name, name=name, image="img", image_id="i", state="running" if running else "exited",
                         exit_code=None, started_at=None, finished_at=None, labels={L_HASH: h}, ip=None, ports={},
                         pid=None)


def test_the_plan_leaves_on_demand_servers_to_their_first_request():
    units = [unit("chat", False), unit("idle", True), unit("loaded", True), unit("changed", True)]
    running = {"s-loaded-1": info("s-loaded-1", True), "s-changed-1": info("s-changed-1", True, "old"),
               "s-idle-1": info("s-idle-1", False)}
    p = plan(units, running, None)
    assert [(s.server, s.action) for s in p.steps] == [
        ("chat", "start"), ("idle", "on-demand"), ("loaded", "keep"), ("changed", "restart")]
    assert [s.server for s in p.changes] == ["chat", "changed"]
    assert p.describe() == "start chat; idle on demand; restart changed; loaded untouched"


# -- ctx_size = "fit" -------------------------------------------------------------------------------------------
def test_a_fitted_context_on_the_cpu_is_the_largest_the_estimate_puts_within_the_budget(tiny, tmp_path):
    from podllama.build.flags import FlagSet
    from podllama.stack import Stack
    from tests.fakeengine import FakeEngine

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "est.gguf").write_bytes(tiny.read_bytes())
    base = config.ServerSection(model="est.gguf", args={"parallel": 1})
    small, large = (memory.estimate(base.model_copy(update={"ctx_size": c}), [tiny]).devices["cpu"]
                    for c in (4096, 4352))
    budget = (small + large) // 2  # 4096 cells fit, 4352 do not
    cfg = load(f'[stack]\nmodels_dir = "models"\n[placement]\ncpu_memory = "{budget}"\n'
               '[servers.chat]\nmodel = "est.gguf"\nctx_size = "auto"\nargs = { parallel = 1 }\n', tmp_path)
    assert cfg.servers["chat"].ctx_size == "fit"
    stack = Stack(cfg, FakeEngine(), default_variant="cpu")
    with_fit = FlagSet.parse("--fit [on|off]   fit\n--fit-target MiB   margin\n-c, --ctx-size N   ctx\n")
    argv, notes = stack.fitted("chat", with_fit)
    assert argv == ["--ctx-size", "4096"], argv  # the CPU: llama-server's --fit fits device memory only
    assert "podllama's estimate" in notes[0] and "llama-server fits only GPU memory" in notes[0]

    roomy = load('[stack]\nmodels_dir = "models"\n[placement]\ncpu_memory = "64GiB"\n'
                 '[servers.chat]\nmodel = "est.gguf"\nctx_size = "fit"\n', tmp_path)
    argv, _ = Stack(roomy, FakeEngine(), default_variant="cpu").fitted("chat", with_fit)
    assert argv == ["--ctx-size", "32768"], "never beyond the model's own context"


def test_ctx_size_takes_a_number_or_fit():
    assert config.ServerSection(model="m.gguf", ctx_size="fit").fits_context
    # a context read back per slot is one shared pool (no --parallel, or --kv-unified), else one per slot
    assert memory.kv_cells(config.ServerSection(model="m.gguf"), 1000, 4) == 1000
    assert memory.kv_cells(config.ServerSection(model="m.gguf", args={"parallel": 2}), 1000, 2) == 2000
    assert memory.kv_cells(config.ServerSection(model="m.gguf", args={"np": 2, "kvu": True}), 1000, 2) == 1000
    with pytest.raises(ValueError):
        config.ServerSection(model="m.gguf", ctx_size="largest")
