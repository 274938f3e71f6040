"""A stack's credentials, kept in its state directory under `secrets/` (a directory only root can enter):

- `admin.key`: the management API's key, made on first start (or `$PODLLAMA_ADMIN_KEY` given to
  `podllama start`); the CLI reads it from here.
- `server.key`: a secret every llama-server of the stack requires (`--api-key-file`); only the gateway adds it
  to requests, so nothing else on the host can use a server around the gateway.
- `api_keys`: inference keys given to `podllama start` in `$PODLLAMA_API_KEYS` (one per line).
- `hf_token`, `hf_endpoint`: `$HF_TOKEN` / `$HF_ENDPOINT` given to `podllama start`, for the pulls the gateway
  runs.
- `database_url`: `$PODLLAMA_DATABASE` given to `podllama start` (a postgresql:// URL with its password).

The gateway container mounts the state directory, so it reads these files; none of them ever appears in a
container's environment or labels (what `podman inspect` shows).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_write

if TYPE_CHECKING:
    from ..config import Config
    from .database import Database

SERVER_GID = 10001  # the group that may read server.key: added to every server container (--group-add)
SERVER_KEY_IN_CONTAINER = "/run/podllama/server.key"
# environment given to `podllama start` → the file the gateway reads it from
FROM_ENV = {"PODLLAMA_API_KEYS": "api_keys", "PODLLAMA_ADMIN_KEY": "admin.key", "HF_TOKEN": "hf_token",
            "HF_ENDPOINT": "hf_endpoint", "PODLLAMA_DATABASE": "database_url"}


def bearer(key: str | None) -> list[tuple[bytes, bytes]]:
    """The request header that presents KEY to a server (none without a key)."""
    return [(b"authorization", b"Bearer " + key.encode())] if key else []


class Credentials:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "secrets"

    def path(self, name: str) -> Path:
        return self.dir / name

    def read(self, name: str) -> str | None:
        try:
            return self.path(name).read_text().strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _write(self, name: str, value: str, mode: int = 0o600) -> None:
        self._make_dir()
        atomic_write(self.path(name), value + "\n", mode=mode)

    def _make_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    # -- the two the stack makes itself ------------------------------------------------------------------------
    def ensure(self) -> list[str]:
        """The admin key and the server key, made where missing. Returns what was made, for the user."""
        made = []
        if self.read("admin.key") is None:
            self._write("admin.key", "podllama-admin-" + secrets.token_urlsafe(24))
            made.append(f"admin key for the management API made: {self.path('admin.key')} (the CLI uses it)")
        if self.read("server.key") is None:
            self._write("server.key", secrets.token_urlsafe(32), mode=0o440)
            made.append("server key made: llama-servers answer only requests the gateway sends")
        self._share_server_key()
        return made

    def _share_server_key(self) -> None:
        """server.key readable by its owner (the gateway runs as root) and by SERVER_GID (the servers'
        group); the directory around it keeps everyone else out."""
        path = self.path("server.key")
        try:
            if os.geteuid() == 0 and path.stat().st_gid != SERVER_GID:
                os.chown(path, 0, SERVER_GID)
            if path.stat().st_mode & 0o777 != 0o440:
                os.chmod(path, 0o440)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise  # a read-only mount (an exported stack's secret) decides who reads it itself

    def admin_key(self) -> str | None:
        return self.read("admin.key")

    def server_key(self) -> str | None:
        return self.read("server.key")

    # -- what `podllama start` was given ----------------------------------------------------------------------
    def capture_env(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """Write the credentials set in ENVIRON (default: this process's) to their files; a variable set to an
        empty string removes its file. Returns the variables taken."""
        environ = os.environ if environ is None else environ
        taken = []
        for var, name in FROM_ENV.items():
            if var not in environ:
                continue
            value = environ[var].strip()
            if var == "PODLLAMA_API_KEYS":
                value = "\n".join(k.strip() for k in value.split(",") if k.strip())
            if var == "PODLLAMA_DATABASE" and value:
                from ..validate import database_url

                database_url(value)  # ValueError: names the forms it takes
            if value:
                self._write(name, value)
            elif name != "admin.key":  # the admin key never goes away: an empty variable keeps the one there
                self.path(name).unlink(missing_ok=True)
            taken.append(var)
        return taken

    def inference_keys(self) -> list[str]:
        text = self.read("api_keys") or ""
        return [k.strip() for k in text.splitlines() if k.strip() and not k.startswith("#")]

    def hub_token(self, cfg: Config) -> str | None:
        """$HF_TOKEN, else [hub] token_file, else the token `podllama start` was given. Never printed."""
        from ..models import hub

        return hub.token(cfg.hub_token_file) or self.read("hf_token")

    def hub_endpoint(self, cfg: Config) -> str | None:
        """[hub] endpoint, else the $HF_ENDPOINT `podllama start` was given (else hub.endpoint's default)."""
        return cfg.hub.endpoint or self.read("hf_endpoint")

    def database(self, cfg: Config) -> Database:
        """The stack's database: [gateway] database, else the $PODLLAMA_DATABASE `podllama start` was given,
        else the SQLite file in the state directory."""
        from .database import Database

        return Database.of_stack(cfg.gateway.database or self.read("database_url"), cfg.state_path)

    def stamp(self) -> tuple[tuple[str, float], ...]:
        """What changes when any credential file changes (for the gateway's reload)."""
        try:
            return tuple(sorted((p.name, p.stat().st_mtime) for p in self.dir.iterdir()))
        except FileNotFoundError:
            return ()
