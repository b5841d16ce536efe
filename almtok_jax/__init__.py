"""almtok-jax: ALMTokenizer2 in JAX/Flax. ``from almtok_jax import ALMTokenizer2``."""

__all__ = ["ALMTokenizer2"]


def __getattr__(name: str):
    # Imported lazily so that light modules (torch_io, config) do not pull in the whole model.
    if name == "ALMTokenizer2":
        from almtok_jax.tokenizer import ALMTokenizer2

        return ALMTokenizer2
    raise AttributeError(f"module 'almtok_jax' has no attribute {name!r}")
