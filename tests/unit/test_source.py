"""The submodule workflow against real git repositories made in the test (no GitHub needed)."""

import hashlib
import http.server
import io
import json
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from podllama.build import source
from podllama.build.source import SourceError


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "protocol.file.allow=always", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def make_upstream(path: Path, commits: int = 2, text: str = "version") -> list[str]:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "master")
    git(path, "config", "user.email", "t@t")
    git(path, "config", "user.name", "t")
    shas = []
    for i in range(commits):
        (path / "file.txt").write_text(f"{text} {i}\n")
        git(path, "add", "file.txt")
        git(path, "commit", "-q", "-m", f"commit {i}")
        shas.append(git(path, "rev-parse", "HEAD"))
    return shas


def make_superproject(path: Path, pinned: str) -> Path:
    path.mkdir()
    git(path, "init", "-q")
    (path / ".gitmodules").write_text(
        '[submodule "llama.cpp"]\n\tpath = llama.cpp\n\turl = https://github.com/ggml-org/llama.cpp.git\n')
    git(path, "update-index", "--add", "--cacheinfo", f"160000,{pinned},llama.cpp")
    git(path, "add", ".gitmodules")
    return path


@pytest.fixture
def repos(tmp_path):
    shas = make_upstream(tmp_path / "upstream", 3)
    # the mirror holds the first two commits; the third exists only upstream
    git(tmp_path, "clone", "-q", str(tmp_path / "upstream"), "mirror")
    git(tmp_path / "mirror", "reset", "-q", "--hard", shas[1])
    sup = make_superproject(tmp_path / "project", shas[0])
    return sup, tmp_path / "mirror", tmp_path / "upstream", shas


def test_status_before_init(repos):
    sup, _, _, shas = repos
    st = source.status(sup)
    assert st.pinned == shas[0] and st.commit is None and not st.at_pin


def test_init_from_a_mirror_checks_out_the_pin(repos):
    sup, mirror, _, shas = repos
    st = source.init(str(mirror), root=sup, progress=lambda m: None)
    assert st.commit == shas[0] and st.at_pin and not st.dirty
    assert (sup / "llama.cpp" / "file.txt").read_text() == "version 0\n"
    (sup / "llama.cpp" / "file.txt").write_text("changed\n")
    assert source.status(sup).dirty


def test_a_mirror_without_the_pinned_commit_is_refused(repos, tmp_path):
    sup, _, _, _ = repos
    other = tmp_path / "other"
    make_upstream(other, 1, text="unrelated")
    with pytest.raises(SourceError, match="does not hold the pinned commit"):
        source.init(str(other), root=sup, progress=lambda m: None)
    assert not (sup / "llama.cpp" / "file.txt").exists()


def test_unreachable_url_says_to_use_a_mirror(repos, monkeypatch):
    sup, _, _, _ = repos
    monkeypatch.setenv("GIT_ALLOW_PROTOCOL", "file")  # https refused at once, as on a site without GitHub
    with pytest.raises(SourceError, match="--mirror"):
        source.init(None, root=sup, progress=lambda m: None)


def test_checkout_moves_to_a_new_commit_from_a_remote_and_back(repos):
    sup, mirror, upstream, shas = repos
    source.init(str(mirror), root=sup, progress=lambda m: None)
    old, new = source.checkout(shas[2], remote=str(upstream), root=sup)
    assert (old, new) == (shas[0], shas[2])
    assert source.status(sup).commit == shas[2] and not source.status(sup).at_pin
    source.checkout(old, root=sup)
    assert source.status(sup).at_pin
    (sup / "llama.cpp" / "file.txt").write_text("local edit\n")
    with pytest.raises(SourceError, match="local changes"):
        source.checkout(shas[1], root=sup)


class FakeIndex(http.server.BaseHTTPRequestHandler):
    """Speaks the package index's JSON simple API (PEP 691) and serves files."""

    files: dict[str, bytes] = {}

    def do_GET(self):
        if self.path == "/simple/llama-cpp-python/":
            body = json.dumps({"meta": {"api-version": "1.1"}, "name": "llama-cpp-python", "files": [
                {"filename": n, "url": f"/files/{n}", "hashes": {"sha256": hashlib.sha256(b).hexdigest()}}
                for n, b in self.files.items()]}).encode()
            ctype = "application/vnd.pypi.simple.v1+json"
        elif self.path.startswith("/files/") and self.path[7:] in self.files:
            body, ctype = self.files[self.path[7:]], "application/octet-stream"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def sdist_with_tree(tmp_path: Path, version: str) -> tuple[bytes, str]:
    """A llama-cpp-python-like sdist: vendor/llama.cpp is a git work tree whose git dir lives in .git/modules."""
    top = tmp_path / "sd" / f"llama_cpp_python-{version}"
    shas = make_upstream(top / "vendor" / "llama.cpp", 1)
    (top / ".git" / "modules" / "vendor").mkdir(parents=True)
    (top / "vendor" / "llama.cpp" / ".git").rename(top / ".git" / "modules" / "vendor" / "llama.cpp")
    (top / "vendor" / "llama.cpp" / ".git").write_text("gitdir: ../../.git/modules/vendor/llama.cpp\n")
    git(top / "vendor" / "llama.cpp", "config", "core.worktree", "../../../../vendor/llama.cpp")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(top, arcname=top.name)
    return buf.getvalue(), shas[0]


def test_pypi_mirror_downloads_verifies_and_serves_the_pin(repos, tmp_path, monkeypatch):
    sup, _, _, _ = repos
    data, sha = sdist_with_tree(tmp_path, "9.9.9")
    FakeIndex.files = {"llama_cpp_python-9.9.9.tar.gz": data}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeIndex)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(source.PYPI_RELEASES, sha, "9.9.9")
    try:
        # pin the superproject to the commit the sdist carries, then init from "pypi"
        git(sup, "update-index", "--cacheinfo", f"160000,{sha},llama.cpp")
        st = source.init("pypi", root=sup, progress=lambda m: None)
        assert st.commit == sha and st.at_pin
        # a corrupted download is rejected before it is used
        FakeIndex.files = {"llama_cpp_python-9.9.8.tar.gz": data}
        monkeypatch.setitem(source.PYPI_RELEASES, "f" * 40, "9.9.8")
        real = FakeIndex.do_GET

        def corrupt(self):
            if self.path.startswith("/files/"):
                FakeIndex.files = {"llama_cpp_python-9.9.8.tar.gz": data[:-10] + b"0123456789"}
            return real(self)

        monkeypatch.setattr(FakeIndex, "do_GET", corrupt)
        with pytest.raises(SourceError, match="does not match"):
            source.pypi_mirror("f" * 40, progress=lambda m: None)
        assert not list((tmp_path / "cache" / "podllama" / "mirrors" / "llama-cpp-python-9.9.8").glob("*.tar.gz"))
    finally:
        server.shutdown()


def test_unknown_commit_for_pypi_names_the_alternative():
    with pytest.raises(SourceError, match="--mirror PATH"):
        source.pypi_mirror("0" * 40, progress=lambda m: None)


def test_a_checkout_killed_midway_is_finished_by_the_next(repos):
    """What a kill -9 of `git checkout` leaves: some files already at the new commit (the tree looks changed),
    git's index lock, and podllama's note of where the checkout was going. The next checkout finishes it."""
    sup, mirror, upstream, shas = repos
    source.init(str(mirror), root=sup, progress=lambda m: None)
    sub = sup / "llama.cpp"
    gitdir = Path(git(sub, "rev-parse", "--absolute-git-dir"))
    (gitdir / "podllama-checkout").write_text(f"{shas[0]} {shas[1]}\n")
    (sub / "file.txt").write_text("version 1\n")
    (gitdir / "index.lock").write_text("")
    assert source.status(sup).dirty
    with pytest.raises(subprocess.CalledProcessError):  # git itself refuses to work while the lock is there
        git(sub, "checkout", "-q", "--detach", shas[0])
    assert source.checkout(shas[2], remote=str(upstream), root=sup) == (shas[0], shas[1])  # the interrupted one
    st = source.status(sup)
    assert st.commit == shas[1] and not st.dirty and not (gitdir / "index.lock").exists()
    assert not (gitdir / "podllama-checkout").exists()
    assert source.checkout(shas[2], remote=str(upstream), root=sup) == (shas[1], shas[2])  # and on from there
