"""A real Postgres for the tests: the distribution's server (Debian's `postgresql`), a cluster of its own in a
temporary directory, on a free port of 127.0.0.1, with a password. It can be stopped and started again
(a database that goes away under load)."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
from pathlib import Path


def binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise AssertionError("Postgres is not installed: apt-get install postgresql (scripts/setup.sh does)")
    return Path(found[-1]).parent


class Postgres:
    def __init__(self, directory: Path, port: int) -> None:
        self.dir, self.port = directory, port
        self.data = directory / "data"
        self.password = secrets.token_urlsafe(12)
        self.url = f"postgresql://podllama:{self.password}@127.0.0.1:{port}/podllama"
        self.bin = binaries()

    def _as_owner(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """ARGV as the postgres user when run as root (Postgres refuses to run as root)."""
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        proc = subprocess.run(prefix + list(argv), capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {proc.stdout}{proc.stderr}")
        return proc

    def init(self) -> Postgres:
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        self._as_owner(str(self.bin / "initdb"), "-D", str(self.data), "-U", "podllama", "--pwfile", str(pwfile),
                       "--auth", "scram-sha-256", "-E", "UTF8")
        pwfile.unlink()
        self.start()
        self._createdb()
        return self

    def _createdb(self) -> None:
        env = {**os.environ, "PGPASSWORD": self.password}
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "podllama",
                        "podllama"], check=True, capture_output=True, env=env, timeout=60)

    def start(self) -> None:
        self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-o",
                       f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
