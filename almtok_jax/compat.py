"""The two behaviours of almtok-jax: ``"release"`` reproduces the reference exactly (defects included),
``"default"`` fixes its defects (see the README).

The mode is a runtime choice (``--compat``, ``ALMTokenizer2.load(compat=)``), handed explicitly to every
function that depends on it; it is never part of a model config, so one run cannot mix the two."""

from typing import Literal, get_args

Compat = Literal["default", "release"]
COMPAT_MODES: tuple[str, ...] = get_args(Compat)


def check_compat(compat: str, what: str = "compat") -> None:
    """Raise a ``ValueError`` naming ``what`` unless ``compat`` is one of :data:`COMPAT_MODES`."""
    if compat not in COMPAT_MODES:
        raise ValueError(f"{what} must be one of {COMPAT_MODES}, got {compat!r}")
