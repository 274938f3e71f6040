
import pytest

from podllama.build import bases, doctor, images, smoke, toolkits, ui
from podllama.build.errors import BuildError
from tests.helpers import standin_podman


def test_base_choices():
    up = bases.resolve_base("cuda", "upstream")
    assert up.build.startswith("docker.io/nvidia/cuda:") and "devel" in up.build and "runtime" in up.runtime
    local = bases.resolve_base("vulkan", "local")
    assert local.build == local.runtime == "localhost/podllama-base:trixie" and local.kind == "local"
    custom = bases.resolve_base("cpu", "my/build:1, my/run:1")
    assert (custom.build, custom.runtime, custom.kind) == ("my/build:1", "my/run:1", "custom")
    assert bases.resolve_base("cpu", "one:1").runtime == "one:1"
    rocm = bases.resolve_base("rocm", "local")  # Debian's own ROCm on its testing suite
    assert rocm.build.startswith("localhost/podllama-base:forky-rocm6.") and rocm.build.endswith("-devel")


def test_a_local_cuda_base_is_the_toolkit_from_the_lock_on_the_bootstrapped_debian(project_root):
    local = bases.resolve_base("cuda", "local")
    tk = toolkits.toolkit_of("cuda", project_root)
    assert tk is not None and local.toolkit == tk and local.cuda == tk.cuda == (13, 0)
    assert (local.build, local.runtime) == (tk.image("devel"), tk.image("runtime"))
    assert local.build.startswith("localhost/podllama-base:bookworm-cuda13.0")
    assert all(len(w.sha256) == 64 and w.version for w in tk.wheels)
    assert {"nvidia-cuda-nvcc", "nvidia-cublas", "nvidia-cuda-runtime"} <= {w.name for w in tk.wheels}
    assert bases.resolve_base("cuda", "upstream").cuda == (12, 8)


def test_architectures_a_toolkit_cannot_build_are_refused_before_anything_is_built():
    cuda13, cuda12 = bases.resolve_base("cuda", "local"), bases.resolve_base("cuda", "upstream")
    with pytest.raises(BuildError, match=r"CUDA 13\.0 .*cannot build for compute capability 61, 70: it compiles "
                                         r"for 75 and newer.*CUDA 12 base"):
        images.build_args_for("cuda", cuda13, "a" * 40, 1, "native", "off", ["61", "70", "86"], [])
    # the default list is cut to what the toolkit builds; an older toolkit keeps Pascal
    assert images.build_args_for("cuda", cuda13, "a" * 40, 1, "native", "off", [], [])["CUDA_ARCHITECTURES"] \
        == "75;80;86;89;90;100;120"
    assert images.build_args_for("cuda", cuda12, "a" * 40, 1, "native", "off", ["61"], [])["CUDA_ARCHITECTURES"] == "61"
    custom = bases.resolve_base("cuda", "my/cuda:devel")  # a toolkit podllama does not know: nvcc decides
    assert images.build_args_for("cuda", custom, "a" * 40, 1, "native", "off", ["52"], [])["CUDA_ARCHITECTURES"] == "52"


def test_the_kernels_a_cuda_build_must_hold():
    assert smoke.expected_kernels("75;90a;120-real;86-virtual") == {
        "ELF": ["sm_120", "sm_75", "sm_90a"], "PTX": ["sm_75", "sm_86", "sm_90a"]}
    listing = "ELF file    1: libggml-cuda.1.sm_90.cubin\nPTX file    1: libggml-cuda.1.sm_90.ptx\n"
    cuda, rocm = smoke.GPU_BUILDS["cuda"], smoke.GPU_BUILDS["rocm"]
    assert cuda.found(listing) == cuda.expected("90") and cuda.found(listing) != cuda.expected("90;86")
    bundles = "\x00hipv4-amdgcn-amd-amdhsa--gfx1100\x00hipv4-amdgcn-amd-amdhsa--gfx90a:xnack-\x00host-x86_64"
    assert rocm.found(bundles) == rocm.expected("gfx1100;gfx90a:xnack-") == ["gfx1100", "gfx90a"]


def test_build_args_carry_the_gpu_targets():
    base = bases.resolve_base("cuda", "upstream")
    args = images.build_args_for("cuda", base, "a" * 40, 7, "portable", "off", ["89", "90"], [])
    assert args["CUDA_ARCHITECTURES"] == "89;90" and args["LLAMA_COMMIT"] == "a" * 12
    assert args["LLAMA_BUILD_NUMBER"] == "7" and "ROCM_TARGETS" not in args
    args = images.build_args_for("rocm", bases.resolve_base("rocm", "upstream"), "b" * 40, 0, "native", "on", [], [])
    assert args["ROCM_TARGETS"] == ";".join(images.DEFAULT_ROCM_TARGETS) and args["UI"] == "on"


def test_every_variant_has_a_containerfile(project_root):
    for variant in ("cpu", "cuda", "rocm", "vulkan"):
        text = images.containerfile(variant, project_root).read_text()
        assert "ARG BUILD_BASE=" in text and "ARG RUNTIME_BASE=" in text and "HEALTHCHECK" in text
        assert "USER 10001" in text and "llama-server.help" in text and "LLAMA_BUILD_COMMIT" in text
    with pytest.raises(BuildError, match="no Containerfile"):
        images.containerfile("metal", project_root)


def fake_ui(tmp_path, script: str):
    ui = tmp_path / "tools" / "ui"
    ui.mkdir(parents=True)
    (ui / "package.json").write_text('{"name": "ui", "version": "1.0.0", "scripts": {"build": "' + script + '"}}')
    (ui / "package-lock.json").write_text('{"name": "ui", "version": "1.0.0", "lockfileVersion": 3, "requires": true,'
                                          ' "packages": {"": {"name": "ui", "version": "1.0.0"}}}')
    return ui


def test_ui_is_built_with_npm_once_per_commit(tmp_path):
    tools = fake_ui(tmp_path, "mkdir -p dist && echo built >> dist/index.html")
    log = open(tmp_path / "log", "w")
    assert ui.prepare_ui("auto", tmp_path, "c1", log, print) == ("on", "built from tools/ui with npm")
    assert (tools / "dist" / "index.html").read_text() == "built\n"
    state, why = ui.prepare_ui("auto", tmp_path, "c1", log, print)
    assert state == "on" and "earlier" in why and (tools / "dist" / "index.html").read_text() == "built\n"


def test_a_failing_ui_build_is_reported_not_fatal_in_auto_mode(tmp_path):
    tools = fake_ui(tmp_path, "mkdir -p dist && exit 3")
    log = open(tmp_path / "log", "w")
    state, why = ui.prepare_ui("auto", tmp_path, "c1", log, print)
    assert state == "off" and "npm run build" in why and not (tools / "dist").exists()
    with pytest.raises(BuildError, match="npm run build"):
        ui.prepare_ui("on", tmp_path, "c1", log, print)


def fake_node(directory, version: str):
    directory.mkdir(parents=True)
    for name, text in (("node", f"echo {version}"), ("npm", "exit 0")):
        (directory / name).write_text(f"#!/bin/sh\n{text}\n")
        (directory / name).chmod(0o755)
    return directory


def test_a_node_that_vite_cannot_run_on_is_passed_over(tmp_path):
    old, fits = fake_node(tmp_path / "old", "v18.19.0"), fake_node(tmp_path / "new", "v22.12.0")
    npm = ui.find_npm([tmp_path / "none", old, fake_node(tmp_path / "odd", "v21.7.3"), fits])
    assert isinstance(npm, ui.Npm) and npm.npm == fits / "npm" and npm.node_version == "v22.12.0"
    argv, env = npm.command(tmp_path)
    assert argv == [str(fits / "npm")] and env["PATH"].split(":")[0] == str(fits)  # npm's scripts run this node
    why = ui.find_npm([old])
    assert isinstance(why, str) and "v18.19.0" in why and "podllama[ui]" in why
    assert [ui.node_fits(v) for v in ((20, 18, 9), (20, 19, 0), (21, 0), (22, 11, 9), (22, 12), (24, 1))] == [
        False, True, False, False, True, True]


def test_npm_beside_its_node_is_preferred(tmp_path):
    """The npm of the Python wheel's Node is a script that must run from lib/node_modules; it is run through node."""
    bin_dir = fake_node(tmp_path / "bin", "v22.20.0")
    cli = tmp_path / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    cli.parent.mkdir(parents=True)
    cli.write_text("")
    npm = ui.find_npm([bin_dir])
    assert isinstance(npm, ui.Npm) and npm.npm == cli
    shims = tmp_path / "shims"
    shims.mkdir()
    argv, env = npm.command(shims)
    assert argv == [str(shims / "npm")] and env["PATH"].split(":")[:2] == [str(shims), str(bin_dir)]
    assert f'exec "{bin_dir / "node"}" "{cli}"' in (shims / "npm").read_text()


def test_ui_off_and_missing_npm(tmp_path):
    assert ui.prepare_ui("off", tmp_path, "c", None, print)[0] == "off"
    none = ui.find_npm([tmp_path])
    state, why = ui.prepare_ui("auto", tmp_path, "c", None, print, npm=none)
    assert state == "off" and why.startswith("npm not found")
    with pytest.raises(BuildError, match="cannot be met: npm not found"):
        ui.prepare_ui("on", tmp_path, "c", None, print, npm=none)


def test_doctor_asks_for_the_debian_base_a_toolkit_goes_on():
    class Engine:
        def __init__(self, present: set[str]) -> None:
            self.present = present

        def image_exists(self, ref: str) -> bool:
            return ref in self.present

    missing = doctor.check_bases(Engine(set()), "rocm", "local")  # type: ignore[arg-type]
    assert not missing.ok and missing.fix == "`podllama base-image --suite forky`"
    there = doctor.check_bases(Engine({"localhost/podllama-base:forky"}), "rocm", "local")  # type: ignore[arg-type]
    assert there.ok and "ROCm 6.4" in there.detail and "first build" in there.detail


def test_a_containerfile_that_names_compiler_launchers_names_one_for_every_language_it_compiles(project_root):
    """ggml's GGML_CCACHE sets a launcher for every language only where none is named; a Containerfile that names
    C's and C++'s must name the GPU language's too, or its kernels (most of a GPU build) bypass the compiler cache
    (sd-server's CUDA build did: every rebuild compiled them all again)."""
    import re

    languages = {"CUDA": r"-D(GGML|SD)_CUDA=ON", "HIP": r"-D(GGML_HIP|SD_HIPBLAS)=ON"}
    checked = 0
    for file in sorted((project_root / "containers").glob("Containerfile.*")):
        text = file.read_text()
        if "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache" not in text:
            continue
        for language, enabled in languages.items():
            if re.search(enabled, text):
                checked += 1
                assert f"-DCMAKE_{language}_COMPILER_LAUNCHER=ccache" in text, (file.name, language)
    assert checked >= 1  # sd-cuda at least


def pulls(calls) -> list[str]:
    return [c[-1] for c in calls() if c[0] == "pull"]


@pytest.mark.parametrize("variant", ["cpu", "vulkan", "cuda", "rocm"])
def test_auto_builds_on_upstream_where_a_registry_gives_it_else_on_the_local_base(tmp_path, variant):
    said: list[str] = []
    upstream = bases.resolve_base(variant, "upstream")
    local = bases.resolve_base(variant, "local")
    online, calls = standin_podman(tmp_path / "online", [], registry=None)
    assert bases.pick_base(online, variant, "auto", said.append).build == upstream.build
    assert pulls(calls) == list(dict.fromkeys([upstream.build, upstream.runtime]))
    assert not any("local base" in line for line in said)

    offline, calls = standin_podman(tmp_path / "offline", bases.local_images(local), registry={})
    chosen = bases.pick_base(offline, variant, "auto", said.append)
    assert chosen.kind == "local" and chosen.build == local.build and pulls(calls) == [upstream.build]
    assert said[-1].startswith(f"no registry gives {upstream.build}: building on the local base")

    bare, _ = standin_podman(tmp_path / "bare", [], registry={})
    with pytest.raises(BuildError) as e:
        bases.pick_base(bare, variant, "auto", said.append)
    suite = bases.local_images(local)[0].rsplit(":", 1)[-1]
    assert "no such host" in str(e.value) and "the local base is not here either" in str(e.value)
    assert f"`podllama base-image --suite {suite}`" in str(e.value)
    assert bases.pick_base(bare, variant, "local", said.append).kind == "local"  # an explicit choice is not tried
    with pytest.raises(ValueError):
        bases.resolve_base(variant, "auto")


def test_doctor_on_auto_names_the_fallback_it_would_take(tmp_path):
    engine, _ = standin_podman(tmp_path, [], registry={})
    nothing = doctor.check_bases(engine, "cpu", "auto")
    assert nothing.ok and "pulled at build time" in nothing.detail
    assert nothing.fix == "where no registry is reachable: `podllama base-image --suite bookworm`"
    engine, _ = standin_podman(tmp_path, ["localhost/podllama-base:forky"], registry={})
    rocm = doctor.check_bases(engine, "rocm", "auto")
    assert rocm.ok and "used where no registry gives the upstream images" in rocm.detail and rocm.fix is None
