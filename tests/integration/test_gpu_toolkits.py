"""The GPU toolkits on a Debian base made here, checked where it is cheap, on every run: the toolkits' devel images
made from containers/toolkits.lock (CUDA from NVIDIA's wheels, ROCm from Debian's packages), and the real
Containerfile's configure step run on them, so CMake finds the toolkit and takes in the GPU backend. Compiling
the kernels takes most of an hour on two cores, so it is measured apart: bench/gpu_builds.py."""

from __future__ import annotations

import pytest

from podllama.build import bases, images, source, toolkits
from tests.helpers import ROOT, podllama

CONFIGURED = {"cuda": ("90", "Including CUDA backend"), "rocm": ("gfx1100", "HIP and hipBLAS found")}


@pytest.mark.parametrize("variant", ["cuda", "rocm"])
def test_the_configure_step_finds_the_toolkit_made_here(podman, variant, tmp_path):
    toolkit = toolkits.toolkit_of(variant, ROOT)
    assert toolkit is not None
    if not podman.image_exists(f"{bases.LOCAL_BASE}:{toolkit.suite}"):
        podllama("base-image", "--suite", toolkit.suite, "--engine", "podman")
    base = bases.resolve_base(variant, "local")
    toolkits.ensure_images(podman, toolkit, targets=("devel",))  # the runtime image is the bench's (ROCm's: 4 GB)
    assert podman.image_labels(base.build).get("podllama.toolkit-id") == toolkit.id(ROOT)

    arch, found = CONFIGURED[variant]
    args = images.build_args_for(variant, base, "0" * 40, 1, "native", "off", [arch], [arch]) | {"CONFIGURE_ONLY": "1"}
    log = tmp_path / "configure.log"
    with log.open("w") as f:
        image = podman.build(images.containerfile(variant, ROOT), source.source_dir(ROOT), args, {}, f, target="build")
    text = log.read_text()
    try:
        assert image is not None, text[-3000:]
        assert found in text, text[-3000:]
        if variant == "cuda":  # the toolkit's own compiler, at the lock's version, for the one architecture asked
            assert f"The CUDA compiler identification is NVIDIA {toolkit.version.rsplit('.', 1)[0]}" in text
            assert "Using CMAKE_CUDA_ARCHITECTURES=90 " in text
    finally:
        if image:
            podman.remove_image(image)
