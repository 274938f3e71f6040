"""`podllama doctor` on the real Podman: the API socket the gateway uses must answer, not merely exist."""

from __future__ import annotations

import json
import signal
import subprocess

from podllama import doctor
from tests.helpers import podllama, wait_until


def service_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "podman system service"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def socket_finding(*args: str) -> dict:
    proc = podllama("doctor", "--engine", "podman", "--json", *args, check=False)
    return next(f for f in json.loads(proc.stdout) if f["check"] == "API socket")


def test_a_stale_podman_socket_is_seen_and_replaced(podman):
    sock = podman.api_socket()
    assert doctor.socket_answers(sock) or socket_finding("--fix")["ok"]
    # the service dies and leaves its socket file behind, as after a reboot where /run survives
    for pid in service_pids():
        subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(pid)], check=True)
    assert wait_until(lambda: not service_pids(), 10)
    assert sock.is_socket() and not doctor.socket_answers(sock)

    found = socket_finding()
    assert found["ok"] is False and "nothing answers" in found["detail"] and "podman system service" in found["fix"]

    fixed = socket_finding("--fix")
    assert fixed["ok"] is True and fixed["fixed"] is True, fixed
    assert doctor.socket_answers(sock) and service_pids()
    # what the gateway does with it: the engine's API answers through the socket
    api = subprocess.run(["podman", "--url", f"unix://{sock}", "version"], capture_output=True, text=True, timeout=30)
    assert api.returncode == 0 and "Server" in api.stdout
