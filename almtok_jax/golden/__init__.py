"""Golden-fixture runner: ``python -m almtok_jax.golden PATH...``.

Each fixture ``.npz`` names its computation in ``meta["kind"]``; :data:`KINDS` maps a kind to the handler
that builds the component from ``meta["config"]``, loads ``param/*`` + ``buffer/*`` through the project's
own key mapping, runs it on ``in/*`` and returns the outputs by name. The runner compares every
``out/*`` with ``|ours - expected| <= meta["atol"][name]`` and reports each array.
"""

from almtok_jax.golden.runner import KINDS, Fixture, Result, load_fixture, main, run_fixture

__all__ = ["KINDS", "Fixture", "Result", "load_fixture", "main", "run_fixture"]
