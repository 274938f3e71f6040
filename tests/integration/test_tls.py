"""A stack served over HTTPS (tls = "self-signed") on real containers: `start` makes the certificate and prints
its fingerprint, the OpenAI SDK verifying that certificate chats with a real llama-server, the CLI works over
it, plain HTTP gets no answer, and Chromium trusting exactly that key logs in to the dashboard (its session
cookie Secure)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import ssl

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import sync_playwright

from podllama.access import tls


def test_a_self_signed_stack_passes_the_client_checks_of_a_plain_one(podman, stack_files, tmp_path):
    sf = stack_files(podman, gateway='tls = "self-signed"')
    started = sf.run("start")
    material = tls.of(sf.config())
    assert material is not None and material.fingerprint() in started.stdout, started.stdout
    assert material.fingerprint() in sf.run("status").stdout
    url = f"https://127.0.0.1:{sf.port}"
    ctx = material.client_context()

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=sf.admin["Authorization"].removeprefix("Bearer "),
                           http_client=httpx.Client(verify=ctx, timeout=120))
    answer = client.chat.completions.create(model="tiny-chat", max_tokens=4,
                                            messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content is not None
    stream = client.chat.completions.create(model="tiny-chat", max_tokens=4, stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    assert any(chunk.choices for chunk in stream)
    assert sf.run("run", "tiny-chat", "hi", "--max-tokens", "4").returncode == 0  # the CLI's client over HTTPS
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port: no answer
        httpx.get(f"http://127.0.0.1:{sf.port}/health", timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(socket.create_connection(("127.0.0.1", sf.port)),
                                                 server_hostname="127.0.0.1")  # the system's CAs alone

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium is not None, "apt-get install chromium (scripts/setup.sh --for-tests does)"
    cert = x509.load_pem_x509_certificate(material.cert.read_bytes())
    spki = base64.b64encode(hashlib.sha256(cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()).decode()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium,
                                    args=["--no-sandbox", f"--ignore-certificate-errors-spki-list={spki}"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 700})
            page.goto(f"{url}/ui")
            page.fill("#login-key", sf.admin["Authorization"].removeprefix("Bearer "))
            page.click("#login-form button")
            page.wait_for_selector("tr[data-server=chat] td.health-ok", timeout=30_000)
            page.screenshot(path=str(tmp_path / "dashboard-https.png"))
            cookie = next(c for c in page.context.cookies() if c["name"] == "podllama_session")
            assert cookie["secure"] and cookie["httpOnly"]
        finally:
            browser.close()
