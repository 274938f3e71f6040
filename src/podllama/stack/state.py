"""What a stack remembers between commands: which servers should run, restarts and failures seen by the
supervisor, the last update. One JSON file beside the config (`.podllama/state.json`), shared by the CLI on
the host and the gateway container (which mounts the config's directory at the same path).

Every change happens under an exclusive lock and is written atomically; `operation()` is the lock that makes
lifecycle commands and the supervisor take turns.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..atomic import atomic_write

RUNNING, STOPPED = "running", "stopped"
UNLOADED = "unloaded"  # an on-demand server that does not run now; its next request starts it


def replica_key(server: str, replica: int) -> str:
    """The entry of SERVER's REPLICA (1, 2 …) in the state's "servers"."""
    return f"{server}-{replica}"


class StackState:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / "state.json"

    # -- locking ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, name: str, blocking: bool = True) -> Iterator[bool]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / name, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def operation(self, blocking: bool = True) -> contextlib.AbstractContextManager[bool]:
        """Held by a lifecycle command (start, stop, update …) for its whole duration; the supervisor only
        tries it, and skips its round while a command is at work."""
        return self._flock("operation.lock", blocking)

    # -- data ---------------------------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"servers": {}}
        return data

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        with self._flock("state.lock"):
            data = self.read()
            yield data
            atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True))

    def server(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = self.read()["servers"].get(name, {})
        return entry

    def desired(self, name: str) -> str:
        return str(self.server(name).get("desired", RUNNING))

    def set_desired(self, names: list[str], desired: str) -> None:
        with self.edit() as data:
            for name in names:
                entry = data["servers"].setdefault(name, {})
                entry["desired"] = desired
                if desired != STOPPED:  # an explicit start clears a crash-loop verdict
                    entry.pop("failed", None)
                    entry["recent_restarts"] = []

    def note(self, fields: dict[str, dict[str, Any]]) -> None:
        """Set FIELDS on servers (name → {field: value}), e.g. the memory measured, the last use."""
        with self.edit() as data:
            for name, values in fields.items():
                data["servers"].setdefault(name, {}).update(values)

    def record_restart(self, name: str, reason: str) -> None:
        now = time.time()
        with self.edit() as data:
            entry = data["servers"].setdefault(name, {})
            entry["restarts"] = entry.get("restarts", 0) + 1
            entry["recent_restarts"] = entry.get("recent_restarts", []) + [now]
            entry["last_restart"] = {"at": now, "reason": reason}

    def record_failure(self, name: str, reason: str, logs: str) -> None:
        with self.edit() as data:
            entry = data["servers"].setdefault(name, {})
            entry["failed"] = {"at": time.time(), "reason": reason, "logs": logs}

    def record_engine(self, problem: str | None) -> None:
        """The gateway's supervisor lost the engine (PROBLEM says how), or has it again (None)."""
        with self.edit() as data:
            if problem is not None:
                data["engine_problem"] = {"since": time.time(), "error": problem}
            elif "engine_problem" in data:
                lost = data.pop("engine_problem")
                data["engine_back"] = {"at": time.time(), "since": lost.get("since"), "error": lost.get("error")}

    def record_update(self, result: dict[str, Any]) -> None:
        with self.edit() as data:
            data["last_update"] = {"at": time.time(), **result}

    def forget(self, names: list[str]) -> None:
        with self.edit() as data:
            for name in names:
                data["servers"].pop(name, None)
