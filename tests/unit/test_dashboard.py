"""The dashboard's session, attacked in-process: what logs in, what the cookie opens and to whom, and what
every page is sent with."""

from __future__ import annotations


def test_a_login_opens_the_api_to_this_origin_only_until_logout(gateway, upstream):
    gw = gateway()
    assert gw.post("/ui/login", json={"key": "pk-guess"}).status_code == 401
    r = gw.post("/ui/login", json={"key": gw.admin["Authorization"].removeprefix("Bearer ")})
    assert r.status_code == 200
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    token = r.cookies["podllama_session"]
    session = {"Cookie": f"podllama_session={token}"}
    assert gw.get("/admin/keys", headers=session).status_code == 200
    assert gw.get("/ui/session", headers=session).json()["logged_in"] is True
    # another origin of the same site gets the cookie sent, but may change nothing with it
    other = {"Origin": "http://127.0.0.1:9"}
    assert gw.post("/admin/keys", json={"name": "csrf"}, headers=session | other).status_code == 403
    assert gw.post("/ui/login", json={"key": "x"}, headers=other).status_code == 403
    assert gw.get("/admin/keys", headers=session).json() == []
    # a made-up or ended session opens nothing
    assert gw.get("/admin/keys", headers={"Cookie": "podllama_session=forged"}).status_code == 401
    assert gw.post("/ui/logout", headers=session).status_code == 200
    assert gw.get("/admin/keys", headers=session).status_code == 401
    assert gw.get("/ui/session", headers=session).json()["logged_in"] is False


def test_the_pages_are_ours_and_cannot_be_framed(gateway, upstream):
    gw = gateway()
    for path, kind in (("/ui", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
        r = gw.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY"
    assert gw.get("/ui/../admin/keys").status_code in (401, 404)
    assert gw.get("/ui/secrets.txt").status_code == 404
    assert not upstream.received("/ui")  # never llama.cpp's own web UI
    page = gw.get("/ui").text
    assert "<script src=\"/ui/app.js\"" in page and "onclick=" not in page and "style=" not in page


def test_the_dashboard_script_never_writes_html():
    from podllama.gateway.apis.dashboard import UI_DIR

    script = (UI_DIR / "app.js").read_text()
    assert "innerHTML" not in script and "outerHTML" not in script and "insertAdjacentHTML" not in script
    assert "eval(" not in script
