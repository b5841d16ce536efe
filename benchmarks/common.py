"""Helpers shared by the benchmark scripts: random variables of the real shapes, timing, peak memory,
one child process per measured configuration."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(shapes: Mapping, key: jax.Array, scale: float = 0.02,
                     fixed: Mapping | None = None) -> dict:
    """Arrays for a ``jax.eval_shape(init)`` tree without running the module's init.

    Leaves present in ``fixed`` (same nesting, any subset: e.g. filter banks, position tables) are used as
    given (shape-checked); batch-norm statistics (collection ``batch_stats``) are ``mean`` 0 / ``var`` 1;
    every other float leaf is ``N(0, scale²)``, integer leaves are zero. The normal draws come from a NumPy
    generator seeded by ``key``: jitted ``jax.random`` compiles one kernel per leaf shape (minutes at full
    size on a small CPU).
    """
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    known = dict(jax.tree_util.tree_flatten_with_path(fixed or {})[0])
    unused = set(known) - {p for p, _ in flat}
    if unused:
        raise ValueError(f"fixed leaves not in the shapes: {sorted(jax.tree_util.keystr(p) for p in unused)}")
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if path in known:
            value = np.asarray(known[path], leaf.dtype)
            if value.shape != tuple(leaf.shape):
                raise ValueError(f"fixed {jax.tree_util.keystr(path)}: shape {value.shape}, "
                                 f"expected {leaf.shape}")
            return jnp.asarray(value)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.zeros(leaf.shape, leaf.dtype)
        if jax.tree_util.keystr(path[:1]) == "['batch_stats']":
            name = jax.tree_util.keystr(path[-1:])
            return (jnp.ones if name == "['var']" else jnp.zeros)(leaf.shape, leaf.dtype)
        value = rng.standard_normal(leaf.shape, np.float32)
        value *= scale
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_unflatten(tree, [fill(p, leaf) for p, leaf in flat])


def timed(fn: Callable, *args, repeats: int) -> tuple[list[float], Any]:
    """Wall seconds of ``repeats`` calls of ``fn(*args)``, each up to ``block_until_ready``, and the last
    call's output."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times, out


def peak_rss_mib() -> float:
    """This process's peak resident set size (``ru_maxrss``, KiB on Linux) in MiB: a process-wide
    high-water mark (Python + JAX runtime, weights, compilation, XLA buffers), hence one process per
    measured configuration."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident set size now (``VmRSS`` of ``/proc/self/status``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def machine() -> dict:
    """Where the numbers come from: device, CPU, core count, JAX version, load averages (1, 5, 15 min)."""
    return {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "loadavg": [round(x, 2) for x in os.getloadavg()]}


def run_child_process(script: str, args: Sequence[str]) -> dict:
    """Run ``python script *args`` in a fresh process; its last stdout line is a JSON object, returned."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
