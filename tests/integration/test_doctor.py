"""`podllama doctor` and the daemons it starts, on the real engines: a socket must answer, not merely exist;
a dead daemon's leftovers never stop a new one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from podllama.build import doctor
from tests.helpers import podllama, wait_until


def listeners(sock: Path) -> set[int]:
    """The processes holding the listening socket bound at SOCK (from /proc: whatever their names)."""
    inodes = {f"socket:[{cols[6]}]" for line in Path("/proc/net/unix").read_text().splitlines()[1:]
              if len(cols := line.split()) == 8 and cols[7] == str(sock) and cols[3] == "00010000"}
    pids = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes:
                pids.add(int(fd.parts[2]))
        except OSError:
            pass
    return pids


def socket_finding(*args: str) -> dict:
    proc = podllama("doctor", "--engine", "podman", "--json", *args, check=False)
    return next(f for f in json.loads(proc.stdout) if f["check"] == "API socket")


def test_a_stale_podman_socket_is_seen_and_replaced(podman):
    sock = podman.api_socket()
    assert doctor.socket_answers(sock) or socket_finding("--fix")["ok"]
    # the service dies and leaves its socket file behind, as after a reboot where /run survives
    holders = listeners(sock)
    assert holders, "nothing listens on the socket it answers on"
    for pid in holders:
        os.kill(pid, signal.SIGKILL)
    # a killed process's threads take a moment to let go of its files: until then the socket still accepts
    assert wait_until(lambda: not doctor.socket_answers(sock), 10), listeners(sock)
    assert sock.is_socket() and not listeners(sock)

    found = socket_finding()
    assert found["ok"] is False and "nothing answers" in found["detail"] and "podman system service" in found["fix"]

    fixed = socket_finding("--fix")
    assert fixed["ok"] is True and fixed["fixed"] is True, fixed
    assert doctor.socket_answers(sock) and listeners(sock)
    # in /, never in the directory it was started from (which a CI run may delete): its containers inherit it
    assert {os.readlink(f"/proc/{pid}/cwd") for pid in listeners(sock)} == {"/"}
    # what the gateway does with it: the engine's API answers through the socket
    api = subprocess.run(["podman", "--url", f"unix://{sock}", "version"], capture_output=True, text=True, timeout=30)
    assert api.returncode == 0 and "Server" in api.stdout


def test_a_stale_docker_pid_file_does_not_stop_the_daemon(docker):
    # the daemon dies without cleaning up, and after a restart its pid belongs to another process
    for name in ("dockerd", "containerd"):
        subprocess.run(["pkill", "-9", "-x", name], check=False)
    assert wait_until(lambda: subprocess.run(["pgrep", "-x", "dockerd|containerd"], check=False).returncode == 1, 10)
    for pidfile in (doctor.DOCKER_PIDFILE, doctor.CONTAINERD_PIDFILE):
        pidfile.write_text(str(os.getpid()))  # alive, and neither dockerd nor containerd
    doctor.start_dockerd()
    assert docker.available()
    assert doctor.DOCKER_PIDFILE.read_text().strip() != str(os.getpid())
