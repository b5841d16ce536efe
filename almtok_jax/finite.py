"""Finding NaN and infinite values without a full-size temporary (weights are checked one variable at a time
as they are written and read)."""

from __future__ import annotations

import numpy as np

_CHUNK = 1 << 22  # elements checked at a time: the boolean temporary stays at 4 MiB


def non_finite(array: np.ndarray) -> tuple[int, int] | None:
    """``(count, first flat index)`` of the NaN or infinite values of ``array``, or None (integers: None)."""
    array = np.asarray(array)
    if array.dtype.kind not in "fc":
        return None
    flat = array.reshape(-1)
    count, first = 0, None
    for start in range(0, flat.size, _CHUNK):
        bad = ~np.isfinite(flat[start:start + _CHUNK])
        if bad.any():
            count += int(bad.sum())
            first = start + int(np.argmax(bad)) if first is None else first
    return None if first is None else (count, first)


def describe(found: tuple[int, int], size: int) -> str:
    """``non_finite``'s result in words."""
    count, first = found
    return f"{count} of {size} values are NaN or infinite (the first at flat index {first})"
