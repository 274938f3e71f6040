"""Open WebUI against a podllama gateway, in a real browser: too slow for every test run (Open WebUI and its
dependencies are about 7 GB from the package index, and it takes a minute to start), so it runs here, by hand,
and writes bench/RESULTS-openwebui.md with screenshots beside it.

    sudo .venv/bin/python bench/openwebui.py [--openwebui /var/tmp/openwebui] [--models DIR]
    (PODLLAMA_BASE=local where no registry answers: the images are built from a bootstrapped base)

What it does: a stack with a chat server and an embedding server (SmolLM2-135M-Instruct, the default stack's
offline model), Open WebUI (installed into its own virtual environment when missing) with the gateway as its
OpenAI connection and as its embedding engine, and Chromium driven by Playwright: the model list, a streamed
chat answer, and a document uploaded to a chat — which Open WebUI cuts into pieces and embeds through the
gateway. Each step is checked against what the gateway saw (its request log, with bodies), not only against the
page: a 135M model's answer is shown as it came, but whether the document reached it is checked in what Open
WebUI sent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.12.4"
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT, EMBED = "chat.completions", "embeddings.oai"  # the gateway's names for the routes, as its log records them
DOCUMENT = """The lighthouse keeper of Skerry Point is named Ottoline Brask.
She has kept the light since 1987 and paints the tower blue every spring.
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=3).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not answer within {timeout:.0f}s")


def install(venv: Path) -> str:
    if (venv / "bin" / "open-webui").exists():
        return f"Open WebUI {VERSION} already installed in {venv}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"open-webui=={VERSION}"], check=True)
    return f"Open WebUI {VERSION} installed (pip, into {venv})"


def requests_seen(url: str, admin: dict[str, str]) -> list[dict]:
    return list(httpx.get(f"{url}/admin/requests?limit=500", headers=admin, timeout=10).json()["requests"])


class Run:
    def __init__(self, out: Path) -> None:
        self.out, self.steps, self.checks = out, [], []

    def step(self, name: str, seconds: float) -> None:
        self.steps.append((name, seconds))
        print(f"  {name}: {seconds:.1f}s", flush=True)

    def check(self, what: str, ok: bool, detail: str = "") -> None:
        self.checks.append((what, ok, detail))
        print(f"  [{'ok' if ok else 'FAILED'}] {what} {detail}", flush=True)

    def shot(self, page: Page, name: str) -> str:
        path = self.out / f"openwebui-{name}.png"
        page.screenshot(path=str(path))
        return path.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--openwebui", type=Path, default=Path("/var/tmp/openwebui"), help="its virtual environment")
    ap.add_argument("--models", type=Path, default=ROOT / "models", help=f"a directory holding {MODEL}")
    args = ap.parse_args()
    if not (args.models / MODEL).is_file():
        raise SystemExit(f"{args.models / MODEL} is missing: run scripts/quickstart.sh once (it places it there)")
    run = Run(ROOT / "bench")
    t = time.monotonic()
    run.step(install(args.openwebui), time.monotonic() - t)

    work = Path(tempfile.mkdtemp(prefix="podllama-owui-"))
    port, ui_port = free_port(), free_port()
    cfg = work / "services.toml"
    cfg.write_text(f"""[stack]
name = "owui{port}"
models_dir = "{args.models}"
[build]
cpu_target = "native"
ui = "off"
base = "{os.environ.get('PODLLAMA_BASE', 'upstream')}"
[gateway]
port = {port}
log_bodies = true

[servers.chat]
model = "{MODEL}"
alias = "smollm2-chat"
ctx_size = 4096

[servers.embed]
role = "embedding"
model = "{MODEL}"
alias = "smollm2-embed"
ctx_size = 2048
""")
    podllama = [str(ROOT / ".venv" / "bin" / "podllama"), "-c", str(cfg)]
    url = f"http://127.0.0.1:{port}"
    owui = None
    try:
        t = time.monotonic()
        subprocess.run([*podllama, "start"], check=True)
        run.step("podllama start (chat + embedding)", time.monotonic() - t)
        admin = {"Authorization": "Bearer " + (work / ".podllama" / "secrets" / "admin.key").read_text().strip()}

        data = work / "openwebui-data"
        env = os.environ | {
            "DATA_DIR": str(data), "WEBUI_AUTH": "False", "ENABLE_OLLAMA_API": "False",
            "OPENAI_API_BASE_URL": f"{url}/v1", "OPENAI_API_KEY": "unused",
            "RAG_EMBEDDING_ENGINE": "openai", "RAG_EMBEDDING_MODEL": "smollm2-embed",
            "RAG_OPENAI_API_BASE_URL": f"{url}/v1", "RAG_OPENAI_API_KEY": "unused",
            "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "ENABLE_VERSION_UPDATE_CHECK": "False",
            "ENABLE_WEB_SEARCH": "False", "CHUNK_SIZE": "200", "CHUNK_OVERLAP": "20",
            # one chat request per question: no titles, tags, follow-ups or query rewriting by the model
            **{f"ENABLE_{task}_GENERATION": "False" for task in ("TITLE", "TAGS", "FOLLOW_UP", "AUTOCOMPLETE",
                                                                   "SEARCH_QUERY", "RETRIEVAL_QUERY")}}
        t = time.monotonic()
        owui = subprocess.Popen([str(args.openwebui / "bin" / "open-webui"), "serve", "--host", "127.0.0.1", "--port",
                                 str(ui_port)], env=env, stdout=(work / "openwebui.log").open("w"),
                                stderr=subprocess.STDOUT, cwd=work)  # it writes .webui_secret_key where it runs
        wait_for(f"http://127.0.0.1:{ui_port}/health", 300)
        run.step("Open WebUI up", time.monotonic() - t)
        before = len(requests_seen(url, admin))

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"http://127.0.0.1:{ui_port}/", wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_timeout(8000)
            dismiss(page)
            drive(page, run, url, admin, before, work)
            browser.close()
    finally:
        if owui is not None:
            owui.terminate()
            owui.wait(30)
        subprocess.run([*podllama, "down"], capture_output=True)
    write_results(run)
    return 0 if all(ok for _, ok, _ in run.checks) else 1


def dismiss(page: Page) -> None:
    """First-run pop-ups (what is new, onboarding) out of the way."""
    for label in ("Okay, Let's Go!", "Get started", "Close"):
        button = page.get_by_role("button", name=label)
        if button.count():
            button.first.click()
            page.wait_for_timeout(500)


def new_rows(url: str, admin: dict[str, str], before: int, route: str) -> list[dict]:
    """Rows of the gateway's request log since BEFORE rows, for the route (the endpoint's name in the table)."""
    rows = requests_seen(url, admin)
    return [r for r in rows[: max(len(rows) - before, 0)] if r["route"] == route]


def last_body(work: Path, route: str) -> str:
    """The request body of the newest ROUTE request in the stack's request log (kept with log_bodies)."""
    with sqlite3.connect(work / ".podllama" / "podllama.db") as db:
        row = db.execute("SELECT request_body FROM podllama_requests WHERE route = ? ORDER BY ts DESC LIMIT 1",
                         (route,)).fetchone()
    return str(row[0] or "") if row else ""


def ask(page: Page, text: str, url: str, admin: dict[str, str]) -> str:
    """Type TEXT into the chat input, send it, and wait until the gateway logged the streamed answer as complete
    (the log's row is written when the last byte went out); returns the answer as the page shows it."""
    seen = len(requests_seen(url, admin))
    box = page.locator("#chat-input")
    box.click()
    box.fill(text)
    page.keyboard.press("Enter")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not new_rows(url, admin, seen, CHAT):
        page.wait_for_timeout(500)
    last, stable = "", 0
    while time.monotonic() < deadline and stable < 4:  # the page shows the last pieces a moment later
        page.wait_for_timeout(500)
        text = "\n".join(line for line in page.locator("#response-content-container").last.inner_text().splitlines()
                         if not line.startswith("Retrieved") and not line.rstrip().endswith(("Source", "Sources")))
        stable = stable + 1 if text.strip() and text == last else 0
        last = text
    return last.strip()


def drive(page: Page, run: Run, url: str, admin: dict[str, str], before: int, work: Path) -> None:
    run.shot(page, "start")
    # 1. the models: Open WebUI lists what the gateway's /v1/models says
    page.get_by_role("button", name="smollm2-chat").first.click()
    page.wait_for_timeout(1000)
    listed = page.locator("body").inner_text()
    run.shot(page, "models")
    run.check("the model list shows the gateway's chat and embedding models",
              "smollm2-chat" in listed and "smollm2-embed" in listed)
    page.keyboard.press("Escape")
    # 2. a chat answer, streamed through the gateway
    t = time.monotonic()
    answer = ask(page, "What is the capital of France? Answer in one word.", url, admin)
    run.step("chat answered in the page", time.monotonic() - t)
    run.shot(page, "chat")
    chats = new_rows(url, admin, before, CHAT)
    streamed = [r for r in chats if r["status"] == 200 and (r.get("completion_tokens") or 0) > 0]
    run.check("a chat answer appeared in the page", bool(answer), repr(answer[:80]))
    run.check("the gateway answered the chat (200, tokens counted from the stream)", bool(streamed),
              f"{len(chats)} chat request(s) in the gateway's log")
    # 3. a document: Open WebUI cuts it into pieces and embeds them through the gateway's embedding role
    seen = len(requests_seen(url, admin))
    doc = work / "skerry-point.txt"
    doc.write_text(DOCUMENT)
    t = time.monotonic()
    page.locator('input[type="file"]').first.set_input_files(str(doc))
    page.wait_for_timeout(1000)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not new_rows(url, admin, seen, EMBED):
        page.wait_for_timeout(1000)
    page.wait_for_timeout(2000)
    run.step("document embedded", time.monotonic() - t)
    run.shot(page, "document")
    answer = ask(page, "Who keeps the light at Skerry Point?", url, admin)
    run.shot(page, "document-answer")
    embeds = new_rows(url, admin, seen, EMBED)
    ok = [r for r in embeds if r["status"] == 200 and r["server"] == "embed"]
    run.check("the document and the question were embedded by the gateway's embedding server",
              len(ok) >= 2 and len(ok) == len(embeds), f"{len(ok)} of {len(embeds)} embedding requests answered 200")
    sent = last_body(work, CHAT)
    run.check("the question reached the model with the retrieved piece of the document",
              "Ottoline Brask" in sent and "Who keeps the light at Skerry Point?" in sent)
    run.check("an answer appeared in the page", bool(answer), repr(answer[:160]))


def write_results(run: Run) -> None:
    lines = ["# Open WebUI against the gateway", "",
             f"`bench/openwebui.py`, {time.strftime('%Y-%m-%d')}: Open WebUI {VERSION} from the package index, "
             "Chromium (Debian's) driven by Playwright, a podllama stack of SmolLM2-135M-Instruct as chat and "
             "embedding servers on Podman.", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {n} | {s:.1f} |" for n, s in run.steps]
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {w} | {'ok' if ok else 'FAILED'}{': ' + d if d else ''} |" for w, ok, d in run.checks]
    notes = (ROOT / "bench" / "RESULTS-openwebui.md").read_text().partition("\nScreenshots:")[2] \
        if (ROOT / "bench" / "RESULTS-openwebui.md").exists() else ""
    (ROOT / "bench" / "RESULTS-openwebui.md").write_text("\n".join(lines) + "\n" + (
        "\nScreenshots:" + notes if notes else ""))
    (ROOT / "bench" / "results-openwebui.json").write_text(json.dumps(
        {"steps": run.steps, "checks": run.checks}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
