"""Every golden fixture in ../shared/fixtures passes at its own tolerance (``meta["atol"]``).

One documented exception: four ``rvq_train`` gradients w.r.t. ``project_in`` (values up to ~140) miss
atol 1e-5 by one or two float32 ulps; the fixture's README says to use rtol 1e-5 there (the float32
reference itself is 4e-5 away from float64). The golden CLI still reports them as FAIL; here they are held
to the README's rule, and every other array to its atol.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import FIXTURES

from almtok_jax.golden.runner import fixture_files, fx_handler_outputs, load_fixture, run_fixture

README_RTOL = {
    "rvq_train.npz": {f"grad_q_project_in.{p}_step{s}" for p in ("weight", "bias") for s in (0, 1)},
}

FILES = fixture_files([FIXTURES]) if FIXTURES.is_dir() else []


def test_fixtures_found():
    assert FILES, f"no fixtures under {FIXTURES}"


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_golden_fixture(path):
    outcome = run_fixture(path)
    relaxed = README_RTOL.get(path.name, set())
    bad = [r.line() for r in outcome.results if r.status == "FAIL" and r.name not in relaxed]
    assert not bad, "\n".join(bad)
    assert outcome.passed > 0
    if relaxed:
        fx = load_fixture(path)
        with jax.default_matmul_precision("highest"):
            ours = fx_handler_outputs(fx)
        for name in relaxed:
            np.testing.assert_allclose(ours[name], fx.expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
