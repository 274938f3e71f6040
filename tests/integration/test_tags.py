"""Tag moves and rollback, on real Podman with tiny images (no llama-server needed)."""

import io
import tarfile

import pytest

from podllama.build import images
from podllama.build.errors import BuildError

VARIANT = "zztest"


def tiny_image(engine, ref: str, content: str, tmp_path) -> str:
    path = tmp_path / f"{content}.tar"
    with tarfile.open(path, mode="w") as tar:
        data = content.encode()
        info = tarfile.TarInfo("marker")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with path.open("rb") as f:
        engine.import_tar(f, ref)
    return engine.image_id(ref)


@pytest.fixture
def clean(podman):
    yield
    for r in podman.list_images(images.REPO):
        if r["tag"].startswith(VARIANT):
            podman.untag(f"{r['repository']}:{r['tag']}")


def test_promote_keeps_the_previous_image_and_rollback_swaps(podman, clean, tmp_path):
    a = tiny_image(podman, "localhost/podllama-test-a:1", "a", tmp_path)
    b = tiny_image(podman, "localhost/podllama-test-b:1", "b", tmp_path)
    assert images.promote(podman, a, VARIANT, "1" * 40) is None
    assert podman.image_id(images.tag_for(VARIANT)) == a
    assert images.promote(podman, b, VARIANT, "2" * 40) == a
    assert podman.image_id(images.tag_for(VARIANT)) == b
    assert podman.image_id(f"{images.REPO}:{VARIANT}-previous") == a
    assert podman.image_id(images.tag_for(VARIANT, "1" * 40)) == a
    assert podman.image_id(images.tag_for(VARIANT, "2" * 40)) == b
    assert images.rollback(podman, VARIANT) == a
    assert podman.image_id(images.tag_for(VARIANT)) == a
    assert podman.image_id(f"{images.REPO}:{VARIANT}-previous") == b
    for ref in ("localhost/podllama-test-a:1", "localhost/podllama-test-b:1"):
        podman.untag(ref)


def test_rollback_without_previous_says_so(podman, clean):
    with pytest.raises(BuildError, match="no podllama/llama-server:zztest-previous"):
        images.rollback(podman, VARIANT)
