"""Smoke tests, one per server kind: a new image must start with a tiny model and answer its own kind of
request before any tag moves to it."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..engine import CliEngine, ContainerSpec, EngineError, GpuRequest, Mount
from ..engine.health import probe, wait_healthy
from ..models import tinymodel
from .errors import BuildError


@contextmanager
def serving(engine: CliEngine, image: str, args: list[str], models: Path, gpu: GpuRequest | None = None,
            timeout: float = 300, log: Path | None = None) -> Iterator[tuple[str, float]]:
    """IMAGE started with ARGS and MODELS (a directory the engine can mount: the gateway container runs builds
    too) on /models, until /health turns 200: yields its URL and how long that took; removed afterwards."""
    models.chmod(0o755)
    name = f"podllama-smoke-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    spec = ContainerSpec(
        name=name, image=image, labels={"podllama.smoke": "true"}, args=args,
        mounts=[Mount(str(models), "/models")], ports=[("127.0.0.1", 0, 8080)], gpu=gpu,
        env={"GGML_VK_VISIBLE_DEVICES": "0"} if gpu and gpu.backend == "vulkan" else {},
    )
    try:
        try:
            engine.run(spec)
        except EngineError as e:
            raise BuildError(f"smoke test: the new image did not start: {e}") from None
        info = engine.inspect(name)
        port = info.ports.get(8080) if info else None
        if info is None or not port:
            raise BuildError("smoke test: the engine published no port for the test container")
        # its address where that can be reached (the host, and a gateway on the host's network), else the port
        candidates = ([f"http://{info.ip}:8080"] if info.ip else []) + [f"http://127.0.0.1:{port}"]
        t0 = time.monotonic()
        url = candidates[-1]
        while time.monotonic() - t0 < 30 and _alive(engine, name):
            answering = [c for c in candidates if probe(c, timeout=1) != "down"]
            if answering:
                url = answering[0]
                break
            time.sleep(0.2)
        state = wait_healthy(url, timeout=timeout, alive=lambda: _alive(engine, name))
        if state != "ok":
            raise BuildError(f"smoke test: /health never turned 200 ({state}){_death(engine, name)}. Server log:\n"
                             f"{_logs(engine, name)}")
        try:
            yield url, time.monotonic() - t0
        except httpx.HTTPError as e:  # the server went away under a request
            raise BuildError(f"smoke test: a request got no answer ({e}){_death(engine, name)}. Server log:\n"
                             f"{_logs(engine, name)}") from None
    finally:
        if log is not None:
            with log.open("a") as f:
                f.write("\n--- smoke test server log ---\n" + _logs(engine, name))
        engine.remove(name)


# why a test container died, by its exit status (128 + the signal)
DEATHS = {132: "SIGILL: it ran an instruction this CPU (or its kernel) does not allow; build it for this "
               "machine's CPU (`podllama build --native`), or report the instruction set it names",
          134: "SIGABRT: it aborted (see the log)", 137: "SIGKILL: killed, perhaps for want of memory",
          139: "SIGSEGV: it crashed"}


def _death(engine: CliEngine, name: str) -> str:
    info = engine.inspect(name)
    code = info.exit_code if info is not None and not info.running else None
    return f"; the server exited {code}, {DEATHS[code]}" if code in DEATHS else \
        (f"; the server exited {code}" if code is not None else "")


def smoke_test(engine: CliEngine, image: str, tree: Path, models: Path, gpu: GpuRequest | None = None,
               timeout: float = 300, log: Path | None = None) -> dict[str, Any]:
    """llama-server: IMAGE with the tiny model, /health must turn 200 and one chat completion must answer. Its
    matrices are Q4_0, so the quantized kernels this CPU would pick (repacked weights, AMX …) run here, not first
    under a user's model."""
    import httpx

    tinymodel.ensure(models / "podllama-tiny-q4_0.gguf", tree, quant="Q4_0")
    args = ["--model", "/models/podllama-tiny-q4_0.gguf", "--ctx-size", "512", "--parallel", "1"]
    with serving(engine, image, args, models, gpu, timeout, log) as (url, ready_s):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8})
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200 or not body.get("choices"):
            raise BuildError(f"smoke test: chat completion answered {r.status_code}: {r.text[:300]}")
    version = engine.run_once(ContainerSpec(name=f"podllama-smoke-v-{uuid.uuid4().hex[:8]}", image=image,
                                            args=["--version"]), timeout=60)
    return {"ready_seconds": round(ready_s, 2), "completion_tokens": body.get("usage", {}).get("completion_tokens"),
            "version": (version.stdout + version.stderr).strip().splitlines()[-2:]}


def silence_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(rate * seconds))
    return out.getvalue()


def smoke_whisper(engine: CliEngine, image: str, tree: Path, models: Path, gpu: GpuRequest | None = None,
                  timeout: float = 300, log: Path | None = None) -> dict[str, Any]:
    """whisper-server: IMAGE with whisper.cpp's own test model (its vocabulary, no weights), /health must turn
    200 and a second of silence must be transcribed (to nothing) through the OpenAI route."""
    import httpx

    test_model = "for-tests-ggml-tiny.en.bin"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tree / "models" / test_model, models / test_model)
    with serving(engine, image, ["--model", f"/models/{test_model}"], models, gpu, timeout, log) as (url, ready_s):
        r = httpx.post(f"{url}/v1/audio/transcriptions", timeout=60, files={"file": ("s.wav", silence_wav())},
                       data={"response_format": "json"})
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200 or "text" not in body:
            raise BuildError(f"smoke test: transcription answered {r.status_code}: {r.text[:300]}")
    return {"ready_seconds": round(ready_s, 2), "text": body["text"]}


def smoke_speech(engine: CliEngine, image: str, tree: Path, models: Path, gpu: GpuRequest | None = None,
                 timeout: float = 300, log: Path | None = None) -> dict[str, Any]:
    """The speech server: its self test (piper, its espeak-ng data and onnxruntime load; English text turns
    into phonemes); a voice is a model, checked when a server starts with it."""
    out = engine.run_once(ContainerSpec(name=f"podllama-smoke-{uuid.uuid4().hex[:8]}", image=image,
                                        args=["--self-test"]), timeout=timeout)
    try:
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {}
    if out.returncode != 0 or not result.get("ok"):
        raise BuildError(f"smoke test: the speech server's self test exited {out.returncode}: "
                         f"{(out.stderr or out.stdout).strip()[-500:]}")
    return result


def smoke_sd(engine: CliEngine, image: str, tree: Path, models: Path, gpu: GpuRequest | None = None,
             timeout: float = 300, log: Path | None = None) -> dict[str, Any]:
    """sd-server: IMAGE with a model of the real layout and zero weights (sdmodel: a hole on disk), /health must
    turn 200 and one 64×64 image at one step must come back as a PNG of that size."""
    import base64

    import httpx

    from ..models import sdmodel

    model = sdmodel.write(models / "sd-smoke.gguf")
    try:
        with serving(engine, image, ["--model", f"/models/{model.name}", "--steps", "1"], models, gpu, timeout,
                     log) as (url, ready_s):
            r = httpx.post(f"{url}/v1/images/generations", timeout=timeout,
                           json={"prompt": "a smoke test", "size": "64x64", "n": 1})
            try:
                png = base64.b64decode(r.json()["data"][0]["b64_json"])
            except (ValueError, KeyError, IndexError, TypeError):
                png = b""
            size = sdmodel.png_size(png)
            if r.status_code != 200 or size != (64, 64):
                raise BuildError(f"smoke test: image generation answered {r.status_code} with "
                                 f"{'a PNG of ' + str(size) if size else 'no PNG'}: {r.text[:300]}")
    finally:
        model.unlink(missing_ok=True)
    return {"ready_seconds": round(ready_s, 2), "png_bytes": len(png)}


# -- GPU images, checked without a GPU -------------------------------------------------------------------------
# "ELF file    1: libggml-cuda.1.sm_90.cubin", "PTX file    1: libggml-cuda.1.sm_90.ptx" (cuobjdump --list-elf --list-ptx)
_KERNEL = re.compile(r"^(ELF|PTX) file\s+\d+:.*\.(sm_\d+[a-z]?)\.(?:cubin|ptx)$", re.M)
# "hipv4-amdgcn-amd-amdhsa--gfx1100" (the HIP fat binary's bundle names)
_CODE_OBJECT = re.compile(r"amdgcn-amd-amdhsa--(gfx[0-9a-z]+)")
_UNRESOLVED = re.compile(r"^\s*(\S+) => not found", re.M)


def expected_kernels(architectures: str) -> dict[str, list[str]]:
    """What CMake's CUDA_ARCHITECTURES ("75;90a;120-real") compiles: machine code (ELF) for each one but the
    -virtual ones, PTX for each one but the -real ones."""
    elf, ptx = set(), set()
    for arch in filter(None, architectures.split(";")):
        number, _, suffix = arch.partition("-")
        if suffix != "virtual":
            elf.add(f"sm_{number}")
        if suffix != "real":
            ptx.add(f"sm_{number}")
    return {"ELF": sorted(elf), "PTX": sorted(ptx)}


def listed_kernels(listing: str) -> dict[str, list[str]]:
    built: dict[str, set[str]] = {"ELF": set(), "PTX": set()}
    for kind, arch in _KERNEL.findall(listing):
        built[kind].add(arch)
    return {kind: sorted(archs) for kind, archs in built.items()}


@dataclass(frozen=True)
class GpuBuild:
    """What a GPU variant's build says it compiled, and what its image may lack."""

    asked: str  # the build argument naming the GPUs it was built for
    listing: str  # the file the build wrote the compiled code's names into
    expected: Callable[[str], Any]  # what the asked-for GPUs should give, from the argument
    found: Callable[[str], Any]  # what the listing says was built
    lacking: frozenset[str]  # the libraries the image must lack: the driver's, which the host gives


GPU_BUILDS = {
    "cuda": GpuBuild("CUDA_ARCHITECTURES", "/app/cuda-kernels.txt", expected_kernels, listed_kernels,
                     frozenset({"libcuda.so.1"})),  # NVIDIA's runtime mounts the host's
    # gfx90a:xnack- is code for gfx90a; ROCm's user-space libraries are all in the image
    "rocm": GpuBuild("ROCM_TARGETS", "/app/rocm-kernels.txt",
                     lambda asked: sorted({t.split(":")[0] for t in asked.split(";") if t}),
                     lambda listing: sorted(set(_CODE_OBJECT.findall(listing))), frozenset()),
}


def gpu_checks(engine: CliEngine, image: str, variant: str, timeout: float = 120,
               devices: bool = True) -> dict[str, Any]:
    """A GPU image, checked without a GPU: its backend holds code for exactly the GPUs it was built for (the
    names the build listed), every library in /app resolves but the driver's (which the backend must ask for),
    and (DEVICES: llama-server's images, the only program with `--list-devices`) the devices it sees here."""
    check = GPU_BUILDS[variant]
    asked = json.loads(engine.image_labels(image).get("podllama.build-args", "{}")).get(check.asked, "")
    script = f"cat {check.listing}; for f in /app/*; do ldd \"$f\" 2>/dev/null; done"
    out = engine.run_once(ContainerSpec(name=f"podllama-smoke-{variant}-{uuid.uuid4().hex[:8]}", image=image,
                                        entrypoint=["/bin/sh", "-c", script]), timeout=timeout)
    built, unresolved = check.found(out.stdout), sorted(set(_UNRESOLVED.findall(out.stdout)))
    if built != check.expected(asked):
        raise BuildError(f"smoke test: the {variant} backend holds code for {built}, not what was asked for "
                         f"({asked}: {check.expected(asked)}). The build listed:\n{out.stdout[:2000]}{out.stderr[-500:]}")
    if set(unresolved) != check.lacking:
        raise BuildError(f"smoke test: the libraries in /app ask for {', '.join(unresolved) or 'nothing'} that the "
                         f"image lacks, where it should lack {', '.join(sorted(check.lacking)) or 'nothing'}")
    return {check.asked: asked, "built": built, "unresolved": unresolved} | (
        gpu_devices(engine, image, timeout) if devices else {})


def gpu_devices(engine: CliEngine, image: str, timeout: float = 120) -> dict[str, list[str]]:
    """The devices llama-server in IMAGE sees here (`--list-devices`: none on a machine without the GPU, where
    the CPU serves, as the smoke test's answer shows), and what its backend said about it on its log (ROCm's
    says there is no device; CUDA's, whose driver library is missing, says nothing)."""
    out = engine.run_once(ContainerSpec(name=f"podllama-smoke-dev-{uuid.uuid4().hex[:8]}", image=image,
                                        args=["--list-devices"]), timeout=timeout)
    lines = out.stdout.splitlines()
    listed = lines[lines.index("Available devices:") + 1:] if "Available devices:" in lines else []
    return {"devices": [d.strip() for d in listed if d.startswith("  ") and d.strip() != "(none)"],
            "said": [line.split(" ", 2)[-1] for line in out.stderr.splitlines() if "device" in line.lower()]}


SMOKE_TESTS: dict[str, Callable[..., dict[str, Any]]] = {
    "llama": smoke_test, "whisper": smoke_whisper, "sd": smoke_sd, "speech": smoke_speech}


def _alive(engine: CliEngine, name: str) -> bool:
    info = engine.inspect(name)
    return bool(info and info.running)


def _logs(engine: CliEngine, name: str) -> str:
    return "".join(engine.logs(name, tail=40))


