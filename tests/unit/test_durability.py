"""Durability and secrets on disk: one atomic_write, credentials only root can read, no symlinked directory
on the way into the model store, and no secret in what the CLI prints when something unexpected breaks."""

from __future__ import annotations

import os

import pytest

from podllama.access.credentials import SERVER_GID, Credentials
from podllama.atomic import atomic_write
from podllama.models import hub
from podllama.models.store import Store, StoreError
from tests.fakehub import FakeHub
from tests.helpers import podllama
from tests.unit.test_hub import GGUF


def test_atomic_write_replaces_whole_and_keeps_the_mode(tmp_path):
    target = tmp_path / "services.toml"
    target.write_text("old = 1\n")
    target.chmod(0o640)
    atomic_write(target, "new = 2\n")
    assert target.read_text() == "new = 2\n" and target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["services.toml"]  # no temporary file left


def test_atomic_write_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / f".secret.{os.getpid()}.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        atomic_write(tmp_path / "secret", "key", mode=0o600)
    assert victim.read_text() == "untouched"


def test_credentials_are_made_once_and_only_root_reads_them(tmp_path):
    creds = Credentials(tmp_path / ".podllama")
    made = creds.ensure()
    assert len(made) == 2 and "admin.key" in made[0]
    admin, server = creds.admin_key(), creds.server_key()
    assert admin and server and admin != server
    assert creds.ensure() == [] and creds.admin_key() == admin  # kept across starts
    assert creds.dir.stat().st_mode & 0o777 == 0o700
    assert creds.path("admin.key").stat().st_mode & 0o777 == 0o600
    st = creds.path("server.key").stat()
    assert st.st_mode & 0o777 == 0o440 and (os.geteuid() != 0 or st.st_gid == SERVER_GID)


def test_environment_given_to_start_becomes_files(tmp_path):
    creds = Credentials(tmp_path / ".podllama")
    creds.ensure()
    taken = creds.capture_env({"PODLLAMA_API_KEYS": " sk-a, sk-b ", "HF_TOKEN": "hf_x", "PATH": "/bin",
                               "PODLLAMA_ADMIN_KEY": "admin-from-env"})
    assert set(taken) == {"PODLLAMA_API_KEYS", "HF_TOKEN", "PODLLAMA_ADMIN_KEY"}
    assert creds.inference_keys() == ["sk-a", "sk-b"] and creds.read("hf_token") == "hf_x"
    assert creds.admin_key() == "admin-from-env"
    assert all(creds.path(n).stat().st_mode & 0o777 == 0o600 for n in ("api_keys", "hf_token", "admin.key"))
    creds.capture_env({"PODLLAMA_API_KEYS": "", "PODLLAMA_ADMIN_KEY": ""})
    assert creds.inference_keys() == [] and creds.admin_key() == "admin-from-env"  # the admin key never goes


def test_a_symlinked_directory_on_the_way_into_the_store_is_refused(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = Store(tmp_path / "models")
    store.root.mkdir()
    (store.root / "org").symlink_to(outside)
    with pytest.raises(StoreError) as e:
        store.path("org/repo/model.gguf")
    assert "symbolic link" in str(e.value)
    fake = FakeHub().start()
    try:
        fake.add("org/repo", {"model-Q4_K_M.gguf": GGUF})
        with pytest.raises(StoreError):
            hub.pull(store, "org/repo:Q4_K_M", hub=fake.url)
    finally:
        fake.stop()
    assert list(outside.iterdir()) == []


def test_an_unexpected_error_prints_no_secrets(tmp_path):
    """A traceback with local variables would show the token; the CLI prints none."""
    fake = FakeHub().start()
    try:
        fake.add("org/repo", {"model-Q4_K_M.gguf": GGUF})
        (tmp_path / "models").write_text("a file where the store should be")
        (tmp_path / "services.toml").write_text('[stack]\nmodels_dir = "models"\n')
        proc = podllama("pull", "org/repo:Q4_K_M", "-c", str(tmp_path / "services.toml"), check=False,
                        env={"HF_ENDPOINT": fake.url, "HF_TOKEN": "hf_supersecret_token_123", "COLUMNS": "200"})
    finally:
        fake.stop()
    assert proc.returncode != 0
    assert "hf_supersecret_token_123" not in proc.stdout + proc.stderr
