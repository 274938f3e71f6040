from pathlib import Path

import pytest

from podllama import config
from podllama.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]

CONTRACT = """
[stack]
name = "podllama"
engine = "auto"
variant = "auto"
models_dir = "./models"

[gateway]
host = "127.0.0.1"
port = 8080

[servers.chat]
role = "chat"
model = "my-model.gguf"
alias = "my-model"
ctx_size = 4096
args = { parallel = 2 }

[servers.embed]
role = "embedding"
model = "my-embedder.gguf"
"""


def test_the_documented_contract_parses(tmp_path):
    f = tmp_path / "services.toml"
    f.write_text(CONTRACT)
    cfg = config.load(f)
    assert cfg.stack.name == "podllama" and cfg.gateway.port == 8080
    assert cfg.servers["chat"].args == {"parallel": 2} and cfg.servers["chat"].ctx_size == 4096
    assert cfg.servers["embed"].role == "embedding" and cfg.servers["embed"].replicas == 1
    assert cfg.models_path == (tmp_path / "models").resolve()
    assert cfg.state_path == tmp_path / ".podllama"


def test_the_default_services_toml_declares_chat_and_embedding():
    cfg = config.load(ROOT / "services.toml")
    roles = sorted(s.role for s in cfg.servers.values())
    assert roles == ["chat", "embedding"]
    assert cfg.gateway.host == "127.0.0.1"


def error_for(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        config.parse(text, source=Path("/etc/x/services.toml"))
    return str(e.value)


def test_errors_name_the_file_the_key_and_the_fix():
    msg = error_for('[servers.chat]\nmodel = "m.gguf"\nctx_size = "big"\n')
    assert msg.startswith("/etc/x/services.toml: servers.chat.ctx_size:") and "integer" in msg
    msg = error_for('[servers.chat]\nmodle = "m.gguf"\n')
    assert "servers.chat.modle: unknown key" in msg and "servers.chat.model: required key is missing" in msg
    msg = error_for('[stack]\nengine = "lxc"\n')
    assert "stack.engine" in msg and "'podman'" in msg and "lxc" in msg
    msg = error_for('[servers.chat\nmodel = 1\n')
    assert "not valid TOML" in msg and "line 1" in msg


def test_model_paths_are_confined_to_the_models_directory():
    for bad in ("../etc/passwd", "/etc/passwd", "a/../../b.gguf", "x\\u0000.gguf"):
        msg = error_for(f'[servers.chat]\nmodel = "{bad}"\n')
        assert "servers.chat.model" in msg, msg
    cfg = config.parse('[servers.chat]\nmodel = "org/sub/ok.gguf"\n')
    assert cfg.servers["chat"].model == "org/sub/ok.gguf"


def test_names_and_aliases_are_unique_and_safe():
    assert "names both" in error_for('[servers.a]\nmodel="x"\nalias="b"\n[servers.b]\nmodel="y"\n')
    assert "server name 'Bad Name'" in error_for('[servers."Bad Name"]\nmodel="x"\n')
    assert "stack.name" in error_for('[stack]\nname="-x"\n')


def test_config_path_order(monkeypatch, tmp_path):
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    assert config.config_path(None) == Path("services.toml")
    monkeypatch.setenv(config.CONFIG_ENV, str(tmp_path / "a.toml"))
    assert config.config_path(None) == tmp_path / "a.toml"
    assert config.config_path(tmp_path / "b.toml") == tmp_path / "b.toml"


def test_missing_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        config.load(tmp_path / "nope.toml")


def test_save_is_atomic_and_round_trips(tmp_path):
    f = tmp_path / "services.toml"
    f.write_text(CONTRACT)
    cfg = config.load(f)
    cfg.servers["chat"].ctx_size = 8192
    config.save(cfg, f)
    again = config.load(f)
    assert again.servers["chat"].ctx_size == 8192 and again.servers["embed"].model == "my-embedder.gguf"
    assert [p.name for p in tmp_path.iterdir()] == ["services.toml"]
