"""What a checkpoint must satisfy: every floating value finite (written), and the data read back equal to the
data written (restored), checked by a word sum per array.

The word sum of an array is the sum, modulo 2**32, of its bytes read as unsigned words (32-bit words for
4- and 8-byte types, else the type's own width widened): any single flipped bit changes it. It is computed
on the devices where the array lives, so only one number per array crosses to the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _word_sum(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    words = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    return jnp.sum(words, dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.array(True)


@jax.jit
def _inspect(tree: Any) -> tuple[Any, jax.Array]:
    finite = [_finite(x) for x in jax.tree.leaves(tree)]
    return jax.tree.map(_word_sum, tree), jnp.all(jnp.stack(finite)) if finite else jnp.array(True)


def inspect(tree: Any) -> tuple[dict[str, int], bool]:
    """``({path: word sum}, every floating value finite)`` of a tree of (global) arrays."""
    sums, finite = jax.device_get(_inspect(tree))
    named = {jax.tree_util.keystr(path): int(s) for path, s in jax.tree_util.tree_flatten_with_path(sums)[0]}
    return named, bool(finite)


def mismatches(written: dict[str, int], restored: dict[str, int]) -> list[str]:
    """The arrays whose word sums differ (or that one side lacks)."""
    return sorted(k for k in written.keys() | restored.keys() if written.get(k) != restored.get(k))
