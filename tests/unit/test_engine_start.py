"""Starting a container through an engine client that fails for a passing reason: a stand-in `podman` program
(the process boundary podllama talks to) that answers like Podman 4.3's API service when it loses the
runtime's start handshake."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from podllama.engine import ContainerSpec, EngineError
from podllama.engine.base import START_RETRY_PAUSES
from podllama.engine.podman import PodmanEngine

CLIENT = """#!/usr/bin/env python3
import json, sys
from pathlib import Path
state = Path(__file__).with_suffix(".json")
calls = json.loads(state.read_text()) if state.exists() else []
calls.append(sys.argv[1:])
state.write_text(json.dumps(calls))
runs = sum(1 for c in calls if c[0] == "run")
if sys.argv[1] == "run":
    if runs <= FAILURES:
        sys.stderr.write("Error: " + REASON + "\\n")
        sys.exit(126)
    print("c0ffee")
"""


def engine_with(tmp_path: Path, failures: int, reason: str = "write child: broken pipe") -> tuple[PodmanEngine, Path]:
    client = tmp_path / "podman"
    client.write_text(CLIENT.replace("FAILURES", str(failures)).replace("REASON", repr(reason)))
    client.chmod(client.stat().st_mode | stat.S_IEXEC)

    class Scripted(PodmanEngine):
        binary = str(client)

    return Scripted(), client.with_suffix(".json")


def calls(log: Path) -> list[str]:
    return [c[0] for c in json.loads(log.read_text())]


def test_a_start_lost_in_the_handshake_is_made_again(tmp_path):
    engine, log = engine_with(tmp_path, failures=2)
    assert engine.run(ContainerSpec(name="s-chat-1", image="img")) == "c0ffee"
    assert calls(log) == ["run", "rm", "run", "rm", "run"]  # the half-made container removed each time


def test_it_gives_up_after_five_tries_and_other_failures_are_not_retried(tmp_path):
    engine, log = engine_with(tmp_path, failures=9)
    with pytest.raises(EngineError, match="write child: broken pipe"):
        engine.run(ContainerSpec(name="s-chat-1", image="img"))
    assert calls(log).count("run") == 1 + len(START_RETRY_PAUSES) == 5
    other = tmp_path / "other"
    other.mkdir()
    engine, log = engine_with(other, failures=1, reason="the container name s-chat-1 is already in use")
    with pytest.raises(EngineError, match="already in use"):
        engine.run(ContainerSpec(name="s-chat-1", image="img"))
    assert calls(log) == ["run"]
