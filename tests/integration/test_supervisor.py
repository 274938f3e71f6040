"""The supervisor alone, one round at a time, against real containers: crash loops, stalled loading,
servers that stop answering, servers that load slowly but steadily."""

from __future__ import annotations

import struct
import time

import pytest

from podllama.build import images
from podllama.config import SupervisorSection
from podllama.engine import ContainerSpec
from podllama.stack import Stack, Unit
from podllama.stack.supervisor import Supervisor

# A stand-in llama-server: answers /health with 503 ("loading") forever, printing a log line every 0.3 s when
# MODE is "progress"; with MODE "hang" it answers 200 twice and then never again.
FAKE = r"""
import http.server, sys, threading, time
mode = sys.argv[1]
seen = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global seen
        seen += 1
        if mode == "hang" and seen > 2:
            time.sleep(3600)
        self.send_response(200 if mode == "hang" else 503)
        self.end_headers()
    def log_message(self, *a):
        pass
def tick():
    i = 0
    while mode in ("progress", "late"):
        print("loading tensors", i, flush=True); i += 1; time.sleep(0.3)
print("starting", mode, flush=True)
if mode == "late":  # loads before it listens (as sd-server does): never listens here
    tick()
threading.Thread(target=tick, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


@pytest.fixture(scope="module")
def gateway_image(podman, tmp_path_factory) -> str:
    """An image with Python in it (the gateway's), to run stand-in servers."""
    from tests.helpers import ROOT
    from tests.integration.conftest import base_choice

    return images.build_gateway(podman, ROOT, base_choice(podman), tmp_path_factory.mktemp("logs"), progress=print)


def fake_unit(stack: Stack, server: str, image: str, mode: str, role: str = "chat") -> Unit:
    spec = ContainerSpec(name=f"{stack.name}-{server}-1", image=image, network=stack.network, user="65534",
                         entrypoint=["python3", "-c", FAKE], args=[mode],
                         labels={"podllama.stack": stack.name, "podllama.kind": "server", "podllama.server": server,
                                 "podllama.replica": "1", "podllama.role": role})
    return Unit(server, 1, role, spec, "fake")


def rounds(sup: Supervisor, seconds: float) -> list[dict]:
    events, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        events += sup.check_once()
        time.sleep(0.3)
    return events


# stall_timeout is many times the stand-in's 0.3 s between log lines, so a busy machine's pause is not a stall
POLICY = SupervisorSection(interval=0.3, unhealthy_after=2, stall_timeout=5, backoff_initial=0.5, backoff_max=1,
                           crash_loop_limit=3, crash_loop_window=120, listen_timeout=2)


def test_slow_but_steady_loading_is_left_alone_and_a_stall_is_restarted(podman, stack_files, gateway_image):
    sf = stack_files(podman)
    stack = Stack(sf.config(), podman)
    podman.create_network(stack.network, {"podllama.stack": stack.name})
    steady, stalled = fake_unit(stack, "steady", gateway_image, "progress"), fake_unit(stack, "stalled", gateway_image, "stall")
    for u in (steady, stalled):
        stack.recreate(u, exists=False)
    sup = Supervisor(stack, POLICY, units=lambda: [steady, stalled])
    events = rounds(sup, 9)
    assert not [e for e in events if e["container"] == steady.name], events  # loading with progress: never killed
    restarts = [e for e in events if e["container"] == stalled.name]
    assert restarts and restarts[0]["action"] == "restart" and "no loading progress" in restarts[0]["reason"]
    assert "starting stall" in restarts[0]["reason"]  # what it was stuck on
    assert podman.inspect(steady.name).running


def test_a_server_that_listens_only_once_loaded_is_loading_until_then(podman, stack_files, gateway_image):
    """sd-server loads its model before it listens: while it logs progress it is loading, never restarted; a
    llama-server not listening after listen_timeout is not answering."""
    sf = stack_files(podman)
    stack = Stack(sf.config(), podman)
    podman.create_network(stack.network, {"podllama.stack": stack.name})
    painter = fake_unit(stack, "painter", gateway_image, "late", role="image")
    chat = fake_unit(stack, "mute", gateway_image, "late")
    for u in (painter, chat):
        stack.recreate(u, exists=False)
    sup = Supervisor(stack, POLICY, units=lambda: [painter, chat])
    events = rounds(sup, 7)
    assert not [e for e in events if e["container"] == painter.name], events
    restarted = [e for e in events if e["container"] == chat.name]
    assert restarted and "not answering /health" in restarted[0]["reason"], events
    assert podman.inspect(painter.name).running


def test_a_server_that_stops_answering_is_restarted(podman, stack_files, gateway_image):
    sf = stack_files(podman)
    stack = Stack(sf.config(), podman)
    podman.create_network(stack.network, {"podllama.stack": stack.name})
    hung = fake_unit(stack, "hung", gateway_image, "hang")
    stack.recreate(hung, exists=False)
    first_id = None
    sup = Supervisor(stack, POLICY, units=lambda: [hung])
    for _ in range(50):
        first_id = first_id or podman.inspect(hung.name).id
        events = sup.check_once()
        if events:
            break
    assert events and events[0]["action"] == "restart" and "not answering /health" in events[0]["reason"]
    assert podman.inspect(hung.name).id != first_id  # a fresh container
    assert stack.state.server("hung-1")["restarts"] == 1


def test_a_crash_loop_is_marked_failed_with_its_last_log_lines(podman, stack_files, models_dir, tmp_path):
    bad = tmp_path / "bad-models"
    bad.mkdir()
    bad.chmod(0o755)
    # a GGUF header that says nothing (no architecture, no tensors): llama-server cannot load it, and exits
    (bad / "broken.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    (bad / "broken.gguf").chmod(0o644)
    sf = stack_files(podman, servers='[servers.crashy]\nmodel = "broken.gguf"\n')
    cfg_text = sf.path.read_text().replace(f'models_dir = "{models_dir}"', f'models_dir = "{bad}"')
    sf.path.write_text(cfg_text)
    sf.run("start", "--no-gateway", "--no-wait")
    stack = Stack(sf.config(), podman)
    sup = Supervisor(stack, POLICY)
    events = rounds(sup, 12)
    actions = [e["action"] for e in events]
    assert actions.count("restart") == 3 and actions[-1] == "failed", events
    failed = stack.state.server("crashy-1")["failed"]
    assert "crash loop" in failed["reason"] and "gguf" in failed["logs"].lower()
    assert rounds(sup, 1.5) == []  # given up: no more restarts
    row = sf.status()["servers"][0]
    assert row["state"] == "failed" and row["restarts"] == 3
    assert "crash loop" in sf.run("status").stdout
    # an explicit start clears the verdict
    stack.state.set_desired(["crashy-1"], "running")
    assert not stack.state.server("crashy-1").get("failed")
