from pathlib import Path

import pytest

from podllama.engine import hardware

HOSTS = Path(__file__).resolve().parents[1] / "fixtures" / "hosts"


def detect(name: str) -> hardware.Hardware:
    return hardware.detect(hardware.FixtureHost(HOSTS / name))


def test_nvidia_host_recommends_cuda_with_cdi():
    hw = detect("nvidia-h100")
    assert hw.variants == ["cuda", "cpu"]
    assert [g.name for g in hw.gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert hw.gpus[0].memory_mib == 81559 and hw.gpus[0].compute_capability == "9.0"
    assert hw.cuda_architectures == ["90"]
    assert hw.nvidia["driver"] == "550.54.15" and hw.nvidia["cdi"] is True and hw.nvidia["container_toolkit"] is True
    assert "amx" in hw.cpu.features and "avx512" in hw.cpu.features
    assert hw.notes == []  # the NVIDIA render nodes are not mistaken for Vulkan-only GPUs


def test_nvidia_without_cdi_says_how_to_make_the_spec():
    hw = detect("nvidia-rtx4090-no-cdi")
    assert hw.variants == ["cuda", "cpu"]
    assert hw.cuda_architectures == ["89"]
    assert hw.nvidia["cdi"] is False and hw.nvidia["container_toolkit"] is False
    assert any("nvidia-ctk cdi generate" in n for n in hw.notes)


def test_rocm_host_reads_gfx_targets_from_kfd_topology():
    hw = detect("rocm-rx7900xtx")
    assert hw.variants == ["rocm", "cpu"]
    (gpu,) = hw.gpus
    assert (gpu.vendor, gpu.gfx_target, gpu.render_node, gpu.backend) == ("amd", "gfx1100", "/dev/dri/renderD128", "rocm")
    assert gpu.memory_mib == 24560
    assert hw.amd == {"kfd": True, "targets": ["gfx1100"]}


def test_rocm_gfx90a_target_is_hex_encoded():
    hw = detect("rocm-mi250x")
    assert hw.rocm_targets == ["gfx90a"] and len(hw.gpus) == 2


@pytest.mark.parametrize("version,target", [(90010, "gfx90a"), (90402, "gfx942"), (100300, "gfx1030"),
                                            (110001, "gfx1101"), (120001, "gfx1201")])
def test_gfx_target_names(version, target):
    assert hardware.gfx_target(version) == target


def test_vulkan_only_host():
    hw = detect("vulkan-intel-arc")
    assert hw.variants == ["vulkan", "cpu"]
    assert [(g.vendor, g.backend) for g in hw.gpus] == [("intel", "vulkan")]
    assert [d["name"] for d in hw.vulkan["gpu_devices"]] == ["Intel(R) Arc(tm) A770 Graphics (DG2)"]
    assert len(hw.vulkan["devices"]) == 2  # llvmpipe is listed but not counted as a GPU


def test_cpu_only_hosts():
    x86 = detect("cpu-only-epyc")
    assert x86.variants == ["cpu"] and x86.gpus == [] and x86.cpu.arch == "x86_64"
    assert "avx2" in x86.cpu.features and x86.cpu.cores >= 1
    arm = detect("cpu-only-arm-neoverse")
    assert arm.variants == ["cpu"] and arm.cpu.arch == "aarch64"
    assert {"neon", "dotprod", "sve", "i8mm"} <= set(arm.cpu.features) and arm.cpu.cores == 4


def test_this_machine_says_cpu():
    hw = hardware.detect()
    assert hw.variants[-1] == "cpu"
    assert hardware.resolve_variant("auto", hw) == hw.variants[0]
    assert hardware.resolve_variant("vulkan", hw) == "vulkan"


def test_capture_round_trips(tmp_path):
    fixture = hardware.FixtureHost(HOSTS / "rocm-rx7900xtx")
    captured = hardware.detect(hardware.RecordingHost(fixture, tmp_path / "cap"))
    again = hardware.detect(hardware.FixtureHost(tmp_path / "cap"))
    assert again.to_dict() == captured.to_dict()
    assert (tmp_path / "cap" / "fs" / "dev" / "kfd").exists()


def test_rocm_containers_get_the_hosts_device_groups_and_the_gateway_is_told_them_checked(monkeypatch):
    from podllama.engine import DockerEngine, GpuRequest, PodmanEngine
    from podllama.engine.base import ROCM_GROUPS_ENV, rocm_groups

    monkeypatch.delenv(ROCM_GROUPS_ENV, raising=False)
    here = rocm_groups()  # this machine: no /dev/kfd, so video alone (or video and its render nodes' groups)
    assert here[0] == "video" and all(g.isdigit() for g in here[1:])
    monkeypatch.setenv(ROCM_GROUPS_ENV, "video,109,render;rm -rf,--privileged,12345678901")
    assert rocm_groups() == ["video", "109"]  # what the host told the gateway container, and nothing else
    for engine in (PodmanEngine(), DockerEngine()):
        assert engine.gpu_flags(GpuRequest("rocm")) == ["--device=/dev/kfd", "--device=/dev/dri",
                                                        "--group-add=video", "--group-add=109"]
