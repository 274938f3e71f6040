"""`podllama export`: the documents it writes for a stack on the in-process engine — the same flags and hardening
as `start`, keys where each side reads them, and Kubernetes manifests that validate against the schemas."""

from __future__ import annotations

import json
import shlex
import stat
import tomllib

import kubernetes_validate
import pytest
import yaml

from podllama import config
from podllama.build import push
from podllama.engine import hardening
from podllama.models import tinymodel
from podllama.stack import Stack
from podllama.stack.export import ExportError, export, gateway_config
from tests.fakeengine import FakeEngine
from tests.helpers import unit_file

SERVERS = """
[servers.chat]
model = "tiny.gguf"
alias = "tiny-chat"
ctx_size = 1024
replicas = 2

[servers.embed_x]
role = "embedding"
model = "tiny.gguf"
start = "on-demand"
args = { parallel = 2 }

[servers.far]
url = "http://10.0.0.9:8080"
"""
K8S_VERSION = "1.31"


@pytest.fixture
def stack(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("PODLLAMA_VARIANT", "cpu")
    path = tmp_path / "services.toml"
    path.write_text(f'[stack]\nname = "exq"\nmodels_dir = "{tiny_models}"\n[gateway]\nport = 18099\n{SERVERS}')
    engine = FakeEngine()
    yield Stack(config.load(path), engine, default_variant="cpu")
    engine.close()


def docs(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kube_manifests_validate_and_carry_the_stack(stack, tmp_path):
    out = tmp_path / "k"
    written = export(stack, "kube", out, "localhost/podllama/gateway:x")
    manifests = docs(written[0])
    for d in manifests:  # the Kubernetes schemas, strictly (no unknown keys)
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    bogus = manifests[2] | {"spec": manifests[2]["spec"] | {"replica": 2}}  # the check itself can fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bogus, K8S_VERSION, strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests}
    assert kinds == {("ConfigMap", "exq-config"), ("Secret", "exq-keys"), ("Deployment", "chat"), ("Service", "chat"),
                     ("Deployment", "embed-x"), ("Service", "embed-x"), ("Deployment", "exq-gateway"),
                     ("Service", "exq-gateway")}  # the remote server runs elsewhere: nothing for it
    by = {(d["kind"], d["metadata"]["name"]): d for d in manifests}
    chat = by["Deployment", "chat"]["spec"]
    assert chat["replicas"] == 2 and by["Service", "chat"]["spec"]["clusterIP"] == "None"  # every replica by DNS
    pod = chat["template"]["spec"]
    [c] = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsUser"] == 10001 and sc["runAsNonRoot"] and "ports" not in c
    assert stack.units()[0].spec.args == c["args"]  # the flags `start` gives, checked against the image's --help
    assert "--api-key-file" in c["args"] and c["readinessProbe"]["httpGet"]["path"] == "/health"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and mounts["/run/podllama"]["readOnly"]
    keys = next(v for v in pod["volumes"] if v["name"] == "keys")["secret"]
    assert keys["items"] == [{"key": "server.key", "path": "server.key"}]  # servers never see the admin key
    secret = by["Secret", "exq-keys"]["stringData"]
    assert secret["server.key"] == stack.credentials.server_key() and secret["admin.key"] == stack.credentials.admin_key()
    gw = by["Deployment", "exq-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gw["args"][:2] == ["--discovery", "dns"] and gw["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert not any("sock" in m["mountPath"] for m in gw["volumeMounts"])  # no engine socket
    toml = tomllib.loads(by["ConfigMap", "exq-config"]["data"]["services.toml"])
    assert toml["servers"]["embed_x"]["start"] == "always" and toml["stack"]["models_dir"] == "/models"
    assert toml["servers"]["far"]["url"] == "http://10.0.0.9:8080" and "exq-gateway" in toml["gateway"]["allowed_hosts"]


def test_podman_flavour_mounts_the_keys_from_the_export_and_publishes_the_port(stack, tmp_path):
    out = tmp_path / "p"
    written = export(stack, "kube", out, "localhost/podllama/gateway:x", flavour="podman")
    manifests = docs(written[0])
    for d in manifests:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    assert "Secret" not in {d["kind"] for d in manifests}  # Podman 4.3's kube play cannot play one
    gw = next(d for d in manifests if d["metadata"]["name"] == "exq-gateway" and d["kind"] == "Deployment")
    port = gw["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    assert (port["hostPort"], port["hostIP"]) == (18099, "127.0.0.1")
    key = out / "keys" / "server.key"
    assert key.read_text().strip() == stack.credentials.server_key()
    assert stat.S_IMODE(key.stat().st_mode) == 0o440 and key.stat().st_gid == 10001
    admin = out / "gateway" / "state" / "secrets" / "admin.key"
    assert stat.S_IMODE(admin.stat().st_mode) == 0o600 and not (out / "keys" / "admin.key").exists()


def test_compose_has_the_same_servers_hardening_and_an_internal_network(stack, tmp_path):
    written = export(stack, "compose", tmp_path / "c", "localhost/podllama/gateway:x")
    doc = yaml.safe_load(written[0].read_text())
    chat = doc["services"]["chat"]
    assert chat["read_only"] and chat["cap_drop"] == ["ALL"] and "no-new-privileges:true" in chat["security_opt"]
    assert chat["deploy"]["replicas"] == 2 and chat["networks"] == ["servers"] and "ports" not in chat
    assert f"{stack.cfg.models_path}:/models:ro" in chat["volumes"] and "./keys:/run/podllama:ro" in chat["volumes"]
    assert chat["command"] == stack.units()[0].spec.args and chat["image"].endswith(":cpu-000000000000")
    gw = doc["services"]["exq-gateway"]
    assert gw["ports"] == ["127.0.0.1:18099:8080"] and set(gw["networks"]) == {"servers", "outside"}
    assert not any("sock" in v for v in gw["volumes"])
    assert doc["networks"]["servers"] == {"internal": True}
    assert set(doc["services"]) == {"chat", "embed-x", "exq-gateway"}


def test_bad_requests_change_nothing(stack, tmp_path):
    with pytest.raises(ExportError, match="no export format 'helm'"):
        export(stack, "helm", tmp_path / "x", "gw")
    assert not (tmp_path / "x").exists()


def test_the_exported_gateways_config_parses_and_keeps_no_local_paths(stack):
    data = gateway_config(stack.cfg, ["exq-gateway"])
    again = config.validate(data)
    assert again.gateway.admin_key_file is None and not any(s.on_demand for s in again.servers.values())


def test_images_pushed_with_build_push_are_named_by_their_digest(stack, tmp_path):
    digest = "sha256:" + "ab" * 32
    push.record(stack.cfg.root / push.LOCK, "reg/x:cpu-000000000000",
                    {"ref": f"reg/x@{digest}", "image_id": FakeEngine.IMAGE_ID})
    doc = yaml.safe_load(export(stack, "compose", tmp_path / "c", "gw")[0].read_text())
    assert doc["services"]["chat"]["image"] == f"reg/x@{digest}"


def words(value: str) -> list[str]:
    """A word-list value as systemd reads it into ExecStart: quotes, then %% and $$ made literal again."""
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(value)]


def test_quadlet_units_run_what_start_runs(stack, tmp_path):
    out = tmp_path / "q"
    written = export(stack, "quadlet", out, "localhost/podllama/gateway:x")
    units = {p.name for p in written if p.parent.name == "quadlet"}
    assert units == {"exq-servers.network", "exq.network", "exq-chat-1.container", "exq-chat-2.container",
                     "exq-embed-x.container", "exq-gateway.container"}  # a unit per replica, none for the remote
    by_unit = {u.spec.name: u.spec for u in stack.units()}
    chat = unit_file(out / "quadlet" / "exq-chat-2.container")
    keys = {(s, k): v for s, k, v in chat}
    assert words(keys["Container", "Exec"]) == by_unit["exq-chat-2"].args  # the flags `start` gives
    args = words(keys["Container", "PodmanArgs"])
    assert args == [*hardening(by_unit["exq-chat-2"]), "--network-alias=chat"]  # the same hardening, its DNS name
    assert "--read-only" in args and "--cap-drop=ALL" in args and "--security-opt=no-new-privileges" in args
    assert keys["Container", "Image"] == "localhost/podllama/llama-server:cpu-000000000000"
    assert keys["Container", "Network"] == "exq-servers.network" and ("Container", "PublishPort") not in keys
    volumes = [v for s, k, v in chat if k == "Volume"]
    assert volumes == [f"{stack.cfg.models_path}:/models:ro", f"{out.resolve()}/keys:/run/podllama:ro"]
    assert keys["Service", "Restart"] == "always" and "health" in keys["Container", "HealthCmd"]
    net = {(s, k): v for s, k, v in unit_file(out / "quadlet" / "exq-servers.network")}
    assert net["Network", "Internal"] == "true" and net["Network", "NetworkName"] == "exq-servers"
    gw = unit_file(out / "quadlet" / "exq-gateway.container")
    gkeys = {(s, k): v for s, k, v in gw}
    assert [v for s, k, v in gw if k == "Network"] == ["exq-servers.network", "exq.network"]
    assert gkeys["Container", "PublishPort"] == "127.0.0.1:18099:8080"
    assert words(gkeys["Container", "Exec"])[:2] == ["--discovery", "dns"]
    assert not any("sock" in v for s, k, v in gw if k == "Volume")  # no engine socket
    assert set(gkeys["Unit", "Wants"].split()) == {"exq-chat-1.service", "exq-chat-2.service", "exq-embed-x.service"}
    assert tomllib.loads((out / "gateway" / "services.toml").read_text())["servers"]["embed_x"]["start"] == "always"
    assert (out / "keys" / "server.key").read_text().strip() == stack.credentials.server_key()


def test_quadlet_values_stay_literal_through_systemd(tmp_path, tiny_models, monkeypatch):
    """systemd expands % specifiers and $VARIABLES in what the generator puts into ExecStart: an alias holding
    them must reach llama-server as written."""
    monkeypatch.setenv("PODLLAMA_VARIANT", "cpu")
    path = tmp_path / "services.toml"
    alias = 'tiny 100%n $HOME ${PATH} "q" \\ x'
    path.write_text(f'[stack]\nname = "lit"\nmodels_dir = "{tiny_models}"\n'
                    f'[servers.chat]\nmodel = "tiny.gguf"\nalias = {json.dumps(alias)}\n')
    engine = FakeEngine()
    try:
        st = Stack(config.load(path), engine, default_variant="cpu")
        export(st, "quadlet", tmp_path / "q", "gw")
    finally:
        engine.close()
    keys = {(s, k): v for s, k, v in unit_file(tmp_path / "q" / "quadlet" / "lit-chat.container")}
    argv = words(keys["Container", "Exec"])
    assert argv[argv.index("--alias") + 1] == alias
    assert "%n" not in keys["Container", "Exec"].replace("%%", "") and "$HOME" not in keys["Container", "Exec"].replace("$$", "")


def test_a_line_break_in_a_path_is_refused_and_nothing_is_written(tmp_path, vocab_file, monkeypatch):
    """A models directory named to smuggle a directive into the unit (ExecStartPre runs as root)."""
    monkeypatch.setenv("PODLLAMA_VARIANT", "cpu")
    models = tmp_path / "m\nExecStartPre=touch pwned\n"  # no "/": one directory
    models.mkdir()
    tinymodel.write(models / "tiny.gguf", vocab_file)
    path = tmp_path / "services.toml"
    path.write_text(f'[stack]\nname = "nl"\nmodels_dir = {json.dumps(str(models))}\n'
                    f'[servers.chat]\nmodel = "tiny.gguf"\n')
    engine = FakeEngine()
    try:
        with pytest.raises(ExportError, match="Volume: .* control character"):
            export(Stack(config.load(path), engine, default_variant="cpu"), "quadlet", tmp_path / "q", "gw")
    finally:
        engine.close()
    assert not (tmp_path / "q").exists()


def test_a_line_break_in_the_configs_path_stays_in_its_comment(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("PODLLAMA_VARIANT", "cpu")
    where = tmp_path / "c\nExecStartPre=touch pwned"
    where.mkdir()
    (where / "services.toml").write_text(f'[stack]\nname = "nl"\nmodels_dir = "{tiny_models}"\n'
                                         f'[servers.chat]\nmodel = "tiny.gguf"\n')
    engine = FakeEngine()
    try:
        export(Stack(config.load(where / "services.toml"), engine, default_variant="cpu"), "quadlet", tmp_path / "q", "gw")
    finally:
        engine.close()
    for unit in (tmp_path / "q" / "quadlet").iterdir():
        assert not [k for _, k, _ in unit_file(unit) if k == "ExecStartPre"], unit.read_text()


def test_a_second_export_removes_the_units_it_no_longer_writes(stack, tmp_path):
    out = tmp_path / "q"
    (out / "quadlet").mkdir(parents=True)
    (out / "quadlet" / "exq-chat-3.container").write_text("# podllama stack 'exq', exported …\n[Container]\n")
    (out / "quadlet" / "mine.container").write_text("[Container]\nImage=x\n")  # not ours: kept
    export(stack, "quadlet", out, "gw")
    assert not (out / "quadlet" / "exq-chat-3.container").exists() and (out / "quadlet" / "mine.container").exists()
    assert (out / "quadlet" / "exq-chat-2.container").exists()


def test_an_exported_self_signed_gateway_is_certified_for_its_service_name(tmp_path, tiny_models, monkeypatch):
    from cryptography import x509

    monkeypatch.setenv("PODLLAMA_VARIANT", "cpu")
    path = tmp_path / "services.toml"
    path.write_text(f'[stack]\nname = "tlsx"\nmodels_dir = "{tiny_models}"\n[gateway]\ntls = "self-signed"\n{SERVERS}')
    engine = FakeEngine()
    try:
        export(Stack(config.load(path), engine, default_variant="cpu"), "compose", tmp_path / "c", "gw:x")
    finally:
        engine.close()
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "gateway" / "state" / "secrets" / "tls.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert "tlsx-gateway" in names and "localhost" in names  # what the other containers and this machine call it


GPU_SERVERS = """
[servers.nv]
model = "tiny.gguf"
variant = "cuda"
gpus = ["0", "1"]
replicas = 2

[servers.nvall]
model = "tiny.gguf"
variant = "cuda"

[servers.amd]
model = "tiny.gguf"
variant = "rocm"
"""


def test_a_servers_gpus_reach_every_export(tmp_path, tiny_models, monkeypatch):
    from podllama.engine import hardware

    from .test_hardware import HOSTS

    monkeypatch.setenv("PODLLAMA_VARIANT", "cpu")
    path = tmp_path / "services.toml"
    path.write_text(f'[stack]\nname = "gpux"\nmodels_dir = "{tiny_models}"\n{GPU_SERVERS}')
    engine = FakeEngine()
    h100 = hardware.detect(hardware.FixtureHost(HOSTS / "nvidia-h100"))  # recorded from a real machine
    stack = Stack(config.load(path), engine, default_variant="cpu", hw=h100)
    try:
        c = yaml.safe_load(export(stack, "compose", tmp_path / "c", "gw:x")[0].read_text())["services"]
        assert c["nv"]["deploy"] == {"replicas": 2, "resources": {"reservations": {"devices": [
            {"driver": "nvidia", "capabilities": ["gpu"], "device_ids": ["0", "1"]}]}}}
        assert c["nvall"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
        assert c["amd"]["devices"] == ["/dev/kfd", "/dev/dri"] and "video" in c["amd"]["group_add"]
        manifests = docs(export(stack, "kube", tmp_path / "k", "gw:x")[0])
        for d in manifests:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        limits = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0].get("resources", {})
                  for d in manifests if d["kind"] == "Deployment"}
        gpus = sum(1 for g in h100.gpus if g.backend == "cuda")
        assert limits["nv"] == {"limits": {"nvidia.com/gpu": 2}} and limits["nvall"] == {"limits": {"nvidia.com/gpu": gpus}}
        assert limits["amd"] == {"limits": {"amd.com/gpu": 1}} and limits["gpux-gateway"] == {}
        units = export(stack, "quadlet", tmp_path / "q", "gw:x")
        nv = next(p for p in units if p.name == "gpux-nv-1.container").read_text()
        assert "--device=nvidia.com/gpu=0" in nv and "--device=nvidia.com/gpu=1" in nv  # Podman's CDI names
        path.write_text(path.read_text() + '\n[servers.vk]\nmodel = "tiny.gguf"\nvariant = "vulkan"\n')
        with pytest.raises(ExportError, match="servers.vk: a vulkan GPU has no standard Kubernetes resource"):
            export(Stack(config.load(path), engine, default_variant="cpu", hw=h100), "kube", tmp_path / "k2", "gw:x")
        assert not (tmp_path / "k2").exists()  # refused before anything is written
    finally:
        engine.close()

