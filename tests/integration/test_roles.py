"""The roles llama-server cannot serve, for real: whisper-server (speech to text), sd-server (images) and the
speech server (piper) built by `podllama build --kind …` from their pinned sources, run in a stack beside
llama-server and reached through the gateway with the OpenAI SDK."""

from __future__ import annotations

import base64
import io
import json
import re
import uuid
import wave
from pathlib import Path

import httpx
import openai
import pytest

from podllama.build import pinned, source
from podllama.engine import ContainerSpec
from podllama.models import sdmodel, tinymodel
from tests import assets
from tests.helpers import ROOT, podllama

from .conftest import base_choice

# a sentence Whisper tiny.en hears back word for word from the piper voice, here and on the CI machine (others
# it does not everywhere: "canoe slid" came back "can use lid", "jumps" came back "jumped" on another CPU)
SENTENCES = ["It is a beautiful day in the neighborhood."]
SENTENCE = SENTENCES[0]


def build(kind: str, engine) -> dict:
    proc = podllama("build", "--kind", kind, "--variant", "cpu", "--native", "--engine", "podman",
                    "--base", base_choice(engine), "--json")
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def whisper_build(podman) -> dict:
    return build("whisper", podman)


@pytest.fixture(scope="session")
def speech_build(podman) -> dict:
    return build("speech", podman)


@pytest.fixture(scope="session")
def sd_build(podman) -> dict:
    return build("sd", podman)


@pytest.fixture(scope="session")
def role_models(tmp_path_factory) -> Path:
    """The tiny chat model, Whisper tiny.en converted from its package, a piper voice and an image model of the
    real layout with zero weights (a hole on disk), readable by the servers' user."""
    d = tmp_path_factory.mktemp("role-models")
    tinymodel.ensure(d / "tiny.gguf", source.source_dir(ROOT))
    assets.whisper_tiny_en(d / "whisper-tiny.en.bin", ROOT)
    assets.piper_voice(d / "voices")
    sdmodel.write(d / "sdxs-zero.gguf")
    for p in [d, *d.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return d


ROLES = """
[servers.chat]
model = "tiny.gguf"
ctx_size = 512

[servers.ears]
role = "transcription"
model = "whisper-tiny.en.bin"
alias = "whisper-1"
args = { threads = 2 }

[servers.voice]
role = "speech"
model = "voices/en_US-joe-medium.onnx"
alias = "tts-1"

[servers.painter]
role = "image"
model = "sdxs-zero.gguf"
args = { steps = 1, threads = 2 }
"""


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).split()


def test_builds_are_tagged_by_their_pinned_source(whisper_build, speech_build, sd_build, podman):
    pins = pinned.read(ROOT)
    for result, kind, repo in ((whisper_build, "whisper", "podllama/whisper-server"),
                               (speech_build, "speech", "podllama/speech-server"),
                               (sd_build, "sd", "podllama/sd-server")):
        sid = pinned.source_id(pins[kind], ROOT)
        assert result["tags"] == [f"{repo}:cpu-{sid}", f"{repo}:cpu"] and result["commit"] == sid
        labels = podman.image_labels(f"{repo}:cpu")
        assert labels["podllama.source"] == pins[kind].describe() and labels["podllama.server-kind"] == kind
    assert whisper_build["smoke"]["text"].strip() == "" and whisper_build["smoke"]["ready_seconds"] > 0
    assert speech_build["smoke"]["ok"] is True and speech_build["smoke"]["phonemes"][0].startswith("h")
    assert sd_build["smoke"]["png_bytes"] > 0 and sd_build["smoke"]["ready_seconds"] > 0
    # an image never carries the sdist's .git (its config holds a credential line)
    for program in ("whisper-server", "sd-server"):
        image = f"podllama/{program}:cpu"
        out = podman.run_once(ContainerSpec(name=f"podllama-t-{uuid.uuid4().hex[:8]}", image=image, entrypoint=["find"],
                                            args=["/", "-xdev", "(", "-name", ".git", "-o", "-name", "*.patch", ")",
                                                  "-print"]))
        unreadable = [line for line in out.stderr.splitlines() if line.startswith("find:")]
        assert all(line.endswith("Permission denied") for line in unreadable), out.stderr  # (it runs unprivileged)
        assert out.stdout.strip() == "", out.stdout
        listed = podman.run_once(ContainerSpec(name=f"podllama-t-{uuid.uuid4().hex[:8]}", image=image,
                                               entrypoint=["find"], args=["/app", "-name", program]))
        assert listed.stdout.strip() == f"/app/{program}", "the same find does see files"


def test_every_role_through_the_gateway_with_the_openai_sdk(whisper_build, speech_build, sd_build, role_models,
                                                            stack_files, podman):
    sf = stack_files(podman, ROLES, models=role_models)
    sf.run("start")
    key = sf.admin["Authorization"].removeprefix("Bearer ")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sf.port}/v1", api_key=key, timeout=120)

    for sentence in SENTENCES:
        spoken = client.audio.speech.create(model="tts-1", voice="alloy", input=sentence, response_format="wav")
        audio = spoken.read()
        with wave.open(io.BytesIO(audio)) as w:
            assert w.getnchannels() == 1 and w.getsampwidth() == 2 and w.getframerate() == 22050
            assert 1.5 < w.getnframes() / w.getframerate() < 8, "a few seconds of speech"
        heard = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", audio, "audio/wav"))
        assert words(heard.text) == words(sentence), heard.text

    jfk = assets.whisper_tree(ROOT) / "samples" / "jfk.wav"
    with jfk.open("rb") as f:
        text = client.audio.transcriptions.create(model="whisper-1", file=f).text
    assert "ask not what your country can do for you" in " ".join(words(text)), text
    chat = client.chat.completions.create(model="chat", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert chat.choices[0].message.content is not None
    for size in ("64x64", "128x64"):
        made = client.images.generate(model="painter", prompt="a red square", size=size, n=1)  # type: ignore[arg-type]
        assert made.data and made.data[0].b64_json
        png = base64.b64decode(made.data[0].b64_json)
        assert sdmodel.png_size(png) == tuple(int(n) for n in size.split("x")), size
    with pytest.raises(openai.BadRequestError, match="max_image_side"):  # sd-server would try 100 megapixels
        client.images.generate(model="painter", prompt="a red square", size="10000x10000")  # type: ignore[arg-type]

    with sf.api() as api:
        listed = {m["server"]: m for m in api.get("/v1/models").json()["data"]}
        assert listed["ears"]["capabilities"] == ["transcription"] and listed["voice"]["capabilities"] == ["speech"]
        assert api.get("/v1/audio/voices").json()["voices"] == [{"id": "tts-1", "name": "tts-1"}]
        r = api.post("/v1/audio/speech", json={"model": "tts-1", "input": SENTENCE, "response_format": "mp3"})
        assert r.status_code == 400 and "wav" in r.json()["error"]["message"]
        r = api.post("/v1/audio/transcriptions", data={"model": "tts-1"}, files={"file": ("a.wav", audio)})
        assert r.status_code == 400 and "speech" in r.json()["error"]["message"], "a model of another role"
        # whisper-server's own POST /load opens any path it is given: not reachable through the gateway
        r = api.post("/servers/ears/load", data={"model": "/etc/passwd"})
        assert r.status_code == 404 and "whisper-server" in r.json()["error"]["message"]
        assert api.get("/servers/ears/health").status_code == 200
        r = api.get("/props", params={"server": "voice"})
        assert r.status_code == 400 and "/props" in r.json()["error"]["message"]
        assert listed["painter"]["capabilities"] == ["image"]
        r = api.post("/v1/images/generations", json={"model": "tts-1", "prompt": "x", "size": "64x64"})
        assert r.status_code == 400 and "speech" in r.json()["error"]["message"], "a model of another role"


def test_the_servers_require_the_stack_key(whisper_build, speech_build, sd_build, role_models, stack_files, podman):
    """A neighbour on the stack's network reaching the servers directly gets 401 without the server key."""
    sf = stack_files(podman, ROLES, models=role_models)
    sf.run("start", "--no-gateway")
    for server, method, path in (("ears", "POST", "/v1/audio/transcriptions"), ("voice", "POST", "/v1/audio/speech"),
                                 ("painter", "POST", "/v1/images/generations"), ("painter", "GET", "/v1/models")):
        info = podman.inspect(f"{sf.name}-{server}-1")
        assert info is not None and info.ip
        url = f"http://{info.ip}:8080"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200, "health stays open"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": sf.server_key["Authorization"] + "x"}):
            r = httpx.request(method, f"{url}{path}", headers=headers, timeout=10)
            assert r.status_code == 401, (server, headers, r.status_code)
        r = httpx.request(method, f"{url}{path}", headers=sf.server_key, timeout=30)
        # past the key: no body given (a GET answers)
        assert r.status_code in ((200,) if method == "GET" else (400, 422, 411)), (server, r.status_code, r.text)
        # and no web page is granted credentials (sd-server reflected any Origin with Allow-Credentials)
        r = httpx.request(method, f"{url}{path}", headers={**sf.server_key, "Origin": "http://evil.example"},
                          timeout=30)
        assert r.headers.get("access-control-allow-origin") != "http://evil.example", (server, dict(r.headers))
        assert "access-control-allow-credentials" not in r.headers, (server, dict(r.headers))
    assert podman.inspect(f"{sf.name}-ears-1").running and podman.inspect(f"{sf.name}-painter-1").running
