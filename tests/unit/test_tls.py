"""HTTPS on the gateway (access/tls.py): a self-signed certificate made once and verified by real clients (the
OpenAI SDK, the CLI's own client) by that certificate alone; plain HTTP on the TLS port gets no answer; the
config refuses half a pair; remote https:// servers verified with their CA file, and refused without it."""

from __future__ import annotations

import ssl

import httpx
import openai
import pytest

from podllama import config
from podllama.access import tls
from podllama.api import GatewayAPI
from tests.scripted import Upstream

CHAT = '\n[servers.chat]\nmodel = "tiny.gguf"\n'


async def chat_reply(ex) -> None:
    await ex.send(200, b'{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
                 b'"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}')


def test_a_self_signed_gateway_is_verified_by_its_certificate_and_refuses_plain_http(gateway, upstream):
    upstream.on("/v1/chat/completions", chat_reply)
    g = gateway('tls = "self-signed"', servers=CHAT)
    assert g.url.startswith("https://127.0.0.1:")
    material = tls.of(config.load(g.cfg_path))
    assert material is not None and material.cert.is_file() and material.key.stat().st_mode & 0o077 == 0
    ctx = material.client_context()

    client = openai.OpenAI(base_url=g.url + "/v1", api_key="none", http_client=httpx.Client(verify=ctx))
    answer = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "hi"
    assert GatewayAPI(config.load(g.cfg_path)).admin("GET", "/status")["stack"] == "unit"  # the CLI's client

    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # the system's CAs alone: no
        httpx.get(g.url + "/health", timeout=5)
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port: no HTTP answer at all
        httpx.get(g.url.replace("https://", "http://") + "/health", timeout=5)


def test_the_self_signed_certificate_is_kept_and_made_again_only_for_a_new_name(tmp_path):
    path = tmp_path / "services.toml"
    path.write_text('[gateway]\ntls = "self-signed"\n')
    first, made = tls.ensure(config.load(path))
    assert first is not None and made and first.fingerprint() in made
    fingerprint = first.fingerprint()
    again, made = tls.ensure(config.load(path))
    assert made is None and again is not None and again.fingerprint() == fingerprint
    path.write_text('[gateway]\ntls = "self-signed"\nallowed_hosts = ["llm.lan"]\n')
    renewed, made = tls.ensure(config.load(path))
    assert made and "llm.lan" in made and renewed is not None and renewed.fingerprint() != fingerprint


@pytest.mark.parametrize("gateway_toml, message", [
    ('tls_cert = "a.pem"', "tls_cert and tls_key go together"),
    ('tls = "self-signed"\ntls_cert = "a.pem"\ntls_key = "a.key"', "keep one"),
    ('tls = "on"', "tls"),
])
def test_half_a_tls_setting_is_refused(gateway_toml, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse(f"[gateway]\n{gateway_toml}\n")


def test_missing_or_mismatched_files_are_named_before_anything_starts(tmp_path):
    path = tmp_path / "services.toml"
    path.write_text('[gateway]\ntls_cert = "gw.crt"\ntls_key = "gw.key"\n')
    with pytest.raises(tls.TlsError, match="gw.crt does not exist"):
        tls.ensure(config.load(path))
    one, other = tls.Tls(tmp_path / "gw.crt", tmp_path / "x.key", True), tls.Tls(tmp_path / "y.crt", tmp_path / "gw.key", True)
    tls._make(one, ["localhost"])
    tls._make(other, ["localhost"])  # gw.crt with another certificate's key
    with pytest.raises(tls.TlsError, match="cannot be used"):
        tls.ensure(config.load(path))


def test_a_remote_https_server_is_verified_with_its_ca_file_and_refused_without(gateway, tmp_path):
    far = tls.Tls(tmp_path / "far.crt", tmp_path / "far.key", True)
    tls._make(far, ["127.0.0.1"])
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(str(far.cert), str(far.key))
    remote, unknown = Upstream(served), Upstream(served)  # the same certificate; only one is given its CA
    remote.on("/v1/chat/completions", chat_reply)
    unknown.on("/v1/chat/completions", chat_reply)
    try:
        g = gateway(servers=f'\n[servers.far]\nurl = "https://127.0.0.1:{remote.port}"\nmodel = "far"\n'
                            f'ca_file = "{far.cert}"\n'
                            f'\n[servers.nameless]\nurl = "https://127.0.0.1:{unknown.port}"\nmodel = "nameless"\n')
        body = {"messages": [{"role": "user", "content": "hi"}]}
        r = g.post("/v1/chat/completions", json=body | {"model": "far"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi", r.text
        assert remote.received("/v1/chat/completions"), "the request went over TLS to the remote server"
        r = g.post("/v1/chat/completions", json=body | {"model": "nameless"})  # the system's CAs do not know it
        assert r.status_code in (502, 503) and not unknown.received("/v1/chat/completions"), r.text
    finally:
        remote.stop()
        unknown.stop()


def test_a_remote_server_url_may_be_https_and_ca_file_is_for_https_only():
    ok = config.parse('[servers.far]\nurl = "https://llm.lan:8443"\nca_file = "ca.pem"\n')
    assert ok.remotes["far"].secure and ok.remotes["far"].port == 8443
    with pytest.raises(config.ConfigError, match="ca_file is for an https"):
        config.parse('[servers.far]\nurl = "http://llm.lan:8080"\nca_file = "ca.pem"\n')


def test_status_checks_a_remote_with_an_unreadable_ca_file_as_the_gateway_does(tmp_path):
    from podllama.stack import Stack
    from tests.fakeengine import FakeEngine

    (tmp_path / "ca.pem").write_text("not a certificate")
    path = tmp_path / "services.toml"
    path.write_text('[servers.far]\nurl = "https://127.0.0.1:9"\nca_file = "ca.pem"\n')
    cfg = config.load(path)
    context, problem = tls.remote_verification(cfg, "far")
    assert context is not None and problem and "ca.pem cannot be read as a PEM CA" in problem
    engine = FakeEngine()
    try:  # verified by the system's CAs alone, as the gateway does: nothing listens there, so down
        row = next(r for r in Stack(cfg, engine, default_variant="cpu").status() if r["server"] == "far")
    finally:
        engine.close()
    assert row["health"] == "down"
