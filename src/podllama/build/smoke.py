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
from pathlib import Path
from typing import Any

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
            raise BuildError(f"smoke test: /health never turned 200 ({state}). Server log:\n{_logs(engine, name)}")
        yield url, time.monotonic() - t0
    finally:
        if log is not None:
            with log.open("a") as f:
                f.write("\n--- smoke test server log ---\n" + _logs(engine, name))
        engine.remove(name)


def smoke_test(engine: CliEngine, image: str, tree: Path, models: Path, gpu: GpuRequest | None = None,
               timeout: float = 300, log: Path | None = None) -> dict[str, Any]:
    """llama-server: IMAGE with the tiny model, /health must turn 200 and one chat completion must answer."""
    import httpx

    tinymodel.ensure(models / "podllama-tiny.gguf", tree)
    args = ["--model", "/models/podllama-tiny.gguf", "--ctx-size", "512", "--parallel", "1"]
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


# "ELF file    1: libggml-cuda.1.sm_90.cubin", "PTX file    1: libggml-cuda.1.sm_90.ptx" (cuobjdump --list-elf --list-ptx)
_KERNEL = re.compile(r"^(ELF|PTX) file\s+\d+:.*\.(sm_\d+[a-z]?)\.(?:cubin|ptx)$", re.M)
_UNRESOLVED = re.compile(r"^\s*(\S+) => not found", re.M)
# The only library a CUDA image may lack: the driver's, which the host's NVIDIA runtime mounts in
DRIVER_LIBRARIES = {"libcuda.so.1"}


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


def gpu_devices(engine: CliEngine, image: str, timeout: float = 120) -> list[str]:
    """The devices llama-server in IMAGE sees here (`--list-devices`; none on a machine without the GPU, where
    the backend is not loaded and the CPU serves, as the smoke test's answer shows)."""
    out = engine.run_once(ContainerSpec(name=f"podllama-smoke-dev-{uuid.uuid4().hex[:8]}", image=image,
                                        args=["--list-devices"]), timeout=timeout)
    lines = (out.stdout + out.stderr).splitlines()
    listed = lines[lines.index("Available devices:") + 1:] if "Available devices:" in lines else []
    return [d.strip() for d in listed if d.strip() and d.strip() != "(none)"]


def cuda_checks(engine: CliEngine, image: str, timeout: float = 120) -> dict[str, Any]:
    """A CUDA image, checked without a GPU: its backend holds kernels for exactly the architectures it was built
    for (the build's cuobjdump listing, /app/cuda-kernels.txt), and every library in /app resolves but the
    driver's own, which the CUDA backend must ask for (NVIDIA's runtime mounts the host's)."""
    asked = json.loads(engine.image_labels(image).get("podllama.build-args", "{}")).get("CUDA_ARCHITECTURES", "")
    script = "cat /app/cuda-kernels.txt; for f in /app/*; do ldd \"$f\" 2>/dev/null; done"
    out = engine.run_once(ContainerSpec(name=f"podllama-smoke-cuda-{uuid.uuid4().hex[:8]}", image=image,
                                        entrypoint=["/bin/sh", "-c", script]), timeout=timeout)
    built: dict[str, set[str]] = {"ELF": set(), "PTX": set()}
    for kind, arch in _KERNEL.findall(out.stdout):
        built[kind].add(arch)
    kernels = {kind: sorted(archs) for kind, archs in built.items()}
    unresolved = sorted(set(_UNRESOLVED.findall(out.stdout)))
    if kernels != expected_kernels(asked):
        raise BuildError(f"smoke test: the CUDA backend holds kernels {kernels}, not those asked for "
                         f"({asked}: {expected_kernels(asked)}). cuobjdump said:\n{out.stdout[:2000]}{out.stderr[-500:]}")
    if set(unresolved) != DRIVER_LIBRARIES:  # the driver's is the one the backend must ask for, and find not here
        raise BuildError(f"smoke test: the libraries in /app ask for {', '.join(unresolved) or 'nothing'} that the "
                         f"image lacks, where only the driver's ({', '.join(sorted(DRIVER_LIBRARIES))}) should be")
    return {"architectures": asked, "kernels": kernels, "unresolved": unresolved,
            "devices": gpu_devices(engine, image, timeout)}


def rocm_checks(engine: CliEngine, image: str, timeout: float = 120) -> dict[str, Any]:
    """A ROCm image, checked without a GPU: its HIP backend holds code objects for exactly the gfx targets it was
    built for (the bundle names in it, /app/rocm-kernels.txt), and every library in /app resolves (ROCm's
    user-space libraries are all in the image; the GPU comes in as /dev/kfd and /dev/dri)."""
    asked = json.loads(engine.image_labels(image).get("podllama.build-args", "{}")).get("ROCM_TARGETS", "")
    script = "cat /app/rocm-kernels.txt; for f in /app/*; do ldd \"$f\" 2>/dev/null; done"
    out = engine.run_once(ContainerSpec(name=f"podllama-smoke-rocm-{uuid.uuid4().hex[:8]}", image=image,
                                        entrypoint=["/bin/sh", "-c", script]), timeout=timeout)
    built = sorted(set(re.findall(r"amdgcn-amd-amdhsa--(gfx[0-9a-z]+)", out.stdout)))
    unresolved = sorted(set(_UNRESOLVED.findall(out.stdout)))
    if built != sorted({t.split(":")[0] for t in asked.split(";") if t}):  # gfx90a:xnack- is code for gfx90a
        raise BuildError(f"smoke test: the HIP backend holds code for {built}, not the targets asked for ({asked})")
    if unresolved:
        raise BuildError(f"smoke test: libraries the image lacks: {', '.join(unresolved)}")
    return {"targets": asked, "code_objects": built, "unresolved": unresolved,
            "devices": gpu_devices(engine, image, timeout)}


GPU_CHECKS: dict[str, Callable[..., dict[str, Any]]] = {"cuda": cuda_checks, "rocm": rocm_checks}

SMOKE_TESTS: dict[str, Callable[..., dict[str, Any]]] = {
    "llama": smoke_test, "whisper": smoke_whisper, "sd": smoke_sd, "speech": smoke_speech}


def _alive(engine: CliEngine, name: str) -> bool:
    info = engine.inspect(name)
    return bool(info and info.running)


def _logs(engine: CliEngine, name: str) -> str:
    return "".join(engine.logs(name, tail=40))


