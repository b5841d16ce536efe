"""Every golden fixture in ../shared/fixtures passes at its own tolerance (``meta["atol"]``), and a replay of
``rvq_train`` in the reference's float32 order (``rvq_reference_order.py``) is bit-exact: the gradients
w.r.t. ``project_in`` (values up to ~170, where the fixture's atol scales with them) differ from the
reference only by the accumulation order of the two projection matmuls.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, REPO

from almtok_jax.golden.runner import compare, fixture_files, run_fixture

FILES = fixture_files([FIXTURES]) if FIXTURES.is_dir() else []


def test_compare_is_absolute_and_names_the_scale():
    expected = np.array([100.0, -0.5], np.float32)
    assert compare("f", "a", expected + np.float32(1e-5), expected, 2e-5).status == "ok"
    miss = compare("f", "a", expected + np.array([0.0, 3e-5], np.float32), expected, 2e-5)
    assert miss.status == "FAIL" and "largest |expected| 100" in miss.line()
    assert compare("f", "a", np.array([np.nan, 0.0]), expected, 1.0).status == "FAIL"
    assert compare("f", "a", expected[:1], expected, 1.0).status == "FAIL"
    assert compare("f", "a", None, expected, 1.0).status == "skipped"


def test_fixtures_found():
    assert FILES, f"no fixtures under {FIXTURES}"


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_golden_fixture(path):
    outcome = run_fixture(path)
    bad = [r.line() for r in outcome.results if r.status == "FAIL"]
    assert not bad, "\n".join(bad)
    assert outcome.passed > 0


def _kind(path: Path) -> str:
    with np.load(path) as z:  # reads only the meta entry
        return json.loads(str(z["meta"]))["kind"]


RVQ_TRAIN = [p for p in FILES if _kind(p) == "rvq_train"]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="turning off fused multiply-adds uses the x86 flag --xla_cpu_max_isa")
@pytest.mark.parametrize("path", RVQ_TRAIN, ids=[p.name for p in RVQ_TRAIN])
def test_rvq_train_bit_exact_in_reference_float32_order(path):
    """Without fused multiply-adds (the reference's kernels used none), our training forward and
    rotation-trick backward reproduce the reference bit for bit: every layer output, and the four
    ``project_in`` gradients once the two projection matmuls are summed in the reference's row order."""
    flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_cpu_max_isa=AVX"]))
    script = Path(__file__).with_name("rvq_reference_order.py")
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(script), str(path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.splitlines()[-1])
    assert any(name.startswith("grad_q_project_in.weight") for name in errors)
    assert all(err == 0.0 for err in errors.values()), errors
