"""What makes the first run work, without containers: what a GGUF file says and what podllama fills in from it,
progress read from real build output, the preflight's port check, the systemd unit, and `/`."""

from __future__ import annotations

import http.server
import io
import struct
import threading

import httpx
import pytest
from rich.console import Console

from podllama import config
from podllama.build import images
from podllama.build.errors import BuildError
from podllama.engine import PodmanEngine
from podllama.models import defaults, gguf_meta
from podllama.models.gguf_meta import GGUFError, Metadata
from podllama.progress import Steps, build_progress
from podllama.stack import Stack, StackError, service
from tests.unit.conftest import free_port


# -- GGUF metadata ---------------------------------------------------------------------------------------------
def test_gguf_metadata_of_real_files(vocab_file, tmp_path):
    from podllama.models import tinymodel

    vocab = gguf_meta.read(vocab_file)
    assert vocab.architecture == "llama" and vocab.vocab_size == 32000 and vocab.chat_template is None
    tiny = gguf_meta.read(tinymodel.write(tmp_path / "tiny.gguf", vocab_file))
    assert tiny.chat_template and "<|im_start|>" in tiny.chat_template
    assert tiny.arch_value("block_count") == 2 and tiny.arch_value("embedding_length") == 64


def _gguf(kvs: bytes, count: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, count) + kvs


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@pytest.mark.parametrize("data, says", [
    (b"NOPE" + b"\0" * 20, "not a GGUF file"),
    (_gguf(b"", 1)[:-2], "ends early"),
    (_gguf(b"", 10**9), "metadata entries"),
    (_gguf(struct.pack("<Q", 1 << 40) + b"key", 1), "claims"),
    (_gguf(_string(b"k") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 1 << 40), 1), "claims"),
    (_gguf(_string(b"k") + struct.pack("<I", 99), 1), "unknown value type"),
])
def test_a_hostile_or_broken_gguf_is_refused_with_a_reason(tmp_path, data, says):
    f = tmp_path / "bad.gguf"
    f.write_bytes(data)
    with pytest.raises(GGUFError) as e:
        gguf_meta.read(f)
    assert says in str(e.value) and str(f) in str(e.value)


# -- flags chosen from the model file -------------------------------------------------------------------------
def meta(arch: str, name: str = "", template: str | None = None, vocab: int = 32000, **values: object) -> Metadata:
    m = Metadata("x.gguf", 3, 0, {"general.architecture": arch, "general.name": name, **values},
                 {"tokenizer.ggml.tokens": vocab})
    if template:
        m.values["tokenizer.chat_template"] = template
    return m


def test_a_chat_template_for_files_without_one():
    assert defaults.for_server("chat", {}, meta("gemma3", "Gemma 3 1b It"))[0] == ["--chat-template", "gemma"]
    assert defaults.for_server("chat", {}, meta("llama", "Llama 3.2 1B Instruct", vocab=128256))[0][1] == "llama3"
    assert defaults.for_server("chat", {}, meta("llama", "Llama 2 7b Chat"))[0][1] == "llama2"
    base, notes = defaults.for_server("chat", {}, meta("gemma3", "Gemma 3 270m"))
    assert base == ["--chat-template", defaults.QA_TEMPLATE] and "base model" in notes[0]
    # nothing when the file has one, or when the user chose
    assert defaults.for_server("chat", {}, meta("gemma3", "Gemma It", template="{{x}}")) == ([], [])
    assert defaults.for_server("chat", {"chat_template": "chatml"}, meta("gemma3", "Gemma 3 270m")) == ([], [])
    assert defaults.for_server("embedding", {}, meta("gemma3", "Gemma 3 270m")) == (
        ["--pooling", "mean"], ["pooling 'mean' (the model file names none)"])
    assert defaults.for_server("embedding", {}, meta("bert", **{"bert.pooling_type": 2})) == ([], [])
    assert defaults.for_server("embedding", {"pooling": "cls"}, meta("gemma3")) == ([], [])


# -- progress ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, expected", [
    ("[45/192] Building CXX object ggml/src/CMakeFiles/ggml-base.dir/ggml.cpp.o", (45, 192, "objects compiled")),
    ("#12 314.2 [ 7/192] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml-alloc.c.o", (7, 192, "objects compiled")),
    ("[192/192] Linking CXX executable bin/llama-server", (192, 192, "objects compiled")),
    ("STEP 5/12: RUN apt-get update", (5, 12, "RUN apt-get update")),
    ("[2/3] STEP 4/6: RUN set -eu; apt-get update", (4, 6, "stage 2/3: RUN set -eu; apt-get update")),
    ("#7 [build 3/6] RUN --mount=type=cache,target=/ccache cmake", (3, 6, "RUN --mount=type=cache,target=/ccache cmake")),
    ("-- Configuring done", None),
])
def test_build_output_says_how_far_the_build_is(line, expected):
    assert build_progress(line) == expected


def test_steps_in_plain_lines_end_with_a_summary():
    buf = io.StringIO()
    steps = Steps(Console(file=buf, width=120), live=False)
    with steps.step("build the cpu image") as s:
        s.on_build_line("[1/3] Building CXX object a.o")
        s.on_build_line("[3/3] Linking CXX executable llama-server")
        s.say("smoke test")
    with pytest.raises(RuntimeError), steps.step("start the servers"):
        raise RuntimeError("no")
    steps.summary()
    text = buf.getvalue()
    assert "==> build the cpu image" in text and "3/3 objects compiled" in text and "    smoke test" in text
    assert "failed in" in text and "in all" in text and [s["failed"] for s in steps.as_json()] == [False, True]


# -- the CPU target -------------------------------------------------------------------------------------------
def test_auto_means_native_here_and_what_the_running_image_was_built_with():
    assert images.cpu_target("auto") == "native"
    assert images.cpu_target("auto", running="portable") == "portable"  # an update keeps it
    assert images.cpu_target("auto", override="portable") == "portable"
    assert images.cpu_target("portable", running="native") == "portable"
    with pytest.raises(BuildError, match="CPU target 'avx9': choose native"):  # refused before anything is built
        images.cpu_target("auto", override="avx9")


# -- the gateway's port -------------------------------------------------------------------------------------------
def stack_on(port: int, tmp_path) -> Stack:
    cfg = config.parse(f'[stack]\nname = "mine"\n[gateway]\nport = {port}\n[servers.chat]\nmodel = "tiny.gguf"\n',
                       source=tmp_path / "services.toml")
    return Stack(cfg, PodmanEngine())


def test_a_foreign_program_on_the_port_is_never_taken_for_the_gateway(tmp_path):
    port = free_port()
    assert stack_on(port, tmp_path).gateway.port_holder() is None

    class Foreign(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Foreign)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        holder = stack_on(port, tmp_path).gateway.port_holder()
        assert holder is not None and holder.startswith("another program")
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
        with pytest.raises(StackError) as e:
            stack_on(port, tmp_path).preflight(None)
        assert f"127.0.0.1:{port} is taken by another program" in str(e.value)
    finally:
        server.shutdown()


def test_the_stacks_own_gateway_is_recognised(gateway, tmp_path):
    gw = gateway()
    cfg = config.load(gw.cfg_path)
    assert Stack(cfg, PodmanEngine()).gateway.port_holder() == "ours"
    other = config.parse(f'[stack]\nname = "other"\n[gateway]\nport = {gw.port}\n')
    assert Stack(other, PodmanEngine()).gateway.port_holder() == "the gateway of another stack ('unit')"


def test_the_preflight_names_every_missing_model(tmp_path):
    cfg = config.parse('[servers.chat]\nmodel = "absent.gguf"\n[servers.embed]\nrole = "embedding"\n'
                       'model = "hf://org/absent-GGUF"\n[hub]\nendpoint = "http://127.0.0.1:9"\n',
                       source=tmp_path / "services.toml")
    with pytest.raises(StackError) as e:
        Stack(cfg, PodmanEngine()).preflight(None, gateway=False)
    message = str(e.value)
    assert "servers.chat: model 'absent.gguf' not found" in message
    assert "podllama pull org/absent-GGUF" in message


# -- the systemd unit -----------------------------------------------------------------------------------------
def test_the_unit_starts_the_stack_after_its_engine(tmp_path, monkeypatch):
    monkeypatch.setattr(service, "UNIT_DIR", tmp_path)
    unit = service.unit_for("podllama", tmp_path / "services.toml", "docker", tmp_path)
    assert unit.path == tmp_path / "podllama-podllama.service"
    assert f"start -c {tmp_path / 'services.toml'}" in unit.text and "After=network-online.target docker.service" in unit.text
    done = service.install(unit)
    assert unit.path.read_text() == unit.text and done[0] == f"wrote {unit.path}"
    assert service.remove(unit)[-1] == f"removed {unit.path}" and not unit.path.exists()


# -- the web UI -------------------------------------------------------------------------------------------------
def test_the_web_ui_comes_from_the_chat_server_without_the_server_key(gateway, upstream):
    async def page(ex):
        await ex.send(200, b"<html>llama.cpp</html>", {"content-type": "text/html"})

    upstream.on("/", page)
    upstream.on("/_app/immutable/app.js", page)
    gw = gateway()
    r = gw.get("/")
    assert r.status_code == 200 and r.text == "<html>llama.cpp</html>"
    assert gw.get("/_app/immutable/app.js").status_code == 200
    for seen in upstream.received("/"):
        if seen.target in (b"/", b"/_app/immutable/app.js"):
            assert b"authorization" not in seen.headers  # llama-server itself lets only its public files through


def test_without_a_web_ui_the_root_leads_to_help(gateway, upstream):
    async def missing(ex):
        await ex.send(404, b'{"error": "not found"}')

    upstream.on("/", missing)
    gw = gateway()
    r = httpx.get(gw.url + "/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/help"
