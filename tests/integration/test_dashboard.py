"""The dashboard driven in a real browser (the distribution's Chromium, through Playwright) on a real stack:
log in, see the servers healthy, restart one and watch it come back, create a key and revoke it, edit the
config and apply a planned change — and the session cookie attacked as a page on another origin would."""

from __future__ import annotations

import shutil

import httpx
import pytest
from playwright.sync_api import sync_playwright

from podllama.build import source
from podllama.models import tinymodel
from tests.fakehub import FakeHub
from tests.helpers import ROOT, stack_name, wait_until
from tests.integration.conftest import StackFiles, free_port


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Chromium is missing: apt-get install chromium (scripts/setup.sh --for-tests does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def stack(podman, stack_files):
    sf = stack_files(podman)
    sf.run("start")
    sf.url = f"http://127.0.0.1:{sf.port}"
    return sf


def test_the_dashboard_drives_a_real_stack(stack, browser, podman, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: d.accept())
    page.goto(f"{stack.url}/ui")
    # a wrong key is refused, the right one lets in
    page.fill("#login-key", "pk-not-a-key")
    page.click("#login-form button")
    page.wait_for_selector("#login-error:text('not an admin key')")
    admin_key = stack.admin["Authorization"].removeprefix("Bearer ")
    # the last update's conformance verdict, as `podllama update` keeps it, shown under the servers
    from podllama import config
    from podllama.stack.conformance import compare, shadow, verdict

    refused = verdict.Verdict("a" * 40, "b" * 40, "strict", [compare.ServerResult(
        "embed", differences=["embeddings moved: cosine 0.3121"])])
    refused.save(config.load(stack.path).state_path / shadow.CHECKS)
    page.fill("#login-key", admin_key)
    page.click("#login-form button")
    for server in ("chat", "embed"):
        page.wait_for_selector(f"tr[data-server={server}] td.health-ok", timeout=30_000)
    check = page.wait_for_selector("#servers-check:text('Last update check')", timeout=10_000)
    assert "aaaaaaaaaaaa → bbbbbbbbbbbb" in check.inner_text() and "embeddings moved: cosine 0.3121" in check.inner_text()
    page.screenshot(path=str(tmp_path / "servers.png"))
    cookie = next(c for c in page.context.cookies() if c["name"] == "podllama_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # out of reach of scripts
    # restart one and watch it come back (a new container, healthy)
    before = podman.inspect(f"{stack.name}-embed-1").id
    page.click("tr[data-server=embed] button:text('restart')")
    page.wait_for_selector("#servers-message:text('embed: restart done')", timeout=120_000)
    page.wait_for_selector("tr[data-server=embed] td.health-ok", timeout=30_000)
    assert podman.inspect(f"{stack.name}-embed-1").id != before
    # a live log tail
    page.click("tr[data-server=chat] button:text('log')")
    page.wait_for_selector("#log:text('listening')", timeout=10_000)
    # create a key, use it, revoke it
    page.click("button[data-tab=keys]")
    page.fill("#key-name", "from-the-ui")
    page.fill("#key-models", "tiny-chat")
    page.fill("#key-rpm", "30")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#new-key:not([hidden])")
    key = page.inner_text("#new-key-value").strip()
    assert key.startswith("pk-")
    page.wait_for_selector("tr[data-key=from-the-ui] td:text('30 rpm')")
    page.screenshot(path=str(tmp_path / "keys.png"))
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with_key = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{stack.url}/v1/chat/completions", json=chat, headers=with_key, timeout=60).status_code == 200
    page.click("tr[data-key=from-the-ui] button:text('revoke')")
    page.wait_for_selector("tr[data-key=from-the-ui] td.state-revoked")
    assert wait_until(lambda: httpx.post(f"{stack.url}/v1/chat/completions", json=chat, headers=with_key,
                                         timeout=60).status_code == 401, 10)
    # the request it made is in the log, with its tokens
    page.click("button[data-tab=requests]")
    page.wait_for_selector("#requests-rows td:text('from-the-ui')")
    page.screenshot(path=str(tmp_path / "requests.png"))
    # edit the config: the plan first (nothing changes), then apply
    page.click("button[data-tab=config]")
    text = wait_until(lambda: (t := page.input_value("#config-text")) and "[servers.embed]" in t and t, 10)
    assert "ctx_size = 512" in text
    page.fill("#config-text", text.replace("ctx_size = 512", "ctx_size = 768"))
    page.click("#config-plan")
    page.wait_for_selector("#plan:not([hidden])")
    assert "restart embed" in page.inner_text("#plan-summary")
    diff = page.inner_text("#plan-diff")
    assert "- ctx_size = 512" in diff and "+ ctx_size = 768" in diff
    assert "ctx_size = 512" in stack.path.read_text()  # planned, not applied
    page.screenshot(path=str(tmp_path / "config.png"))
    page.click("#config-apply")
    page.wait_for_selector("#config-message:text('applied')", timeout=180_000)
    assert "ctx_size = 768" in stack.path.read_text()
    embed = next(r for r in stack.status()["servers"] if r["server"] == "embed")
    assert embed["health"] == "ok"
    assert not problems, problems
    # logging out ends the session: the cookie no longer opens the API
    session = {"Cookie": f"podllama_session={cookie['value']}"}
    assert httpx.get(f"{stack.url}/admin/keys", headers=session).status_code == 200
    page.click("#logout")
    page.wait_for_selector("#login:not([hidden])")
    assert httpx.get(f"{stack.url}/admin/keys", headers=session).status_code == 401
    page.close()


def test_a_session_cookie_opens_nothing_to_another_origin(stack, browser):
    """A page on another origin of the same site (another port of 127.0.0.1, where SameSite=Strict still sends
    the cookie) cannot change anything with it, nor read the dashboard's data; the dashboard cannot be framed."""
    page = browser.new_page()
    page.goto(f"{stack.url}/ui")
    page.fill("#login-key", stack.admin["Authorization"].removeprefix("Bearer "))
    page.click("#login-form button")
    page.wait_for_selector("#tabs:not([hidden])")
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "podllama_session")
    session = {"Cookie": f"podllama_session={token}"}
    other = {"Origin": "http://127.0.0.1:9"}
    r = httpx.post(f"{stack.url}/admin/keys", json={"name": "csrf"}, headers=session | other)
    assert r.status_code == 403 and "cors_origins" in r.json()["error"]["message"]
    r = httpx.post(f"{stack.url}/admin/servers/chat/stop", headers=session | other)
    assert r.status_code == 403
    read = httpx.get(f"{stack.url}/admin/keys", headers=session | other)
    assert "access-control-allow-origin" not in read.headers  # a browser keeps the answer from that page
    r = httpx.post(f"{stack.url}/ui/login", json={"key": "x"}, headers=other)  # no login from elsewhere either
    assert r.status_code == 403
    ui = httpx.get(f"{stack.url}/ui")
    assert "frame-ancestors 'none'" in ui.headers["content-security-policy"]
    assert ui.headers["x-frame-options"] == "DENY"
    assert [k["name"] for k in httpx.get(f"{stack.url}/admin/keys", headers=stack.admin).json()] == []
    assert next(r for r in stack.status()["servers"] if r["server"] == "chat")["state"] == "running"
    page.close()


def test_a_model_pulled_and_verified_from_the_dashboard(podman, cpu_image, browser, tmp_path):
    """Pull from a hub (a local one speaking the hub's protocol) with the form, watch it finish, see it listed;
    Verify finds every byte right, then names the file a byte was changed in."""
    d = tmp_path / "hubfiles"
    single = tinymodel.write(d / "tiny-Q8_0.gguf", source.source_dir(ROOT) / tinymodel.VOCAB_FILE, seed=1)
    hub = FakeHub().start()
    hub.add("org/tiny-GGUF", {"tiny-Q8_0.gguf": single.read_bytes()})
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o755)
    sf = StackFiles(tmp_path, stack_name("ptdash"), podman, store, free_port()).write(
        '[servers.chat]\nmodel = "hf://org/tiny-GGUF:Q8_0"\nctx_size = 512\n')
    sf.path.write_text(sf.path.read_text().replace("[supervisor]", f'[hub]\nendpoint = "{hub.url}"\n[supervisor]'))
    try:
        sf.run("start")
        hub.add("org/other-GGUF", {"other-Q8_0.gguf": single.read_bytes()})
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"http://127.0.0.1:{sf.port}/ui")
        page.fill("#login-key", sf.admin["Authorization"].removeprefix("Bearer "))
        page.click("#login-form button")
        page.click("button[data-tab=models]")
        page.fill("#pull-ref", "org/other-GGUF:Q8_0")
        page.click("#pull-form button")
        page.wait_for_selector("#models-message:text('pulled org/other-GGUF:Q8_0')", timeout=60_000)
        page.wait_for_selector("#models-rows td:text('org/other-GGUF:Q8_0')")
        page.click("#verify")
        page.wait_for_selector("#models-message:text('all 2 models verified')")
        pulled = next(store.rglob("other-Q8_0.gguf"))
        data = bytearray(pulled.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pulled.write_bytes(bytes(data))
        page.click("#verify")
        page.wait_for_selector("#models-message.bad:text('org/other-GGUF:Q8_0')")
        page.screenshot(path=str(tmp_path / "models.png"))
        page.close()
    finally:
        sf.run("down", check=False)
        hub.stop()
