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
    assert msg.startswith("/etc/x/services.toml: servers.chat.ctx_size:") and "number of tokens" in msg and "fit" in msg
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


REMOTE = """
[gateway.defaults]
embedding = "far-embed"

[servers.chat]
model = "tiny.gguf"

[servers.far]
url = "http://192.168.1.5:8080"
alias = "big-model"
api_key_file = "far.key"

[servers.far-embed]
role = "embedding"
url = "http://[fd00::5]:9000/"
health = "/v1/models"
"""


def test_a_server_with_url_is_remote_and_round_trips_as_it_was_written(tmp_path):
    cfg = config.parse(REMOTE)
    assert list(cfg.servers) == ["chat"]  # what podllama runs
    assert list(cfg.remotes) == ["far", "far-embed"] and list(cfg.routable) == ["chat", "far", "far-embed"]
    far, emb = cfg.remotes["far"], cfg.remotes["far-embed"]
    assert (far.host, far.port, emb.host, emb.port, emb.url) == ("192.168.1.5", 8080, "fd00::5", 9000, "http://[fd00::5]:9000")
    again = config.parse(cfg.to_toml())
    assert again.remotes == cfg.remotes and again.servers == cfg.servers
    assert "[remotes" not in cfg.to_toml() and 'url = "http://192.168.1.5:8080"' in cfg.to_toml()
    assert config.validate(cfg.model_dump(mode="json")).remotes == cfg.remotes  # the JSON of GET /admin/config


@pytest.mark.parametrize("bad, says", [
    ('url = "ftp://x:1"', "servers.far.url: 'ftp://x:1' is not http(s)://HOST:PORT"),
    ('url = "http://x"', "is not http(s)://HOST:PORT"),
    ('url = "http://user:pw@x:1"', "is not http(s)://HOST:PORT"),
    ('url = "http://x:1/v1"', "is not http(s)://HOST:PORT"),
    ('url = "http://x:1?a=b"', "is not http(s)://HOST:PORT"),
    ('url = "http://x\\r\\nHost: y:1"', "control characters"),
    ('url = "-http://x:1"', "starts with '-'"),
    ('url = "http://x:1"\nreplicas = 2', "servers.far: replicas: settings of a server podllama runs"),
    ('url = "http://x:1"\nargs = { parallel = 2 }', "args: settings of a server podllama runs"),
    ('url = "http://x:1"\nhealth = "health"', "is not a path"),
])
def test_remote_servers_are_checked_before_anything_uses_them(bad, says):
    with pytest.raises(ConfigError) as e:
        config.parse(f"[servers.far]\n{bad}\n")
    assert says in str(e.value)


def test_remote_names_share_the_namespace_and_key_files_are_read_when_used(tmp_path):
    with pytest.raises(ConfigError, match="'chat' names both"):
        config.parse('[servers.chat]\nmodel = "a.gguf"\n[servers.far]\nurl = "http://x:1"\nalias = "chat"\n')
    with pytest.raises(ConfigError, match="no \\[remotes\\] section"):
        config.validate({"remotes": {}, "servers": {}})
    path = tmp_path / "services.toml"
    path.write_text(REMOTE)
    cfg = config.load(path)
    with pytest.raises(ConfigError, match="servers.far.api_key_file: cannot read .*far.key"):
        cfg.remote_key("far")
    (tmp_path / "far.key").write_text("sk-remote\n")
    assert cfg.remote_key("far") == "sk-remote" and cfg.remote_key("far-embed") is None
