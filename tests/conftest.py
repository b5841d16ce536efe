"""Shared test helpers: where the reference material lives, and float32 parity settings."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# One persistent compilation cache for the whole run, inherited by every subprocess a test starts (CLI runs,
# multi-process training and tokenizing): the same program is compiled once per run, not once per process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax"))

import jax  # noqa: E402  (after the cache location is set)
import pytest  # noqa: E402

SHARED = Path(os.environ.get("ALMTOK_SHARED", REPO.parent / "shared")).resolve()
FIXTURES = SHARED / "fixtures"
AUDIO = SHARED / "audio"

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference material not found at {SHARED} (set ALMTOK_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, shared_dir) -> Path:
    """The tiny release fixture converted once per session into a model directory."""
    import convert_torch_weights

    out = tmp_path_factory.mktemp("tiny_checkpoint") / "tiny"
    argv = ["--release", str(FIXTURES / "release_tiny"), "--config", str(REPO / "configs" / "tiny_release.yaml"),
            "--out", str(out)]
    assert convert_torch_weights.main(argv) == 0
    return out
