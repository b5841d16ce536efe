"""The two behaviours of almtok-jax: ``"release"`` reproduces the reference exactly (defects included),
``"default"`` fixes its defects (see the README)."""

COMPAT_MODES = ("default", "release")


def check_compat(compat: str, what: str = "compat") -> None:
    """Raise a ``ValueError`` naming ``what`` unless ``compat`` is one of :data:`COMPAT_MODES`."""
    if compat not in COMPAT_MODES:
        raise ValueError(f"{what} must be one of {COMPAT_MODES}, got {compat!r}")
