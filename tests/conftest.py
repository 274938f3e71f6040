"""Shared fixtures. Integration fixtures (engines, images, stacks) live in tests/integration/conftest.py."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def vocab_file(project_root) -> Path:
    path = project_root / "llama.cpp" / "models" / "ggml-vocab-llama-spm.gguf"
    if not path.is_file():
        pytest.fail(f"{path} missing: check the submodule out first (`podllama source init --mirror pypi`)")
    return path
