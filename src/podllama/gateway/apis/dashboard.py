"""The dashboard at /ui: one page of plain HTML, CSS and JavaScript shipped in the package (no build step, no
file from anywhere else), driving the management API as a logged-in admin.

Logging in posts an admin key (a listed one, or a database key made with --admin) to /ui/login; the answer
sets an HttpOnly, SameSite=Strict session cookie (auth.Sessions) that the guard takes in place of the key.
The page's files are public and hold no data; everything it shows comes from /admin with the session. Every
answer carries a Content-Security-Policy that allows only the gateway's own scripts, styles and connections,
and may not be framed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request, Response

from ..front.auth import SESSION_COOKIE, SESSION_TTL
from .admin.common import Body

if TYPE_CHECKING:
    from ..app import Gateway

UI_DIR = Path(__file__).parent / "ui"
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
SECURITY = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Login(Body):
    key: str


def router(gw: Gateway) -> APIRouter:
    ui = APIRouter(prefix="/ui", tags=["dashboard"])

    def page(name: str) -> Response:
        return Response((UI_DIR / name).read_bytes(), media_type=FILES[name], headers=SECURITY)

    @ui.get("", summary="The dashboard (log in with an admin key)")
    def index() -> Response:
        return page("index.html")

    @ui.post("/login", summary="Log in to the dashboard with an admin key; sets the session cookie")
    def login(body: Login) -> Response:
        key = body.key.strip().encode()
        caller = gw.keys.caller_of(key, admin=True)
        if caller is None:
            raise HTTPException(401, "that is not an admin key (the stack's is in .podllama/secrets/admin.key; "
                                     "`podllama keys create NAME --admin` makes more)")
        token = gw.guard.sessions.open(key)
        response = Response(b'{"logged_in": true}', media_type="application/json", headers=SECURITY)
        response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_TTL, path="/", httponly=True, samesite="strict",
                            secure=gw.stack.cfg.gateway.secure)  # over HTTPS, never sent in clear text
        return response

    @ui.post("/logout", summary="End the dashboard session")
    def logout(request: Request) -> Response:
        gw.guard.sessions.close(request.scope["headers"])
        response = Response(b'{"logged_in": false}', media_type="application/json", headers=SECURITY)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @ui.get("/session", summary="Whether this browser is logged in, and the stack's name")
    def session(request: Request) -> dict[str, Any]:
        caller = gw.guard.sessions.caller(request.scope["headers"], gw.keys)
        return {"logged_in": caller is not None, "name": caller.name if caller else None, "stack": gw.stack.name}

    @ui.get("/{name}", include_in_schema=False)  # last: the routes above go first
    def static(name: str) -> Response:
        if name not in FILES:
            raise HTTPException(404, f"no dashboard file '{name}'")
        return page(name)

    return ui
