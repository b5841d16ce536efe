"""Console entry points of the installed package (``[project.scripts]`` in ``pyproject.toml``)."""

from __future__ import annotations


def evaluate() -> int:
    """``almtok-evaluate``: :func:`almtok_jax.evaluate.main` (which returns the summary) as a command."""
    from almtok_jax.evaluate import main

    main()
    return 0
