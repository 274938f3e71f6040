"""The error every build step raises: a build that cannot start or did not pass, with nothing changed."""

from __future__ import annotations

from pathlib import Path


class BuildError(Exception):
    """A build that cannot start or did not pass; nothing was changed. The message says where the log is."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log

