"""GPU memory per process, from the drivers' own per-process views (recorded formats: tests/fixtures/gpumemory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from podllama.engine.gpumemory import parse_fdinfo, parse_nvidia

FIXTURES = Path(__file__).parent.parent / "fixtures" / "gpumemory"
MiB, KiB = 2**20, 2**10


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_nvidia_counts_every_gpu_of_the_process_and_nothing_of_others():
    text = fixture("nvidia-smi-compute-apps.csv")
    assert parse_nvidia(text, {3161}) == (4312 + 1210) * MiB
    assert parse_nvidia(text, {1, 3190}) == 22710 * MiB  # the container's own pid 1 or the host's pid
    assert parse_nvidia(text, {1}) is None  # not on the GPU (yet): no figure, not zero
    assert parse_nvidia("No devices were found\n", {3161}) is None


@pytest.mark.parametrize(("name", "expected"), [
    ("amdgpu-6.8.fdinfo", 4398080 * KiB),  # one client through two descriptors counts once
    ("amdgpu-6.12.fdinfo", 1536 * MiB),  # resident, not the total with what was evicted
    ("xe.fdinfo", 2048 * MiB),
    ("no-gpu.fdinfo", None),
])
def test_drm_clients_give_the_device_memory_each_holds(name, expected):
    assert parse_fdinfo(fixture(name)) == expected


def test_two_clients_on_two_gpus_add_up():
    one = fixture("amdgpu-6.12.fdinfo")
    other = one.replace("drm-client-id:\t7", "drm-client-id:\t8").replace("0000:c3:00.0", "0000:c4:00.0")
    assert parse_fdinfo(one + other) == 2 * 1536 * MiB
